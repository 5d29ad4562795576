"""Attention kernels against SDPA on a CUDA GPU at the paper's sizes, guidance batched (two texts).

    python bench/attention.py [--dtype fp16|bf16] [--iters 30] [--frames 61] [--text-only]

First, one sparse causal attention layer of the interpolation model per level (projections included): the
key-frame kernel against SDPA on gathered keys, median of `--iters` calls. Then text cross-attention (77 keys,
without the projections, which both paths share) at every level of the three models: the short-key kernel
against SDPA as `Attention.attend` runs it, replayed from a CUDA graph of 10 calls (the kernels take tens of
microseconds, less than launching them), with the model's layer count and the total per UNet call.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import DTYPES, time_calls  # noqa: E402

from lavie_core import blocks, fused  # noqa: E402  (speed.py puts the project root on sys.path)

# level: (width, tokens per frame at 320x512, i.e. 40x64 latents halved per level)
LEVELS = {"top (40x64)": (320, 2560), "second (20x32)": (640, 640), "third (10x16)": (1280, 160)}
HEADS = 8
# (model, level, frames per call, width, tokens per frame, text attention layers per call): base 16 frames and
# interpolation 61 of 40x64 latents, VSR an 8-frame chunk of 320x512 (two text attentions per block).
TEXT_LEVELS = [
    ("base", "top", 16, 320, 2560, 5), ("base", "second", 16, 640, 640, 5), ("base", "third", 16, 1280, 160, 5),
    ("base", "middle", 16, 1280, 40, 1), ("interpolation", "top", 61, 320, 2560, 5),
    ("interpolation", "second", 61, 640, 640, 5), ("interpolation", "third", 61, 1280, 160, 5),
    ("interpolation", "middle", 61, 1280, 40, 1), ("vsr", "second", 8, 512, 40960, 10),
    ("vsr", "third", 8, 512, 10240, 10), ("vsr", "fourth", 8, 1024, 2560, 12),
]


@contextlib.contextmanager
def without_kernels() -> Iterator[None]:
    usable = fused.kernels_usable
    fused.kernels_usable = lambda *_: False
    try:
        yield
    finally:
        fused.kernels_usable = usable


def graphed_ms(fn, calls: int = 10, replays: int = 7) -> float:
    """Median ms per call of `fn` replayed from a CUDA graph of `calls` calls, after 3 plain ones."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def text_attention_table(dtype: torch.dtype) -> None:
    print("\ntext cross-attention, 77 keys, heads of width / 8; us per layer, graph-replayed")
    print("| model | level | queries | kernel us | SDPA us | speed-up | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    totals: dict[str, list[float]] = {}
    for model, level, frames, width, tokens, layers in TEXT_LEVELS:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(2, frames * tokens, width, device="cuda", dtype=dtype, generator=g)
        k, v = torch.randn(2, 77, 2 * width, device="cuda", dtype=dtype, generator=g).chunk(2, dim=-1)

        def kernel() -> torch.Tensor:
            return fused.short_key_attention(q, k, v, HEADS)

        def sdpa() -> torch.Tensor:
            heads = (blocks.split_heads(t, HEADS) for t in (q, k, v))
            return blocks.merge_heads(torch.nn.functional.scaled_dot_product_attention(*heads))

        with torch.no_grad():
            diff = (kernel().float() - sdpa().float()).abs().max().item()
            ours, theirs = graphed_ms(kernel), graphed_ms(sdpa)
        total = totals.setdefault(model, [0.0, 0.0])
        total[0] += layers * ours
        total[1] += layers * theirs
        print(f"| {model} | {level} x{layers} | {frames * tokens} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | "
              f"{theirs / ours:.2f}x | {diff:.1e} |", flush=True)
        del q, k, v
    for model, (ours, theirs) in totals.items():
        print(f"per {model} call: kernel {ours:.3f} ms, SDPA {theirs:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--text-only", action="store_true", help="only the text cross-attention table")
    args = parser.parse_args()
    if not fused.kernels_available("cuda" if torch.cuda.is_available() else "cpu"):
        sys.exit("bench/attention.py needs an NVIDIA GPU and Triton")
    dtype = DTYPES[args.dtype]
    if args.text_only:
        text_attention_table(dtype)
        return
    print(f"{args.dtype}, CFG batch 2 x {args.frames} frames, {HEADS} heads; median ms of {args.iters} calls")
    print("| level | width | kernel ms | SDPA on gathered keys ms | speed-up | max abs difference |")
    print("|---|---|---|---|---|---|")
    for level, (width, tokens) in LEVELS.items():
        torch.manual_seed(0)
        attn = blocks.Attention(width, HEADS).cuda().to(dtype)
        x = torch.randn(2 * args.frames, tokens, width, device="cuda", dtype=dtype)  # (b f) l c

        def call() -> torch.Tensor:
            return blocks.sparse_causal_attention(attn, x, args.frames)

        with torch.no_grad():
            out = call()
            kernel = statistics.median(time_calls(call, args.iters))
            with without_kernels():
                ref = call()
                sdpa = statistics.median(time_calls(call, args.iters))
        diff = (out.float() - ref.float()).abs().max().item()
        print(f"| {level} | {width} | {kernel:.3f} | {sdpa:.3f} | {sdpa / kernel:.2f}x | {diff:.1e} |", flush=True)
        del attn, x, out, ref
        torch.cuda.empty_cache()
    text_attention_table(dtype)


if __name__ == "__main__":
    main()
