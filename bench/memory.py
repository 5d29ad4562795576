"""Activation memory of the three LaVie UNets on a CUDA GPU: measured against the meta-device trace.

    python bench/memory.py [--dtype fp16|bf16|fp32] [--cudnn-benchmark] [--json FILE]

For each case (paper sizes, VSR chunks and tiles, one text or two), one eager UNet call with the fused
kernels and one without: the peak of torch.cuda.max_memory_allocated minus what the weights and inputs
hold, on the shape's first call and on the second, next to `lavie_core.memory.unet_activation_peak` for
the same path. `pipeline.estimate_unet_memory` adds its margin on top of the trace. Without
`--cudnn-benchmark` cuDNN picks algorithms as ComfyUI runs it, by heuristics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import DTYPES, random_model  # noqa: E402

from lavie_core import fused  # noqa: E402  (speed.py puts the project root on sys.path)
from lavie_core.memory import unet_activation_peak  # noqa: E402

# kind, latent frames, height, width, texts (2: guidance batched)
CASES = [
    ("base", 16, 40, 64, 2), ("base", 16, 40, 64, 1),
    ("interpolation", 61, 40, 64, 2), ("interpolation", 61, 40, 64, 1),
    ("vsr", 8, 320, 512, 2), ("vsr", 8, 320, 512, 1), ("vsr", 5, 320, 512, 2), ("vsr", 4, 320, 512, 2),
    ("vsr", 1, 320, 512, 2), ("vsr", 8, 256, 256, 2), ("vsr", 8, 128, 128, 2),
]
GIB = 2**30


def peak_of_call(fn) -> int:
    """Peak bytes allocated during `fn()` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/memory.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} dtype {args.dtype} "
          f"cudnn.benchmark {args.cudnn_benchmark}; GiB above weights and inputs")
    usable = fused.kernels_usable
    rows, model = [], None
    for kind, frames, h, w, texts in CASES:
        if model is None or model.config.kind != kind:
            model = None
            torch.cuda.empty_cache()
            model = random_model(kind, device).to(dtype)
        config = model.config
        x = torch.randn(1, config.in_channels, frames, h, w, device=device, dtype=dtype)
        context = torch.randn(texts, 77, config.cross_attention_dim, device=device, dtype=dtype)
        t = torch.full((1,), 500.0, device=device)
        noise_level = 20 if config.num_noise_levels is not None else None
        for kernels in (True, False):
            fused.kernels_usable = usable if kernels else (lambda x: False)
            try:
                first, second = (peak_of_call(lambda: model(x, t, context, noise_level)) for _ in range(2))
            finally:
                fused.kernels_usable = usable
            traced = unet_activation_peak(config, frames, h, w, texts, dtype, "cuda", kernels)
            row = dict(kind=kind, frames=frames, height=h, width=w, texts=texts, kernels=kernels,
                       first_gib=first / GIB, second_gib=second / GIB, traced_gib=traced / GIB,
                       measured_over_traced=max(first, second) / traced)
            rows.append(row)
            print(f"{kind:13s} {frames:2d} x {h}x{w} texts {texts} kernels {kernels!s:5s}: measured "
                  f"{first / GIB:6.2f} first call, {second / GIB:6.2f} second; traced {traced / GIB:6.2f} "
                  f"(x{row['measured_over_traced']:.3f})", flush=True)
        del x, context
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
