"""Stable Diffusion 1.x LoRA / LyCORIS files applied to the spatial layers of a LaVie UNet.

The base and interpolation UNets carry SD v1-4's 2-D layers under diffusers names, so personalisation
files made for SD 1.x fit them. Supported layouts (detected per key):

- kohya / A1111: ``lora_unet_<diffusers path with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, and the same with LDM paths (``lora_unet_input_blocks_1_1_...``); ``lycoris_`` prefix too;
- diffusers / PEFT: ``[unet.|base_model.model.]<path>.lora_A.weight`` / ``.lora_B.weight``,
  ``<path>.lora.down/up.weight``, ``<path>.lora_linear_layer.down/up.weight`` and the attention-processor
  form ``<attn>.processor.to_q_lora.down.weight``; LDM paths under ``diffusion_model.``;
- LyCORIS: LoCon (``lora_down``/``lora_up`` on convolutions, optional Tucker ``lora_mid``), LoHa
  (``hada_w1_a`` ...), LoKr (``lokr_w1`` ...) and full differences (``diff``, ``diff_b``).

Temporal layers (attn_temp, norm_temp, the VSR temporal blocks) are never changed: a key aimed at one is
reported. Text-encoder keys (``lora_te_*``, ``text_encoder.*``) are reported as not applicable. Keys that
match nothing are reported with examples. A file made for another architecture (SDXL, SD 2.x) raises
``ValueError`` naming the file, the key and the expected and found shapes.

Patches change only the touched tensors in place; ``remove()`` copies the saved originals back, so the
model is bit-for-bit what it was. Scale per module: ``strength * alpha / rank`` (no alpha: 1).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "LoraError",
    "LoraModule",
    "ParsedLora",
    "LoraReport",
    "LoraPatch",
    "load_lora_file",
    "parse_lora",
    "target_table",
    "is_temporal",
    "lora_deltas",
    "apply_loras",
]

StateDict = dict[str, Tensor]
LoraSource = Union[str, os.PathLike, Mapping[str, Tensor]]
LoraSpec = Union[tuple[LoraSource, float], tuple[LoraSource, float, str]]

EXAMPLES = 5


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this UNet (another architecture, wrong shapes)."""


# ----------------------------------------------------------------------------- key grammar
# Longest suffixes first: ".lora.down.weight" must not be read as ".down.weight".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".dora_scale", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".alpha", "alpha"),
    (".w_norm", "norm"),
    (".b_norm", "norm"),
    (".on_input", "unsupported"),
)

_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                  "te.", "te1.", "te2.", "cond_stage_model.", "conditioner.", "lora_prior_te_")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_")
_DOTTED_PREFIXES = ("unet.base_model.model.", "base_model.model.", "unet.", "model.diffusion_model.",
                    "diffusion_model.", "lora_unet.")

# Signatures of UNets that are not SD 1.x. SD 1.x transformers hold one block (index 0); SDXL's hold
# 2 or 10; SDXL also has the size/crop embedding (label_emb / add_embedding).
_SDXL_PATTERNS = (
    re.compile(r"transformer_blocks[._]([1-9]\d*)[._]"),
    re.compile(r"(^|[._])(label_emb[._]0|add_embedding)[._]"),
)
_TEMPORAL_PARTS = ("attn_temp", "norm_temp", "attn_temporal", "norm_temporal", "resblock_temporal",
                   "temporal_blocks", "mid_temporal_block", "time_rel_pos_bias", "temporal_rotary_emb",
                   "motion_module", "temporal_transformer")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


@dataclass
class LoraModule:
    """All tensors a file holds for one target module, by part name (down, up, mid, alpha, hada_*, ...)."""

    key: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    source_keys: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        parts = self.tensors
        if "dora_scale" in parts or "norm" in parts or "unsupported" in parts:
            return "unsupported"
        if "up" in parts and "down" in parts:
            return "lora"
        if "hada_w1_a" in parts:
            return "loha"
        if any(p.startswith("lokr_") for p in parts):
            return "lokr"
        if "diff" in parts or "diff_b" in parts:
            return "diff"
        return "incomplete"


@dataclass
class ParsedLora:
    """A LoRA file grouped by module, before it is matched to a model."""

    name: str
    modules: dict[str, LoraModule]
    unrecognised: list[str]
    metadata: dict[str, str]


def load_lora_file(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Tensors and string metadata of a ``.safetensors`` (or weights-only torch) LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise LoraError(f"{path}: holds a {type(data).__name__}, not a LoRA state dict")
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}, {}


def parse_lora(
    state_dict: Mapping[str, Tensor], *, name: str = "LoRA", metadata: Mapping[str, str] | None = None
) -> ParsedLora:
    """Group a LoRA state dict by target module; keys of no known layout land in ``unrecognised``."""
    modules: dict[str, LoraModule] = {}
    unrecognised: list[str] = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            continue
        split = _split_key(key)
        if split is None:
            unrecognised.append(key)
            continue
        module, part = split
        entry = modules.setdefault(module, LoraModule(module))
        entry.tensors[part] = tensor
        entry.source_keys.append(key)
    return ParsedLora(name, modules, unrecognised, dict(metadata or {}))


# ----------------------------------------------------------------------------- model side
def is_temporal(name: str) -> bool:
    """True for the layers LaVie added to SD (they stay frozen under LoRA)."""
    return any(part in name for part in _TEMPORAL_PARTS)


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _ldm_prefixes(config: Any) -> dict[str, str]:
    """diffusers module prefix -> original LDM (``input_blocks``) prefix, for this UNet's layout."""
    levels = len(config.block_out_channels)
    per_level = config.layers_per_block
    attn = config.attention_levels
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "class_embedding": "label_emb", "mid_block.resnets.0": "middle_block.0",
           "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2"}
    index = 1
    for level in range(levels):
        for j in range(per_level):
            out[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if attn[level]:
                out[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for up in range(levels):
        level = levels - 1 - up
        for j in range(per_level + 1):
            out[f"up_blocks.{up}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attn[level]:
                out[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == per_level and up < levels - 1:
                out[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attn[level] else 1}.conv"
            index += 1
    return out


def _to_ldm(name: str, prefixes: Mapping[str, str]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest:
                rest = _RESNET_TO_LDM.get(rest[0], rest[0]).split(".") + rest[1:]
            return ".".join([prefixes[head], *rest])
    return None


def target_table(model: nn.Module) -> dict[str, str]:
    """Every name a LoRA may use for a weight-carrying module of ``model`` -> its diffusers module name.

    Keys are the dotted diffusers name, its underscore form (kohya), the dotted LDM name and its
    underscore form.
    """
    config = getattr(model, "config", None)
    prefixes = _ldm_prefixes(config) if config is not None and hasattr(config, "attention_levels") else {}
    table: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(getattr(module, "weight", None), Tensor):
            continue
        table[name] = name
        table[name.replace(".", "_")] = name
        ldm = _to_ldm(name, prefixes) if prefixes else None
        if ldm is not None:
            table.setdefault(ldm, name)
            table.setdefault(ldm.replace(".", "_"), name)
    return table


def _normalise(key: str) -> tuple[str, str]:
    """(family, bare module path) of a LoRA module key; family is 'text', 'unet' or 'unknown'."""
    if key.startswith(_TEXT_PREFIXES):
        return "text", key
    for prefix in _UNDERSCORE_PREFIXES:
        if key.startswith(prefix):
            return "unet", key[len(prefix):]
    for prefix in _DOTTED_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    # diffusers attention processors: attn1.processor.to_q_lora -> attn1.to_q, to_out_lora -> to_out.0
    key = key.replace(".processor.", ".")
    if key.endswith(".to_out"):
        key += ".0"
    return "unet", key


def _architecture_error(name: str, key: str, why: str) -> LoraError:
    return LoraError(
        f"{name}: this LoRA is not for Stable Diffusion 1.x ({why}; key '{key}'). LaVie's base and "
        "interpolation UNets are SD 1.x (v1-4) models: use an SD 1.x LoRA."
    )


def _check_architecture(parsed: ParsedLora) -> None:
    for key in parsed.modules:
        if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")):
            raise _architecture_error(parsed.name, key, "it has two text encoders, which is SDXL")
        family, _ = _normalise(key)
        if family != "unet":
            continue
        for pattern in _SDXL_PATTERNS:
            if pattern.search(key):
                raise _architecture_error(
                    parsed.name, key, "it targets layers SD 1.x does not have (SDXL layout)"
                )


# ----------------------------------------------------------------------------- deltas
def _scale(entry: LoraModule, rank: int | None, metadata_alpha: float | None) -> float:
    alpha = entry.tensors.get("alpha")
    if alpha is not None:
        value = float(alpha.float().reshape(-1)[0])
    elif metadata_alpha is not None:
        value = metadata_alpha
    else:
        return 1.0
    return value / rank if rank else 1.0


def _tucker(core: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """Rebuild a Tucker-factored conv weight: core `r_out r_in kh kw`, down `r_in in`, up `out r_out`."""
    return torch.einsum("i j h w, j r, p i -> p r h w", core, down, up)


def _flat(t: Tensor) -> Tensor:
    return t.float().reshape(t.shape[0], -1)


def _delta(entry: LoraModule, weight_shape: torch.Size, metadata_alpha: float | None) -> tuple[Tensor, Tensor | None]:
    """(weight delta, bias delta or None), float32, already multiplied by alpha / rank."""
    p = entry.tensors
    kind = entry.kind
    if kind == "lora":
        up, down = p["up"].float(), p["down"].float()
        rank = down.shape[0]
        if "mid" in p:
            delta = _tucker(p["mid"].float(), _flat(down), _flat(up))
        else:
            delta = _flat(up) @ _flat(down)
            if down.ndim == 4:
                delta = delta.reshape(up.shape[0], *down.shape[1:])
        return delta * _scale(entry, rank, metadata_alpha), None
    if kind == "loha":
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            w1 = _tucker(p["hada_t1"].float(), _flat(p["hada_w1_b"]), _flat(p["hada_w1_a"]))
            w2 = _tucker(p["hada_t2"].float(), _flat(p["hada_w2_b"]), _flat(p["hada_w2_a"]))
        else:
            w1 = _flat(p["hada_w1_a"]) @ _flat(p["hada_w1_b"])
            w2 = _flat(p["hada_w2_a"]) @ _flat(p["hada_w2_b"])
        return w1 * w2 * _scale(entry, rank, metadata_alpha), None
    if kind == "lokr":
        rank = None
        if "lokr_w1" in p:
            w1 = p["lokr_w1"].float()
        else:
            w1 = _flat(p["lokr_w1_a"]) @ _flat(p["lokr_w1_b"])
            rank = p["lokr_w1_b"].shape[0]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"].float()
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"].float(), _flat(p["lokr_w2_b"]), _flat(p["lokr_w2_a"]))
            rank = p["lokr_w2_b"].shape[0]
        else:
            w2 = _flat(p["lokr_w2_a"]) @ _flat(p["lokr_w2_b"])
            rank = p["lokr_w2_b"].shape[0]
            if len(weight_shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
        if w2.ndim == 4 and w1.ndim == 2:
            w1 = w1[:, :, None, None]
        scale = _scale(entry, rank, metadata_alpha) if rank is not None else 1.0
        return torch.kron(w1, w2) * scale, None
    if kind == "diff":
        diff = p.get("diff")
        bias = p.get("diff_b")
        return (diff.float() if diff is not None else torch.zeros(weight_shape)), (
            bias.float() if bias is not None else None
        )
    raise LoraError(f"cannot build a delta for module {entry.key} ({kind})")


def _fit(
    delta: Tensor, weight: Tensor, lora_name: str, module_key: str, target: str
) -> Tensor:
    """``delta`` reshaped to ``weight``'s shape, or a LoraError saying what did not fit."""
    shape = weight.shape
    if delta.shape == shape:
        return delta
    if delta.numel() == weight.numel():
        # Linear-shaped deltas on 1x1 convolutions (proj_in/out of SD 2.x style files) and flattened
        # conv factors: same numbers, other view.
        if delta.ndim == 2 and len(shape) == 4 and shape[2:] == (1, 1) and delta.shape == shape[:2]:
            return delta.reshape(shape)
        if delta.ndim == 2 and delta.shape[0] == shape[0]:
            return delta.reshape(shape)
    if (
        target.endswith("conv_in")
        and delta.ndim == 4
        and delta.shape[0] == shape[0]
        and delta.shape[2:] == shape[2:]
        and delta.shape[1] < shape[1]
    ):
        # The interpolation UNet's conv_in has extra input channels (the copied latent) that an SD
        # LoRA knows nothing about: they are left unchanged.
        padded = delta.new_zeros(shape)
        padded[:, : delta.shape[1]] = delta
        return padded
    hint = ""
    if len(shape) == 2 and delta.ndim == 2 and delta.shape[0] == shape[0] and delta.shape[1] != shape[1]:
        hint = (
            f" The input width differs ({delta.shape[1]} vs {shape[1]}); "
            + {1024: "1024-d text cross-attention is SD 2.x.", 2048: "2048-d text cross-attention is SDXL."}.get(
                int(delta.shape[1]), "this file was made for another architecture."
            )
        )
    raise LoraError(
        f"{lora_name}: key '{module_key}' targets {target} whose weight is {list(shape)}, but the LoRA "
        f"gives a delta of shape {list(delta.shape)}.{hint or ' This file was made for another architecture.'}"
    )


def _metadata_alpha(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) from diffusers' ``lora_adapter_metadata`` safetensors entry, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return None, {}
    if isinstance(data, Mapping) and "unet" in data and isinstance(data["unet"], Mapping):
        data = data["unet"]
    if not isinstance(data, Mapping):
        return None, {}
    alpha = data.get("lora_alpha")
    pattern = data.get("alpha_pattern") or {}
    return (float(alpha) if alpha is not None else None), {
        str(k): float(v) for k, v in pattern.items() if isinstance(v, (int, float))
    }


# ----------------------------------------------------------------------------- reports
def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f", ... (+{len(items) - EXAMPLES})" if len(items) > EXAMPLES else "")


@dataclass
class LoraReport:
    """What one LoRA did to the model. Module lists hold the file's module keys (without suffixes)."""

    name: str
    strength: float
    formats: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    temporal: list[str] = field(default_factory=list)
    text_encoder: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return (len(self.temporal) + len(self.text_encoder) + len(self.unmatched) + len(self.unsupported)
                + len(self.unrecognised))

    def summary(self) -> str:
        parts = [f"{self.name} (strength {self.strength:g}, {'/'.join(self.formats) or 'no known layout'}): "
                 f"{len(self.applied)} UNet modules patched"]
        for label, items in (
            ("text-encoder modules not applicable to the UNet", self.text_encoder),
            ("temporal-layer modules left frozen", self.temporal),
            ("modules matching no UNet layer", self.unmatched),
            ("modules of an unsupported type (DoRA, norm-only)", self.unsupported),
            ("keys of no known LoRA layout", self.unrecognised),
        ):
            if items:
                parts.append(f"{len(items)} {label}: {_examples(items)}")
        return "; ".join(parts)


def _format_of(key: str, entry: LoraModule) -> str:
    kind = entry.kind
    if kind in ("loha", "lokr", "diff"):
        return f"lycoris-{kind}"
    source = entry.source_keys[0] if entry.source_keys else key
    if "lora_A" in source or "lora_B" in source:
        return "peft"
    if "_lora.down" in source or "_lora.up" in source:
        return "diffusers-attn-processor"
    if ".lora.down" in source or ".lora_linear_layer" in source:
        return "diffusers"
    if key.startswith("lora_unet_input_blocks") or key.startswith(("lora_unet_output_blocks", "lora_unet_middle_block")):
        return "kohya-ldm"
    if key.startswith(("lora_unet_", "lycoris_")):
        return "lycoris-locon" if "mid" in entry.tensors or entry.tensors["down"].ndim == 4 else "kohya"
    if key.startswith(("diffusion_model.", "model.diffusion_model.")):
        return "ldm"
    return "diffusers"


# ----------------------------------------------------------------------------- applying
def _resolve(spec: Any, index: int) -> tuple[ParsedLora, float]:
    if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
        raise TypeError(f"LoRA #{index}: expected (state_dict or path, strength[, name]), got {spec!r}")
    source, strength = spec[0], spec[1]
    name = spec[2] if len(spec) == 3 else None
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise TypeError(f"LoRA #{index}: strength must be a finite number, got {strength!r}")
    if isinstance(source, (str, os.PathLike)):
        sd, metadata = load_lora_file(source)
        name = name or Path(source).name
    elif isinstance(source, ParsedLora):
        return source, float(strength)
    elif isinstance(source, Mapping):
        sd, metadata = dict(source), {}
        name = name or f"LoRA #{index}"
    else:
        raise TypeError(f"LoRA #{index}: expected a state dict or a file path, got {type(source).__name__}")
    return parse_lora(sd, name=str(name), metadata=metadata), float(strength)


def lora_deltas(
    model: nn.Module, loras: Iterable[Any]
) -> tuple[dict[str, Tensor], list[LoraReport]]:
    """Summed float32 deltas by parameter name (``...to_q.weight``) and one report per LoRA.

    ``loras``: ``(state_dict | path, strength)`` or ``(state_dict | path, strength, name)`` items.
    Every file is validated, strength 0 included; a LoRA with strength 0 contributes no delta.
    """
    table = target_table(model)
    modules = dict(model.named_modules())
    deltas: dict[str, Tensor] = {}
    reports: list[LoraReport] = []
    for index, spec in enumerate(loras):
        parsed, strength = _resolve(spec, index)
        _check_architecture(parsed)
        alpha_default, alpha_pattern = _metadata_alpha(parsed.metadata)
        report = LoraReport(parsed.name, strength, unrecognised=list(parsed.unrecognised))
        pending: list[tuple[str, LoraModule, str]] = []
        unet_keys = 0
        for key, entry in parsed.modules.items():
            family, bare = _normalise(key)
            if family == "text":
                report.text_encoder.append(key)
                continue
            unet_keys += 1
            target = table.get(bare)
            if target is None:
                report.unmatched.append(key)
                continue
            if is_temporal(target):
                report.temporal.append(key)
                continue
            if entry.kind in ("unsupported", "incomplete"):
                report.unsupported.append(key)
                continue
            pending.append((key, entry, target))
        if unet_keys and not pending and not report.temporal and not report.unsupported:
            raise LoraError(
                f"{parsed.name}: none of its {unet_keys} UNet modules matches a layer of this "
                f"{getattr(getattr(model, 'config', None), 'kind', '')} UNet (examples: "
                f"{_examples(report.unmatched)}); it was made for another architecture."
            )
        for key, entry, target in pending:
            module = modules[target]
            weight = module.weight
            metadata_alpha = alpha_default
            for pattern, value in alpha_pattern.items():
                if pattern in target:
                    metadata_alpha = value
            delta, bias_delta = _delta(entry, weight.shape, metadata_alpha)
            delta = _fit(delta, weight, parsed.name, key, target)
            fmt = _format_of(key, entry)
            if fmt not in report.formats:
                report.formats.append(fmt)
            report.applied.append(key)
            if strength == 0:
                continue
            _accumulate(deltas, f"{target}.weight", delta * strength)
            if bias_delta is not None:
                bias = getattr(module, "bias", None)
                if not isinstance(bias, Tensor) or bias.shape != bias_delta.shape:
                    raise LoraError(
                        f"{parsed.name}: key '{key}' has a bias difference of shape {list(bias_delta.shape)} "
                        f"but {target} has bias {list(bias.shape) if isinstance(bias, Tensor) else None}"
                    )
                _accumulate(deltas, f"{target}.bias", bias_delta * strength)
        reports.append(report)
    return deltas, reports


def _accumulate(deltas: dict[str, Tensor], name: str, delta: Tensor) -> None:
    if name in deltas:
        deltas[name] = deltas[name] + delta
    else:
        deltas[name] = delta


class LoraPatch:
    """Handle of LoRAs merged into a model; ``remove()`` (or leaving a ``with`` block) restores it exactly.

    Only the touched tensors are saved. Removing twice is harmless; removing after the model's
    parameters were replaced (e.g. by ``load_state_dict``) restores the saved values into them.
    """

    def __init__(self, model: nn.Module, originals: dict[str, Tensor], reports: list[LoraReport]):
        self.model = model
        self._originals = originals
        self.reports = reports

    @property
    def touched(self) -> list[str]:
        return list(self._originals)

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.reports)

    def remove(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self._originals.items():
                params[name].copy_(original)
        self._originals = {}

    def __enter__(self) -> LoraPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_loras(model: nn.Module, loras: Iterable[Any]) -> LoraPatch:
    """Merge ``(state_dict | path, strength[, name])`` LoRAs into ``model``'s spatial layers in place.

    Deltas of all LoRAs are summed in float32 and added once per tensor, then cast back to the
    tensor's dtype. Returns the handle that undoes it.
    """
    deltas, reports = lora_deltas(model, loras)
    params = dict(model.named_parameters())
    originals: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            param = params[name]
            originals[name] = param.detach().clone()
            param.copy_((param.float() + delta.to(param.device)).to(param.dtype))
    return LoraPatch(model, originals, reports)
