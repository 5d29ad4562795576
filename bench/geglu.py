"""The feed-forward's GEGLU projection at every shape the three UNets run it at (paper sizes, guidance batched):
`fused.geglu` against cuBLAS's product alone, and optionally against another version's kernel, on a CUDA GPU.

    python bench/geglu.py [--against OTHER/lavie_core/fused.py] [--dtype fp16|bf16]

Prints, per shape, the kernel's time (20 calls back to back between CUDA events, after 3 warm-up calls, so the
host's launch work overlaps the GPU's as in a stage), cuBLAS's `x @ weight.T + bias` alone
(which would still have to write the 2x-wide product and apply the GELU), the error relative to float32
arithmetic, and the totals of one UNet call. `--against` loads that file's `_launch_geglu` (e.g. from
`git show OLD:lavie_core/fused.py > /tmp/fused_old.py`) and times it on the same inputs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import DTYPES  # noqa: E402

from lavie_core import fused  # noqa: E402  (speed.py puts the project root on sys.path)

# (model, level, rows, width k, inner n, layers per call): rows are frames x tokens of the guided batch (2
# texts; base 16 and interpolation 61 frames of 40x64 latents, VSR an 8-frame chunk of 320x512), halved per
# level; the deepest level's layer count includes the middle block.
SHAPES = [
    ("base", "L0", 2 * 16 * 2560, 320, 1280, 5), ("base", "L1", 2 * 16 * 640, 640, 2560, 5),
    ("base", "L2", 2 * 16 * 160, 1280, 5120, 5), ("base", "mid", 2 * 16 * 40, 1280, 5120, 1),
    ("interpolation", "L0", 2 * 61 * 2560, 320, 1280, 5), ("interpolation", "L1", 2 * 61 * 640, 640, 2560, 5),
    ("interpolation", "L2", 2 * 61 * 160, 1280, 5120, 5), ("interpolation", "mid", 2 * 61 * 40, 1280, 5120, 1),
    ("vsr", "L1", 2 * 8 * 40960, 512, 2048, 5), ("vsr", "L2", 2 * 8 * 10240, 512, 2048, 5),
    ("vsr", "L3", 2 * 8 * 2560, 1024, 4096, 6),
]


def ms_per_call(fn, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def load_launcher(path: Path):
    """`_launch_geglu` of another version's fused.py. Loaded as it is, that file would register its custom
    ops under this version's names (`lavie::geglu`), and this version's op then had no schema left to call
    (torch 2.11): it is loaded with `torch.library.custom_op` out of sight, so it defines none (its launcher
    needs none)."""
    spec = importlib.util.spec_from_file_location("fused_against", path)
    module = importlib.util.module_from_spec(spec)
    custom_op = torch.library.custom_op
    del torch.library.custom_op
    try:
        spec.loader.exec_module(module)
    finally:
        torch.library.custom_op = custom_op
    return module._launch_geglu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another version's lavie_core/fused.py to time as well")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and fused.kernels_available("cuda") and fused.TensorDescriptor is not None):
        print("bench/geglu.py needs an NVIDIA GPU and Triton >= 3.3", file=sys.stderr)
        return 1
    other = load_launcher(args.against) if args.against else None
    dtype = DTYPES[args.dtype]
    totals: dict[tuple[str, str], float] = {}
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} {args.dtype}; ms per projection")
    for model, level, m, k, n, count in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
        weight = torch.randn(2 * n, k, device="cuda", dtype=dtype, generator=g) * k**-0.5
        bias = torch.randn(2 * n, device="cuda", dtype=dtype, generator=g) * 0.1
        value, gate = torch.addmm(bias.float(), x.float(), weight.float().t()).chunk(2, dim=-1)
        expected = value * F.gelu(gate)
        del value, gate
        runs = {"kernel": lambda: fused.geglu(x, weight, bias), "cublas_product": lambda: F.linear(x, weight, bias)}
        if other is not None:
            runs["against"] = lambda: other(x, weight, bias)
        row = []
        for label, fn in runs.items():
            ms = ms_per_call(fn)
            totals[(model, label)] = totals.get((model, label), 0.0) + count * ms
            error = "" if label == "cublas_product" else f" (rel L2 {((fn().float() - expected).norm() / expected.norm()).item():.2g})"
            row.append(f"{label} {ms:.3f}{error}")
        print(f"{model} {level} M={m} K={k} N={n} x{count}: " + ", ".join(row), flush=True)
    for model in dict.fromkeys(s[0] for s in SHAPES):
        parts = ", ".join(f"{label} {totals[(model, label)]:.2f}" for label in ("kernel", "against", "cublas_product")
                          if (model, label) in totals)
        print(f"per {model} call: {parts} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
