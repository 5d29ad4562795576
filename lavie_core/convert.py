"""Convert a released LaVie checkpoint (`.pt` pickle) into `.safetensors`.

    python -m lavie_core.convert lavie_base.pt lavie_base.safetensors [--dtype fp16]

The result loads without unpickling anything and carries its architecture in the file's metadata.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .loading import CheckpointError, KIND_NAMES, load_unet, save_unet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def convert(src: str | Path, dst: str | Path, dtype: str | None = None) -> str:
    """Convert `src` to `dst`; returns a one-line description of what was written."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output must end in .safetensors")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    model = load_unet(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_unet(model, dst, dtype=DTYPES[dtype] if dtype else None)
    params = sum(p.numel() for p in model.parameters())
    return (
        f"{src.name}: {KIND_NAMES[model.config.kind]} UNet, {params / 1e6:.1f}M parameters "
        f"-> {dst} ({dst.stat().st_size / 2**20:.0f} MiB, {dtype or 'fp32'})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavie_core.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="official checkpoint: lavie_base.pt, lavie_interpolation.pt or lavie_vsr.pt")
    parser.add_argument("dst", help="output path ending in .safetensors")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this precision (default: as loaded, fp32)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.dst, args.dtype))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
