"""Where one UNet call spends its GPU time: totals per kind of kernel (convolution, matmul, attention,
compiled Triton kernels, other), then the torch.profiler table grouped by kernel and input shapes.

    python bench/profile_unet.py --stage vsr --frames 2 [--dtype fp16] [--compile] [--rows 30] [--kernels 40]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import DTYPES, add_cudnn_benchmark_option, make_inputs, random_model, time_calls  # noqa: E402

from lavie_core import compile_unet  # noqa: E402  (speed.py puts the project root on sys.path)


def kernel_kind(name: str) -> str:
    """Coarse class of a CUDA kernel from its name (cuDNN, cuBLAS/nvjet, flash/cuDNN SDPA, Inductor)."""
    n = name.lower()
    if n.startswith("triton"):  # Inductor names fused kernels after their ops, "convolution" included
        return "triton"
    if any(k in n for k in ("flash", "fmha", "attention")):
        return "attention"
    if any(k in n for k in ("fprop", "conv", "implicit", "dgrad")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_", "sm80_")):
        return "matmul"
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", default="base", choices=["base", "interpolation", "vsr"])
    parser.add_argument("--frames", type=int, default=None, help="fewer frames than the paper's, to profile faster")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rows", type=int, default=30, help="rows of the operator table")
    parser.add_argument("--kernels", type=int, default=40, help="how many kernels to list by GPU time")
    parser.add_argument("--cfg-input", default="shared", choices=["shared", "doubled"])
    add_cudnn_benchmark_option(parser)
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    device = torch.device("cuda")
    model = random_model(args.stage, device).to(DTYPES[args.dtype])
    x, t, ctx, noise = make_inputs(args.stage, device, cfg_input=args.cfg_input)
    if args.frames:
        x = x[:, :, : args.frames]
    fn = compile_unet(model) if args.compile else model
    with torch.no_grad():
        times = time_calls(lambda: fn(x, t, ctx, noise), iters=3)
        print(f"{args.stage} frames={x.shape[2]} compile={args.compile}: {min(times):.1f} ms/call")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            fn(x, t, ctx, noise)
            torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    # Rows named "## ... ##" annotate a compiled graph's whole call (its device time is its kernels' sum).
    kernels = [
        e for e in prof.key_averages()
        if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("## ")
    ]
    for event in kernels:
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.device_time_total / 1e3
    print("GPU ms by kernel kind: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(f"\n{args.kernels} most expensive kernels: total ms, calls, name")
    for event in sorted(kernels, key=lambda e: -e.device_time_total)[: args.kernels]:
        print(f"{event.device_time_total / 1e3:8.2f} {event.count:4d}  {event.key[:160]}")
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=50, max_shapes_column_width=90
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
