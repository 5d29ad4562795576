"""AutoencoderKL (the Stable Diffusion VAE) in plain PyTorch, used frame by frame on video.

Parameter names follow diffusers' AutoencoderKL exactly, so diffusers-format weights load
unchanged; the original LDM / ComfyUI layout and the attention names of older diffusers
releases (query/key/value/proj_attn) are converted on load. The VAE is 2-D: a video is
folded to `(b f) c h w`, so frames never interact and can be processed in any chunking.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import fused
from .blocks import group_norm, upsample_conv

__all__ = [
    "VAEConfig",
    "AutoencoderKL",
    "convert_vae_state_dict",
    "is_ldm_layout",
    "infer_vae_config",
    "load_vae",
    "encode_video",
    "decode_video",
    "product_attention",
]

StateDict = dict[str, Tensor]

# Keeps the single-head mid-block attention from materialising a full (hw)^2 score matrix
# on large latents (the x4 decoder sees 320x512 latents), at no cost in accuracy since
# query rows are independent.
_ATTN_SCORE_BUDGET = 1 << 27


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyperparameters; scaling_factor brings posterior samples to roughly unit variance."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must not be empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig: channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        """Spatial factor between pixels and latents (8 for SD, 4 for the x4 upscaler)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd(cls) -> VAEConfig:
        """Stable Diffusion 1.x VAE (used by the LaVie base and interpolation stages)."""
        return cls((128, 256, 512, 512), 2, scaling_factor=0.18215)

    @classmethod
    def x4_upscaler(cls) -> VAEConfig:
        """Stable Diffusion x4-upscaler VAE (used by the LaVie VSR stage)."""
        return cls((128, 256, 512), 2, scaling_factor=0.08333)

    @classmethod
    def tiny(cls, levels: int = 4) -> VAEConfig:
        """A few-hundred-k-parameter VAE of the given depth; scaling matches the real preset of that depth."""
        if levels < 1:
            raise ValueError("levels must be >= 1")
        return cls((32,) + (64,) * (levels - 1), 1, scaling_factor=_preset_scaling(levels, 1.0))


def _preset_scaling(levels: int, default: float | None = None) -> float | None:
    return {4: VAEConfig.sd().scaling_factor, 3: VAEConfig.x4_upscaler().scaling_factor}.get(levels, default)


def norm(layer: nn.GroupNorm, x: Tensor, *, silu: bool = False) -> Tensor:
    """GroupNorm (then SiLU), in one pass of the fused kernels over channels-last images on NVIDIA GPUs
    (`blocks.group_norm`), else torch's, the SiLU in place where autograd is off."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and fused.eager_kernels_usable(x):
        return group_norm(x, layer, silu=silu)
    out = layer(x)
    return F.silu(out, inplace=not torch.is_grad_enabled()) if silu else out


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv twice, plus the input (through a 1x1 conv when the width changes).

    Subclasses change the convolution through `make_conv` (the temporal VAE uses (3, 1, 1) Conv3d).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = self.make_conv(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = self.make_conv(out_channels, out_channels)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.conv_shortcut = None

    @staticmethod
    def make_conv(in_channels: int, out_channels: int) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # Without autograd the residual add writes into conv2's output, and conv1's output is freed before
        # conv2 writes: at the x4 decoder's full resolution each tensor saved is 0.6-1.25 GiB per frame.
        h = self.conv1(norm(self.norm1, x, silu=True))
        h = norm(self.norm2, h, silu=True)
        h = self.conv2(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h if torch.is_grad_enabled() else h.add_(skip)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric right/bottom padding: the SD VAE was trained this way
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all h*w positions of one frame."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        tokens = rearrange(norm(self.group_norm, x), "b c h w -> b 1 (h w) c")
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        if _product_attention_serves(q):
            out = product_attention(q, k, v)
        else:
            n = q.shape[-2]
            step = max(1, _ATTN_SCORE_BUDGET // max(1, n * q.shape[0]))
            out = torch.cat(
                [F.scaled_dot_product_attention(q[..., i : i + step, :], k, v) for i in range(0, n, step)], dim=-2
            )
        out = self.to_out[0](out)
        return x + rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)


# The widest heads that SDPA's flash and cuDNN kernels take. Past it (the VAEs' one head of 512 channels) SDPA
# runs its memory-efficient kernel, which on an H200 took 6.25 s of a 6.5 s x4 decode of two 320x512 latents
# (17.6 TFLOP/s): 196 s of a whole cascade's 61 frames.
_FUSED_SDPA_MAX_HEAD_DIM = 256
_OUT_DTYPE_MM: dict[torch.device, bool] = {}


def _product_attention_serves(q: Tensor) -> bool:
    """Whether `product_attention` takes q: a half-precision CUDA tensor with heads too wide for SDPA's fused
    kernels, and a torch whose matmuls write float32 products of half-precision inputs (`out_dtype`)."""
    if not (fused.is_cuda(q) and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] > _FUSED_SDPA_MAX_HEAD_DIM):
        return False
    if q.is_meta:  # a memory trace of a CUDA call (`lavie_core.memory`): the blocks of scores count
        return True
    if q.device not in _OUT_DTYPE_MM:
        probe = torch.ones(1, 1, device=q.device, dtype=q.dtype)
        try:
            _OUT_DTYPE_MM[q.device] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM[q.device] = False
    return _OUT_DTYPE_MM[q.device]


def product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`softmax(q k^T / sqrt(d)) v` of `... n d` tensors as two matmuls per block of query rows, at most
    `_ATTN_SCORE_BUDGET` scores at a time: float32 scores and softmax, the weights meeting v in its dtype, as
    in flash attention. For heads no fused kernel takes: the x4 decode of two 320x512 latents on an H200 took
    0.62 s this way, against 6.58 s with SDPA's memory-efficient kernel."""
    lead, (n, d) = q.shape[:-2], q.shape[-2:]
    q, k, v = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=v.dtype)
    step = max(1, _ATTN_SCORE_BUDGET // max(1, k.shape[-2]))
    for i in range(q.shape[0]):
        keys = k[i].t()
        for r in range(0, n, step):
            rows = q[i, r : r + step]
            # float32 inputs give float32 products as they are (and CPUs have no `out_dtype` matmul).
            scores = torch.mm(rows, keys) if rows.dtype == torch.float32 else torch.mm(rows, keys, out_dtype=torch.float32)
            if fused.kernels_usable(scores):
                weights = fused.softmax_rows(scores, d**-0.5, v.dtype)
            else:
                weights = scores.mul_(d**-0.5).softmax(dim=-1).to(v.dtype)
            out[i, r : r + step] = torch.mm(weights, v[i])
    return out.view(*lead, n, v.shape[-1])


class MidBlock(nn.Module):
    """resnet -> attention -> resnet. `resnet` builds each resnet as `resnet(in, out, groups)`;
    extra positional arguments of `forward` are passed on to the resnets."""

    def __init__(self, channels: int, groups: int, layers: int = 2, resnet: Callable[..., nn.Module] = ResnetBlock):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(channels, channels, groups) for _ in range(layers)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x: Tensor, *context: object) -> Tensor:
        x = self.resnets[0](x, *context)
        for resnet, attention in zip(self.resnets[1:], self.attentions):
            x = resnet(attention(x), *context)
        return x


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for block in (*self.resnets, *self.downsamplers):
            x = block(x)
        return x


class UpBlock(nn.Module):
    """`layers` resnets, then an optional 2x upsample; `resnet` as in MidBlock. `Decoder.forward` runs them."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layers: int,
        groups: int,
        upsample: bool,
        resnet: Callable[..., nn.Module] = ResnetBlock,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [resnet(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < len(ch) - 1)
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(norm(self.conv_norm_out, x, silu=True))


class Decoder(nn.Module):
    """SD decoder; `resnet` and `mid_layers` let the temporal VAE swap in its spatio-temporal resnets,
    and extra positional arguments of `forward` reach every resnet."""

    def __init__(self, config: VAEConfig, *, resnet: Callable[..., nn.Module] = ResnetBlock, mid_layers: int = 2):
        super().__init__()
        ch, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, mid_layers, resnet)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < len(ch) - 1,
                    resnet=resnet,
                )
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor, *context: object) -> Tensor:
        x = self.mid_block(self.conv_in(z), *context)
        # The up blocks' layers run from here: a call per block would hold the block's input through all its
        # layers (at the x4 decoder's last block, 256 channels at full resolution: 1.25 GiB per frame in fp16).
        for block in self.up_blocks:
            for resnet in block.resnets:
                x = resnet(x, *context)
            for upsample in block.upsamplers:
                x = upsample(x)
        return self.conv_out(norm(self.conv_norm_out, x, silu=True))


def posterior(moments: Tensor) -> tuple[Tensor, Tensor]:
    """Encoder moments `b 2*latent h w` -> (mean, logvar), logvar clamped to [-30, 20]."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


class AutoencoderKL(nn.Module):
    """Per-image VAE; `encode`/`decode` take `(b f) c h w` and know nothing about scaling_factor."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images `b c h w` in [-1, 1] -> posterior (mean, logvar), each `b latent h/k w/k`."""
        return posterior(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents `b latent h w` -> images `b c h*k w*k`, roughly in [-1, 1].

        Where the fused kernels run, the decoder runs channels-last: cuDNN's half-precision convolutions
        take NHWC without copying NCHW tensors into its workspace, and the GroupNorm and SiLU are one pass.
        On an H200 (fp16) the x4 decode of one 320x512 latent went from 369 to 222 ms and from 5.00 to
        3.13 GiB.
        """
        if fused.eager_kernels_usable(z):
            z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z))


_LDM_KEY = re.compile(r"^(encoder|decoder)\.(down|up|mid)\.")
_RESNET_PARTS = {"nin_shortcut": "conv_shortcut"}
_LDM_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN_PARTS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")
_TRAINING_ONLY_PREFIXES = ("loss.",)


def is_ldm_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """True for the original LDM / ComfyUI VAE layout (`encoder.down.N.block.N`, `mid.attn_1`)."""
    return any(_LDM_KEY.match(k) for k in state_dict)


def resnet_part(rest: str) -> str:
    """LDM resnet parameter name (`nin_shortcut.weight`, ...) -> diffusers (`conv_shortcut.weight`, ...)."""
    head, _, tail = rest.partition(".")
    return f"{_RESNET_PARTS.get(head, head)}.{tail}"


def ldm_key_to_diffusers(key: str, num_up: int, resnet: Callable[[str], str] = resnet_part) -> str:
    """One LDM-layout key -> its diffusers name; `num_up` is the decoder's level count and `resnet`
    renames what follows a resnet's prefix (the temporal VAE maps its time stacks there)."""
    if m := re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.match(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{resnet(m[3])}"
    if m := re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    # LDM numbers decoder levels from the highest resolution, diffusers in execution order
    if m := re.match(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{resnet(m[3])}"
    if m := re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid\.block_(\d+)\.(.+)$", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{resnet(m[3])}"
    if m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(.+)$", key):
        return f"{m[1]}.mid_block.attentions.0.{_LDM_ATTN_PARTS.get(m[2], m[2])}.{m[3]}"
    return key


def _strip_checkpoint_wrapping(state_dict: Mapping[str, object]) -> StateDict:
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping) and not any(isinstance(v, Tensor) for v in state_dict.values()):
        state_dict = inner
    sd = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    for prefix in _CHECKPOINT_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in sd.items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}


def convert_vae_state_dict(state_dict: Mapping[str, object]) -> StateDict:
    """Any supported VAE checkpoint layout -> diffusers AutoencoderKL keys.

    Handles an outer `state_dict` entry, `first_stage_model.` / `vae.` prefixes (other
    components of a full checkpoint are dropped), the LDM / ComfyUI layout and diffusers'
    legacy attention names. The 1x1-conv attention projections of LDM become linear weights.
    Unknown keys pass through unchanged so that strict loading reports them.
    """
    sd = _strip_checkpoint_wrapping(state_dict)
    if is_ldm_layout(sd):
        ups = {int(m[1]) for k in sd if (m := re.match(r"^decoder\.up\.(\d+)\.", k))}
        num_up = max(ups) + 1 if ups else 0
        sd = {ldm_key_to_diffusers(k, num_up): v for k, v in sd.items()}
    out: StateDict = {}
    for key, value in sd.items():
        if m := re.match(r"^(.*\.mid_block\.attentions\.0)\.(\w+|to_out\.0)\.(weight|bias)$", key):
            key = f"{m[1]}.{_LEGACY_ATTN_PARTS.get(m[2], m[2])}.{m[3]}"
            if m[3] == "weight" and value.ndim == 4 and value.shape[-2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def index_set(keys: Iterable[str], pattern: str) -> set[int]:
    """The integers that `pattern`'s first group reads from the keys it matches."""
    return {int(m[1]) for k in keys if (m := re.match(pattern, k))}


def infer_vae_config(state_dict: Mapping[str, Tensor], *, name: str = "state dict") -> VAEConfig:
    """Reads depth, widths and channel counts from a diffusers-layout state dict.

    norm_num_groups is not visible in weights and is taken as 32 (every SD-family VAE);
    scaling_factor is the SD 1.x value for 4 levels and the x4-upscaler value for 3.
    """
    try:
        levels = sorted(index_set(state_dict, r"^encoder\.down_blocks\.(\d+)\."))
        layers = index_set(state_dict, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        if not levels or levels != list(range(len(levels))) or not layers:
            raise KeyError("encoder.down_blocks.0.resnets.0")
        channels = tuple(int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in levels)
        in_channels = int(state_dict["encoder.conv_in.weight"].shape[1])
        out_channels = int(state_dict["decoder.conv_out.weight"].shape[0])
        latent_channels = int(state_dict["post_quant_conv.weight"].shape[0])
    except KeyError as e:
        first = ", ".join(list(state_dict)[:5]) or "<empty>"
        raise ValueError(
            f"{name}: not an AutoencoderKL state dict (no {e.args[0]!r}); first keys: {first}"
        ) from None
    scaling = _preset_scaling(len(levels))
    if scaling is None:
        raise ValueError(
            f"{name}: a {len(levels)}-level VAE matches no preset scaling factor; pass config=VAEConfig(...)"
        )
    return VAEConfig(
        block_out_channels=channels,
        layers_per_block=max(layers) + 1,
        latent_channels=latent_channels,
        in_channels=in_channels,
        out_channels=out_channels,
        scaling_factor=scaling,
    )


def _config_from_diffusers_json(path: Path) -> VAEConfig:
    raw = json.loads(path.read_text())
    channels = tuple(raw["block_out_channels"])
    scaling = raw.get("scaling_factor", _preset_scaling(len(channels), VAEConfig.sd().scaling_factor))
    return VAEConfig(
        block_out_channels=channels,
        layers_per_block=int(raw.get("layers_per_block", 2)),
        latent_channels=int(raw.get("latent_channels", 4)),
        in_channels=int(raw.get("in_channels", 3)),
        out_channels=int(raw.get("out_channels", 3)),
        norm_num_groups=int(raw.get("norm_num_groups", 32)),
        scaling_factor=float(scaling),
    )


_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _read_file(path: Path) -> Mapping[str, object]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix in _TORCH_SUFFIXES:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path}: holds objects other than tensors, refused by torch.load(weights_only=True); "
                f"save its VAE tensors as .safetensors instead ({str(e).splitlines()[0]})"
            ) from e
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a state dict, found {type(loaded).__name__}")
        return loaded
    raise ValueError(f"{path}: unsupported VAE file type {suffix!r} (want .safetensors, {', '.join(_TORCH_SUFFIXES)})")


def _read_source(
    source: str | os.PathLike | Mapping[str, Tensor],
) -> tuple[str, Mapping[str, object], VAEConfig | None]:
    if isinstance(source, Mapping):
        return "state dict", source, None
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if not path.is_dir():
        return str(path), _read_file(path), None
    folder = path / "vae" if (path / "vae").is_dir() else path
    weights = next((folder / n for n in _WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        found = sorted(folder.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"{folder}: expected one of {', '.join(_WEIGHT_NAMES)} or a single .safetensors file")
        weights = found[0]
    config = _config_from_diffusers_json(folder / "config.json") if (folder / "config.json").is_file() else None
    return str(weights), _read_file(weights), config


def check_fit(
    model: nn.Module, state_dict: StateDict, name: str, *, what: str | None = None, layout: str | None = None
) -> None:
    """Raises a ValueError naming missing, unexpected and wrongly shaped tensors unless `state_dict`
    fits `model` exactly; `what` names the model in the message, `layout` the key layout read."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} (expected {list(expected[k])}, got {list(state_dict[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return

    def first(items: list[str]) -> str:
        more = f", ... (+{len(items) - 5})" if len(items) > 5 else ""
        return ", ".join(items[:5]) + more

    parts = [f"{layout + ' layout, ' if layout else ''}expected {len(expected)} tensors, got {len(state_dict)}"]
    if missing:
        parts.append(f"missing {len(missing)}: {first(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {first(unexpected)}")
    if wrong:
        parts.append(f"wrong shape {len(wrong)}: {first(wrong)}")
    what = what or f"AutoencoderKL({model.config})"
    raise ValueError(f"{name}: weights do not fit {what}: " + "; ".join(parts))


def load_vae(
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    config: VAEConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKL:
    """Builds an AutoencoderKL from a weights file, a diffusers `vae` folder or a state dict.

    Files: `.safetensors`, or `.pt/.pth/.ckpt/.bin` read with `weights_only=True`. Any layout
    accepted by `convert_vae_state_dict`. Without `config`, a folder's config.json is used,
    else the config is inferred from tensor shapes. Loading is strict.
    """
    name, raw, folder_config = _read_source(source)
    sd = convert_vae_state_dict(raw)
    if not sd:
        raise ValueError(f"{name}: contains no tensors")
    config = config or folder_config or infer_vae_config(sd, name=name)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    check_fit(model, sd, name)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@contextmanager
def placed_on(module: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Moves `module` (which has a `.device`) to `device` for the block and back afterwards; yields
    the device the block runs on (the module's own when `device` is None)."""
    home = module.device
    target = torch.device(device) if device is not None else home
    if target != home:
        module.to(target)
    try:
        yield target
    finally:
        if target != home:
            module.to(home)


def encode_video(
    vae: AutoencoderKL,
    video: Tensor,
    *,
    chunk: int = 8,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> Tensor:
    """Video `b c f H W` in [-1, 1] -> scaled latents `b latent f h w`, float32 on the VAE's device.

    Frames run through the encoder `chunk` at a time. The posterior noise is drawn once for
    the whole `(b f) latent h w` tensor after encoding, so results do not depend on `chunk`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if video.ndim != 5:
        raise ValueError(f"video must be [B, C, F, H, W], got shape {list(video.shape)}")
    b = video.shape[0]
    frames = rearrange(video, "b c f h w -> (b f) c h w")
    means, logvars = [], []
    with torch.no_grad():
        for i in range(0, frames.shape[0], chunk):
            mean, logvar = vae.encode(frames[i : i + chunk].to(vae.device, vae.dtype))
            means.append(mean.float())
            logvars.append(logvar.float())
        latents = torch.cat(means)
        if sample:
            noise_device = generator.device if generator is not None else latents.device
            noise = torch.randn(latents.shape, generator=generator, device=noise_device, dtype=torch.float32)
            latents = latents + torch.exp(0.5 * torch.cat(logvars)) * noise.to(latents.device)
        latents = latents * vae.config.scaling_factor
    return rearrange(latents, "(b f) c h w -> b c f h w", b=b)


def decode_video(
    vae: AutoencoderKL,
    latents: Tensor,
    *,
    chunk: int = 4,
    device: torch.device | str | None = None,
    out_device: torch.device | str = "cpu",
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Scaled latents `b latent f h w` -> video `b c f H W` (float32 on `out_device`, not clamped).

    `chunk` frames of the flattened `(b f)` axis are decoded at a time on `device` and copied
    to `out_device` straight away, so only one chunk of full-resolution frames lives on the
    compute device. If `device` differs from the VAE's, the VAE is moved there for the call
    and moved back afterwards. `callback(frames_done, frames_total)` runs after every chunk;
    an exception raised from it aborts decoding.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, C, F, h, w], got shape {list(latents.shape)}")
    b, _, f, _, _ = latents.shape
    flat = rearrange(latents, "b c f h w -> (b f) c h w")
    total = flat.shape[0]
    out: Tensor | None = None
    with placed_on(vae, device) as target, torch.no_grad():
        for start in range(0, total, chunk):
            z = flat[start : start + chunk].to(target, torch.float32) / vae.config.scaling_factor
            frames = vae.decode(z.to(vae.dtype)).to(out_device, torch.float32)
            if out is None:
                shape = (b, frames.shape[1], f, *frames.shape[2:])
                out = torch.empty(shape, dtype=torch.float32, device=out_device)
            for offset, frame in enumerate(frames):
                bi, fi = divmod(start + offset, f)
                out[bi, :, fi] = frame
            del frames
            if callback is not None:
                callback(min(start + chunk, total), total)
    if out is None:
        raise ValueError("latents contain no frames")
    return out
