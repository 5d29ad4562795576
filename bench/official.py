"""The official LaVie UNets beside this project's, for `bench/speed.py --official PATH`.

PATH is a checkout of Vchitect/LaVie (never part of this project). Its model code is imported from there,
built at a stage's config, given this project's weights (the state-dict names are the same) and called
as the official pipelines call it, so both run on the same weights and inputs and their outputs can be
compared as well as timed.

The official code needs its own pinned libraries: diffusers 0.16 (which needs huggingface_hub < 0.26, and
transformers absent or from its time), einops, rotary-embedding-torch, and torchvision for VSR.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lavie_core import UNetConfig  # noqa: E402

CLASS_NAMES = {"base": "UNet3DConditionModel", "interpolation": "UNet3DConditionModel", "vsr": "UNet3DVSRModel"}
REQUIREMENTS = "diffusers==0.16.0 'huggingface_hub<0.26' einops rotary-embedding-torch torchvision, without a newer transformers or jax"


def missing_sources(repo: str | Path, stages: list[str]) -> list[str]:
    """The files of the official checkout at `repo` that `stages` need and that are not there."""
    repo = Path(repo)
    # Each stage's code lives in a folder named after it.
    needed = [repo / kind / "models" / "unet.py" for kind in stages]
    if "vsr" in stages:
        needed.append(repo / "vsr" / "configs" / "unet_3d_config.json")
    return [str(path) for path in needed if not path.is_file()]


def official_config(cfg: UNetConfig, repo: Path) -> dict:
    """Constructor arguments of the official UNet for `cfg`, as the official scripts build it.

    Base and interpolation: the SD v1-4 UNet config with 3-D blocks (`from_pretrained_2d`);
    VSR: the repo's `vsr/configs/unet_3d_config.json` with `video_condition` off (`vsr/sample.py`).
    """
    down = ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(cfg.attention_levels)]
    geometry = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=list(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.heads,  # the official code reads it as the number of heads
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
    )
    if cfg.kind == "vsr":
        path = repo / "vsr" / "configs" / "unet_3d_config.json"
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        return {
            **config,
            **geometry,
            "video_condition": False,
            "only_cross_attention": list(cfg.text_only_attention),
            "num_class_embeds": cfg.num_noise_levels,
            "max_noise_level": cfg.max_noise_level,
        }
    return {
        "sample_size": 64,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        **geometry,
        "use_first_frame": cfg.spatial_attention == "sparse_causal",
    }


def _import_official(kind: str, repo: Path):
    """The stage's `models.unet` module, imported from its own folder.

    The three stages each ship a package named `models`, so each import gets a clean slate and leaves
    sys.path and sys.modules as they were.
    """
    stage_dir = repo / kind
    source = stage_dir / "models" / "unet.py"
    def ours(name: str) -> bool:
        return name == "models" or name.startswith("models.")

    saved_path = list(sys.path)
    saved_modules = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
    sys.path.insert(0, str(stage_dir))
    try:
        return importlib.import_module("models.unet")
    except Exception as error:
        # The official modules retry failed relative imports as absolute ones: the first failure is the cause.
        cause = error
        while cause.__context__ is not None:
            cause = cause.__context__
        raise RuntimeError(
            f"importing {source} failed ({type(cause).__name__}: {cause}); the official code needs {REQUIREMENTS}"
        ) from error
    finally:
        sys.path[:] = saved_path
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)


def load_official(kind: str, repo: str | Path, weights: dict[str, torch.Tensor], cfg: UNetConfig | None = None) -> nn.Module:
    """The official UNet of `kind` from the checkout at `repo`, holding `weights` (this project's state dict)."""
    repo = Path(repo)
    cfg = cfg or UNetConfig.preset(kind)
    missing = missing_sources(repo, [kind])
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing: is {repo} a checkout of Vchitect/LaVie?")
    module = _import_official(kind, repo)
    model = getattr(module, CLASS_NAMES[kind]).from_config(official_config(cfg, repo))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the official {kind} UNet and this project's differ: {len(missing)} keys missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.eval().requires_grad_(False)


def official_forward(
    kind: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """One call with this project's UNet arguments, passed as the official pipelines pass them.

    VSR's `x` is `[latent 4, low-res RGB 3]` on channels; the official model takes the low-res video
    apart and the noise level as `class_labels`. Inputs come in the model's dtype, as the official pipelines
    hand them over (its layers do not cast them).
    """
    dtype = next(model.parameters()).dtype
    x, ctx = x.to(dtype), ctx.to(dtype)
    if kind == "vsr":
        return model(x[:, :4], t, x[:, 4:], encoder_hidden_states=ctx, class_labels=noise).sample
    return model(x, t, encoder_hidden_states=ctx).sample
