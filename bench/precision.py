"""Where a half-precision UNet call's error against the float32 path comes from, by layer group.

    python bench/precision.py [--stage base|interpolation|vsr] [--dtype bf16|fp16] [--device cpu|cuda]
                              [--frames 4] [--height 16] [--width 16]

Same random weights as bench/speed.py, one guided call (two texts). Each row rounds one thing to the dtype
and computes the rest in float32, so it measures that source alone:
- weights: the parameters of one group of layers (the others stay exact);
- activations: on weights already rounded, the outputs of one kind of module, as the dtype would store
  them (matmuls and convolutions accumulate in float32 either way).
Were the sources independent, the squares of a part's rows would add up to that part's total row. The
defaults are small enough for a CPU (the paper's widths at 4 frames of 16x16 latents); pass the paper's
sizes (16 frames, 40x64) with `--device cuda`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import DTYPES, random_model, rel_l2  # noqa: E402

from lavie_core import UNetConfig, blocks  # noqa: E402

# First match wins: a parameter's group from its name.
WEIGHT_GROUPS = [
    ("temporal layers", ("temp",)),
    ("frame self-attention", ("attn1",)),
    ("text attention", ("attn2",)),
    ("feed-forward", (".ff.",)),
    ("transformer proj_in / proj_out", ("proj_in", "proj_out")),
    ("norm scales and shifts", ("norm",)),
    ("time embedding", ("time_emb",)),
    ("resnet convolutions", ("resnets",)),
    ("up / downsamplers", ("sample",)),
    ("conv_in, conv_out and the rest", ("",)),
]

ACTIVATION_KINDS = [
    ("convolution outputs", (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
    ("linear outputs", (nn.Linear,)),
    ("norm outputs", (nn.GroupNorm, nn.LayerNorm)),
    ("resnet block outputs", (blocks.ResnetBlock, blocks.TemporalConvBlock)),
    ("transformer block outputs", (blocks.TransformerBlock,)),
    ("spatial transformer outputs", (blocks.SpatialTransformer,)),
    ("attention outputs", (blocks.Attention,)),
    ("GEGLU outputs", (blocks.GEGLU,)),
]


def weight_group(name: str) -> str:
    return next(group for group, keys in WEIGHT_GROUPS if any(k in name for k in keys))


Row = tuple[str, str, float]


def error_sources(
    stage: str, dtype: torch.dtype, device: torch.device, frames: int, height: int, width: int, *, tiny: bool = False
) -> list[Row]:
    """(part, what is rounded, relative L2 against the float32 call) for each source, then the totals."""
    config = UNetConfig.tiny(stage) if tiny else UNetConfig.preset(stage)
    model = random_model(stage, device, config=config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_channels, frames, height, width, generator=g).to(device)
    ctx = torch.randn(2, 77, config.cross_attention_dim, generator=g).to(device)
    t = torch.tensor([500], device=device)
    noise = torch.tensor([50], device=device) if config.num_noise_levels else None

    def call(net: nn.Module = model, cast: torch.dtype = torch.float32) -> torch.Tensor:
        with torch.no_grad():
            return net(x.to(cast), t, ctx.to(cast), noise).float()

    rows: list[Row] = []
    ref = call()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for group, _ in WEIGHT_GROUPS:
            # Only this group's exact values are kept aside (all of the base UNet's would be 3.5 GB in float32).
            exact = {n: p.clone() for n, p in params.items() if weight_group(n) == group}
            for n, value in exact.items():
                params[n].copy_(value.to(dtype))
            rows.append(("weights", f"{group} ({sum(v.numel() for v in exact.values()) / 1e6:.1f} M)", rel_l2(call(), ref)))
            for n, value in exact.items():
                params[n].copy_(value)
        for p in params.values():
            p.copy_(p.to(dtype))
    rounded_ref = call()
    rows.append(("weights", "all weights rounded", rel_l2(rounded_ref, ref)))

    def round_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype).float()

    for kind, types in ACTIVATION_KINDS:
        hooks = [m.register_forward_hook(round_output) for m in model.modules() if isinstance(m, types)]
        rows.append(("activations", kind, rel_l2(call(), rounded_ref)))
        for h in hooks:
            h.remove()
    name = str(dtype).removeprefix("torch.")
    out = call(model.to(dtype), dtype)
    rows.append(("activations", f"{name} compute on the rounded weights", rel_l2(out, rounded_ref)))
    rows.append(("whole call", f"{name} against float32", rel_l2(out, ref)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", default="base", choices=["base", "interpolation", "vsr"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--height", type=int, default=16, help="latent rows")
    parser.add_argument("--width", type=int, default=16, help="latent columns")
    args = parser.parse_args(argv)
    rows = error_sources(
        args.stage, DTYPES[args.dtype], torch.device(args.device), args.frames, args.height, args.width
    )
    print(f"{args.stage}, {args.dtype}, {args.frames} frames of {args.height}x{args.width} latents, {args.device}: "
          "relative L2 against the float32 call")
    print("| part | rounded | rel L2 |\n|---|---|---|")
    for part, what, err in rows:
        print(f"| {part} | {what} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
