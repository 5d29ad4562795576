"""Reading LaVie UNet checkpoints: the released `.pt` files, converted `.safetensors`, or state dicts.

The kind (base / interpolation / VSR) and the architecture are read from the keys; a file that does not
fit fails with a message naming the file, what it looked like and the first offending keys.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch

from .config import UNetConfig
from .unet import LaVieUNet

StateDict = dict[str, torch.Tensor]
Source = Union[str, os.PathLike, Mapping[str, Any]]

CONFIG_METADATA_KEY = "lavie_config"
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
KIND_NAMES = {"base": "LaVie base (text-to-video)", "interpolation": "LaVie interpolation", "vsr": "LaVie VSR"}


class CheckpointError(ValueError):
    """A file or state dict that is not a loadable LaVie UNet."""


def _describe(source: Source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "state dict"


def read_checkpoint(source: Source) -> tuple[StateDict, dict[str, str]]:
    """Tensors and string metadata from a path or a mapping; unwraps `{'ema': ...}` / `{'state_dict': ...}`."""
    metadata: dict[str, str] = {}
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    metadata = dict(f.metadata() or {})
                    data = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        elif path.suffix in TORCH_SUFFIXES:
            try:
                # Read into memory (not mmap): weights are re-laid-out tensor by tensor below, and a
                # mapping would keep every touched page resident beside the copies.
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for truncated, foreign or pickled-code files
                raise CheckpointError(
                    f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:300]})"
                ) from e
        else:
            raise CheckpointError(
                f"{path}: unsupported file type {path.suffix!r}; expected .safetensors or one of {TORCH_SUFFIXES}"
            )
    for wrapper in ("ema", "state_dict"):
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
            break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{_describe(source)}: holds a {type(data).__name__}, not a state dict")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{_describe(source)}: contains no tensors")
    return tensors, metadata


def detect_kind(sd: Mapping[str, torch.Tensor], name: str = "state dict") -> str:
    """'base', 'interpolation' or 'vsr' from the keys, or a CheckpointError saying what the file looks like."""
    keys = sd.keys()
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        raise CheckpointError(
            f"{name}: this is a Stable Diffusion checkpoint in the original (LDM/ComfyUI) layout, not a LaVie UNet. "
            "Load it with ComfyUI's checkpoint loader for its CLIP and VAE; the LaVie loader needs "
            "lavie_base.pt, lavie_interpolation.pt or lavie_vsr.pt."
        )
    if any("lora_" in k or ".lora." in k or k.endswith(".alpha") for k in keys):
        raise CheckpointError(f"{name}: this is a LoRA file, not a LaVie UNet; use the LaVie LoRA loader")
    if not any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
        if any(k.startswith(("encoder.", "decoder.")) for k in keys):
            raise CheckpointError(f"{name}: this is a VAE, not a LaVie UNet")
        raise CheckpointError(
            f"{name}: no UNet keys found (no 'conv_in.weight'/'down_blocks.*'); first keys: {sorted(keys)[:5]}"
        )
    has_temporal = any(".attn_temp." in k or ".attn_temporal." in k for k in keys)
    if not has_temporal:
        raise CheckpointError(
            f"{name}: a 2-D image UNet (diffusers layout, no temporal layers), not a LaVie video UNet"
        )
    if "class_embedding.weight" in sd or any(k.startswith("mid_temporal_block.") for k in keys):
        return "vsr"
    conv_in = sd.get("conv_in.weight")
    if (conv_in is not None and conv_in.shape[1] == 8) or not any(k.endswith("rotary_emb.freqs") for k in keys):
        return "interpolation"
    return "base"


def _level_count(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_config(sd: Mapping[str, torch.Tensor], kind: str) -> UNetConfig:
    """The architecture implied by the tensor names and shapes; official values where shapes are silent."""
    keys = list(sd.keys())
    preset = UNetConfig.preset(kind)
    levels = _level_count(keys, "down_blocks")
    chans = tuple(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels))
    layers = _level_count(keys, "down_blocks.0.resnets")
    attention = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
    cross = next(int(v.shape[1]) for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    linear = next(v.ndim == 2 for k, v in sd.items() if k.endswith("proj_in.weight"))
    rel = [v for k, v in sd.items() if k.endswith("relative_attention_bias.weight")]
    freqs = [v for k, v in sd.items() if k.endswith("rotary_emb.freqs")]
    text_only = []
    for i in range(levels):
        key = f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn1.to_k.weight"
        if key not in sd or cross == chans[i]:
            # Shapes cannot tell a text attention from a self-attention here: follow the released layout.
            text_only.append(preset.text_only_attention[i] if len(preset.text_only_attention) == levels else False)
        else:
            text_only.append(int(sd[key].shape[1]) == cross)
    overrides: dict[str, Any] = dict(
        in_channels=int(sd["conv_in.weight"].shape[1]) if "conv_in.weight" in sd else preset.in_channels,
        out_channels=int(sd["conv_out.weight"].shape[0]) if "conv_out.weight" in sd else preset.out_channels,
        block_out_channels=chans,
        attention_levels=attention,
        layers_per_block=layers,
        cross_attention_dim=cross,
        linear_projection=linear,
        text_only_attention=tuple(text_only),
    )
    if rel:
        overrides["heads"] = int(rel[0].shape[1])
        overrides["rel_pos_buckets"] = int(rel[0].shape[0])
    if freqs:
        overrides["rotary_dim"] = 2 * int(freqs[0].shape[0])
    if "class_embedding.weight" in sd:
        overrides["num_noise_levels"] = int(sd["class_embedding.weight"].shape[0])
    fields = {**preset.__dict__, **overrides}
    return UNetConfig(**fields)


def _examples(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_keys(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], name: str, kind: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [
        f"{k!r}: expected {list(expected[k])}, got {list(sd[k].shape)}"
        for k in sorted(set(expected) & set(sd))
        if tuple(sd[k].shape) != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:3])})")
    raise CheckpointError(
        f"{name}: looks like a {KIND_NAMES[kind]} UNet checkpoint but does not match it: "
        + "; ".join(problems)
        + ". The file may be truncated, from another model, or edited; nothing was loaded."
    )


def load_unet(
    source: Source,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: UNetConfig | None = None,
) -> LaVieUNet:
    """Build the UNet that `source` holds and load it strictly.

    `source` is a path (`.safetensors`, or `.pt`/`.pth`/`.ckpt` read with `weights_only=True`) or a state
    dict, bare or wrapped as `{'ema': sd}` / `{'state_dict': sd}`. Weights are moved into the model one
    tensor at a time (built on the meta device, then assigned), so peak memory stays near one copy.
    """
    name = _describe(source)
    sd, metadata = read_checkpoint(source)
    kind = detect_kind(sd, name)
    if config is None and CONFIG_METADATA_KEY in metadata:
        try:
            config = UNetConfig.from_json(metadata[CONFIG_METADATA_KEY])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{name}: invalid {CONFIG_METADATA_KEY} metadata ({e})") from e
    if config is None:
        try:
            config = infer_config(sd, kind)
        except (KeyError, StopIteration, ValueError) as e:
            raise CheckpointError(f"{name}: cannot read the architecture of this {KIND_NAMES[kind]} UNet ({e})") from e
    if config.kind != kind:
        raise CheckpointError(f"{name}: config says kind {config.kind!r} but the keys are those of a {kind} UNet")
    with torch.device("meta"):
        model = LaVieUNet(config)
    check_keys(model, sd, name, kind)
    device = torch.device(device)
    converted: StateDict = {}
    layouts = {4: torch.channels_last, 5: torch.channels_last_3d}  # conv weights, as the activations
    for key in list(sd):
        tensor = sd.pop(key)  # dropped as soon as converted, so peak memory stays near one copy
        # Rotary frequencies stay float32: they multiply frame positions, where half precision drifts.
        target = torch.float32 if key.endswith("rotary_emb.freqs") else dtype
        tensor = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
        converted[key] = tensor.contiguous(memory_format=layouts.get(tensor.ndim, torch.contiguous_format))
    model.load_state_dict(converted, strict=True, assign=True)
    return model.use_channels_last().eval().requires_grad_(False)


def save_unet(model: LaVieUNet, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write a `.safetensors` file that carries the config, so any architecture loads back exactly."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in model.state_dict().items():
        keep = dtype is None or not v.is_floating_point() or k.endswith("rotary_emb.freqs")
        # Shared modules appear under several names; each entry needs its own storage in safetensors.
        sd[k] = (v if keep else v.to(dtype)).detach().to("cpu").contiguous().clone()
    save_file(sd, str(path), metadata={CONFIG_METADATA_KEY: model.config.to_json(), "format": "pt"})
