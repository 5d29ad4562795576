"""One sparse causal attention layer of the interpolation model per level (projections included): the
key-frame kernel against SDPA on gathered keys, on a CUDA GPU at the paper's sizes.

    python bench/attention.py [--dtype fp16|bf16] [--iters 30] [--frames 61]
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


@contextlib.contextmanager
def without_kernels() -> Iterator[None]:
    usable = fused.kernels_usable
    fused.kernels_usable = lambda *_: False
    try:
        yield
    finally:
        fused.kernels_usable = usable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--frames", type=int, default=61)
    args = parser.parse_args()
    if not fused.kernels_available("cuda" if torch.cuda.is_available() else "cpu"):
        sys.exit("bench/attention.py needs an NVIDIA GPU and Triton")
    dtype = DTYPES[args.dtype]
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


if __name__ == "__main__":
    main()
