"""Video-aware decoding of Stable Diffusion latents.

(a) The Stable Video Diffusion VAE decoder (the "Align your Latents" design): SD's decoder where every
resnet is followed by a temporal residual block of (3, 1, 1) convolutions, mixed back with a learned
``sigmoid(mix_factor)`` weight, and a final (3, 1, 1) convolution over time (``time_conv_out``). It
decodes SD 1.x latents (same encoder, same latent space, scaling factor 0.18215). Two key layouts load:

- diffusers ``AutoencoderKLTemporalDecoder`` (``stabilityai/stable-video-diffusion-img2vid/vae``):
  ``decoder.up_blocks.N.resnets.M.{spatial_res_block,temporal_res_block,time_mixer}``,
  ``decoder.mid_block...``, ``decoder.time_conv_out``, ``encoder.*``, ``quant_conv``;
- generative-models (sgm) / single-file checkpoints: ``[first_stage_model.]decoder.up.N.block.M.time_stack
  .{in_layers,out_layers}``, ``...block.M.mix_factor``, ``decoder.mid.block_1``, ``decoder.conv_out
  .time_mix_conv``; converted to the diffusers names on load.

The layout is read from the keys and loading is strict.

Chunked decoding (``decode_video_temporal``) runs overlapping windows of frames and cross-fades them, so
accelerator memory is bounded by one window and frames stream to the CPU. It is exact where the theory
says so: a window covering all frames is the full decode; with the temporal blocks switched off
(``mix_factor = -inf``) only ``time_conv_out`` couples frames, one neighbour each side, and the blend
weights give every window's edge frames weight 0, so every output frame comes from windows that saw both
its neighbours. With the temporal blocks on, windows differ from the full decode through the receptive
field of the temporal convolutions (2 frames per block, 14 blocks) and through the GroupNorm of each
temporal block, whose statistics span the window's frames; the cross-fade bounds the seams.

(b) The plain SD VAE (``lavie_core.vae.AutoencoderKL``) decodes every frame on its own: chunking it is
exact and blending would change nothing, so ``decode_video_smooth`` chunks for memory only and offers
an optional temporal bilateral filter on the decoded pixels (``temporal_smooth``): each pixel is
averaged with the same pixel of neighbouring frames, weighted by their similarity, so small frame-to-
frame fluctuations (flicker) average out while large changes (motion, cuts) stay. It does not follow
motion, so slowly moving fine texture is softened; ``flicker_metrics`` measures both effects.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .tiling import tile_spans
from .vae import (
    AutoencoderKL,
    Decoder,
    Encoder,
    ResnetBlock,
    VAEConfig,
    check_fit,
    convert_vae_state_dict,
    index_set,
    ldm_key_to_diffusers,
    placed_on,
    posterior,
    resnet_part,
)

__all__ = [
    "TemporalVAEConfig",
    "TemporalAutoencoder",
    "is_temporal_vae",
    "detect_layout",
    "convert_temporal_vae_state_dict",
    "infer_temporal_vae_config",
    "load_temporal_vae",
    "temporal_windows",
    "decode_video_temporal",
    "temporal_smooth",
    "decode_video_smooth",
    "decode_video_any",
    "flicker_metrics",
]

StateDict = dict[str, Tensor]
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class TemporalVAEConfig:
    """Hyperparameters of an AutoencoderKLTemporalDecoder; the encoder and quant_conv are optional
    because sgm checkpoints have no quant_conv and decoder-only files have neither."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    has_encoder: bool = True
    has_quant_conv: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"TemporalVAEConfig: channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def vae_config(self) -> VAEConfig:
        return VAEConfig(self.block_out_channels, self.layers_per_block, self.latent_channels, self.in_channels,
                         self.out_channels, self.norm_num_groups, self.scaling_factor)

    @classmethod
    def svd(cls) -> TemporalVAEConfig:
        """stabilityai/stable-video-diffusion-img2vid ``vae`` (SD 1.x/2.x latent space)."""
        return cls()

    @classmethod
    def tiny(cls, levels: int = 3, **overrides: Any) -> TemporalVAEConfig:
        """Toy width for tests: 32/64 channels (32 groups, as every released VAE)."""
        base = dict(block_out_channels=(32,) + (64,) * (levels - 1), layers_per_block=2)
        base.update(overrides)
        return cls(**base)


class TemporalResnetBlock(ResnetBlock):
    """GroupNorm -> SiLU -> Conv3d (3,1,1) twice, plus the input. GroupNorm sees `b c f h w`, so its
    statistics span every frame of the call."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-5):
        super().__init__(channels, channels, groups, eps)

    @staticmethod
    def make_conv(in_channels: int, out_channels: int) -> nn.Module:
        return nn.Conv3d(in_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))


class AlphaBlender(nn.Module):
    """Learned mix of the spatial and temporal paths: ``(1 - s) * spatial + s * temporal``, s = sigmoid(mix_factor)."""

    def __init__(self, mix_factor: float = 0.0):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([mix_factor]))

    def forward(self, spatial: Tensor, temporal: Tensor) -> Tensor:
        keep = 1.0 - torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return keep * spatial + (1.0 - keep) * temporal


class SpatioTemporalResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.spatial_res_block = ResnetBlock(in_channels, out_channels, groups)
        self.temporal_res_block = TemporalResnetBlock(out_channels, groups)
        self.time_mixer = AlphaBlender()

    def forward(self, x: Tensor, frames: int) -> Tensor:
        """x: `(b f) c h w`."""
        spatial = rearrange(self.spatial_res_block(x), "(b f) c h w -> b c f h w", f=frames)
        mixed = self.time_mixer(spatial, self.temporal_res_block(spatial))
        return rearrange(mixed, "b c f h w -> (b f) c h w")


class TemporalDecoder(Decoder):
    """SD's decoder with spatio-temporal resnets (``layers_per_block`` of them in the mid block) and a
    final (3, 1, 1) convolution over time."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__(config.vae_config(), resnet=SpatioTemporalResBlock, mid_layers=config.layers_per_block)
        self.time_conv_out = nn.Conv3d(config.out_channels, config.out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, z: Tensor) -> Tensor:
        """Unscaled latents `b c f h w` -> frames `b c f H W`."""
        frames = z.shape[2]
        x = super().forward(rearrange(z, "b c f h w -> (b f) c h w"), frames)
        return self.time_conv_out(rearrange(x, "(b f) c h w -> b c f h w", f=frames))


class TemporalAutoencoder(nn.Module):
    """AutoencoderKLTemporalDecoder: SD's 2-D encoder, a video decoder, no post_quant_conv."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.config = config
        if config.has_encoder:
            self.encoder = Encoder(config.vae_config())
        if config.has_quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.decoder = TemporalDecoder(config)

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images `b c h w` in [-1, 1] -> posterior (mean, logvar); frames are encoded independently."""
        if not self.config.has_encoder:
            raise ValueError("this temporal VAE was loaded without its encoder (decoder-only file)")
        moments = self.encoder(x)
        if self.config.has_quant_conv:
            moments = self.quant_conv(moments)
        return posterior(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents `b c f h w` -> video `b c f H W`, roughly in [-1, 1]."""
        return self.decoder(z)


# ----------------------------------------------------------------------------- key layouts
_SGM_TEMPORAL = re.compile(r"^decoder\.(mid\.block_\d|up\.\d+\.block\.\d+)\.(time_stack|mix_factor)")
_DIFFUSERS_TEMPORAL = re.compile(r"^decoder\.(mid_block|up_blocks\.\d+)\.resnets\.\d+\.(temporal_res_block|time_mixer)\.")
_WRAPPERS = ("first_stage_model.", "vae.")
_TIME_STACK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}


def _unwrap(state_dict: Mapping[str, Any]) -> StateDict:
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):
        state_dict = inner
    sd = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    for prefix in _WRAPPERS:
        if any(k.startswith(prefix + "decoder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def detect_layout(state_dict: Mapping[str, Tensor]) -> str | None:
    """'diffusers', 'sgm', or None when the decoder has no temporal layers (a plain 2-D VAE)."""
    keys = list(_unwrap(state_dict))
    if any(_DIFFUSERS_TEMPORAL.match(k) for k in keys) or any(k.startswith("decoder.time_conv_out.") for k in keys):
        return "diffusers"
    if any(_SGM_TEMPORAL.match(k) for k in keys) or any(k.startswith("decoder.conv_out.time_mix_conv.") for k in keys):
        return "sgm"
    return None


def is_temporal_vae(state_dict: Mapping[str, Tensor]) -> bool:
    return detect_layout(state_dict) is not None


def _sgm_resnet_part(rest: str) -> str:
    if rest.startswith("time_stack."):
        tail = rest[len("time_stack."):]
        for old, new in _TIME_STACK.items():
            if tail.startswith(old + "."):
                return f"temporal_res_block.{new}{tail[len(old):]}"
        return f"temporal_res_block.{tail}"
    if rest == "mix_factor":
        return "time_mixer.mix_factor"
    return f"spatial_res_block.{resnet_part(rest) if '.' in rest else rest}"


def _sgm_decoder_key(key: str, num_up: int) -> str:
    if key.startswith("decoder.conv_out.time_mix_conv."):
        return "decoder.time_conv_out." + key[len("decoder.conv_out.time_mix_conv."):]
    # sgm numbers decoder levels from the highest resolution, diffusers in execution order.
    return ldm_key_to_diffusers(key, num_up, _sgm_resnet_part)


def convert_temporal_vae_state_dict(state_dict: Mapping[str, Any]) -> StateDict:
    """Any supported temporal-VAE checkpoint -> the diffusers AutoencoderKLTemporalDecoder key layout.

    Strips ``first_stage_model.``/``vae.`` wrappers (other parts of a full SVD checkpoint are dropped)
    and ``loss.`` keys; 1x1-conv attention projections become linear weights. Unknown keys pass
    through so that strict loading names them.
    """
    sd = _unwrap(state_dict)
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    layout = detect_layout(sd)
    decoder = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    others = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    if layout == "sgm":
        ups = {int(m[1]) for k in decoder if (m := re.match(r"^decoder\.up\.(\d+)\.", k))}
        num_up = max(ups) + 1 if ups else 0
        decoder = {_sgm_decoder_key(k, num_up): v for k, v in decoder.items()}
    out: StateDict = {}
    for key, value in decoder.items():
        if re.match(r"^decoder\.mid_block\.attentions\.0\.\w+(\.0)?\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[key] = value
    if others:
        out.update(convert_vae_state_dict(others))
    return out


def infer_temporal_vae_config(state_dict: Mapping[str, Tensor], *, name: str = "state dict") -> TemporalVAEConfig:
    """Config from a diffusers-layout state dict (run ``convert_temporal_vae_state_dict`` first)."""
    keys = list(state_dict)
    ups = sorted(index_set(keys, r"^decoder\.up_blocks\.(\d+)\."))
    if not ups or ups != list(range(len(ups))) or "decoder.conv_in.weight" not in state_dict:
        raise ValueError(f"{name}: not a temporal-decoder VAE (no decoder.up_blocks / decoder.conv_in); "
                         f"first keys: {', '.join(keys[:5]) or '<empty>'}")
    try:
        channels = tuple(
            int(state_dict[f"decoder.up_blocks.{i}.resnets.0.spatial_res_block.conv2.weight"].shape[0])
            for i in reversed(ups)
        )
        layers = len(index_set(keys, r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.")) - 1
        latent = int(state_dict["decoder.conv_in.weight"].shape[1])
        out_channels = int(state_dict["decoder.conv_out.weight"].shape[0])
    except KeyError as e:
        raise ValueError(f"{name}: incomplete temporal-decoder VAE, missing {e.args[0]!r}") from None
    has_encoder = any(k.startswith("encoder.") for k in keys)
    in_channels = int(state_dict["encoder.conv_in.weight"].shape[1]) if "encoder.conv_in.weight" in state_dict else 3
    groups = 32 if all(c % 32 == 0 for c in channels) else math.gcd(*channels)
    return TemporalVAEConfig(
        block_out_channels=channels,
        layers_per_block=max(layers, 1),
        latent_channels=latent,
        in_channels=in_channels,
        out_channels=out_channels,
        norm_num_groups=groups,
        has_encoder=has_encoder,
        has_quant_conv="quant_conv.weight" in state_dict,
    )


def _read(source: str | os.PathLike | Mapping[str, Tensor]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(source, Mapping):
        return "state dict", source
    path = Path(source)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not found:
            raise FileNotFoundError(f"{folder}: no .safetensors or .bin weights")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"temporal VAE weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return str(path), load_file(str(path), device="cpu")
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a state dict")
    return str(path), data


def load_temporal_vae(
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    config: TemporalVAEConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TemporalAutoencoder:
    """Strictly load an SVD-style temporal VAE from a file, a diffusers folder or a state dict."""
    name, raw = _read(source)
    layout = detect_layout(raw)
    if layout is None:
        raise ValueError(
            f"{name}: this VAE has no temporal layers (no temporal_res_block / time_stack / time_conv_out "
            "keys); it is a plain 2-D VAE. Load it as a regular VAE; the pack then decodes frame by frame."
        )
    sd = convert_temporal_vae_state_dict(raw)
    config = config or infer_temporal_vae_config(sd, name=name)
    with torch.device("meta"):
        model = TemporalAutoencoder(config)
    check_fit(model, sd, name, what=f"the temporal VAE ({config})", layout=layout)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- chunked decoding
def _check_latents(latents: Tensor) -> None:
    if not isinstance(latents, Tensor) or latents.ndim != 5:
        got = list(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be [B, C, F, h, w], got {got}")
    if latents.shape[2] < 1:
        raise ValueError("latents contain no frames")


def temporal_windows(frames: int, chunk: int, overlap: int) -> list[tuple[tuple[int, int], Tensor]]:
    """Frame windows with float64 blend weights that sum to 1 at every frame.

    Spans come from ``lavie_core.tiling.tile_spans``. Inside the part a window shares with a
    neighbour, its weight ramps linearly from 1 to exactly 0 at its own edge frame, so a frame whose
    neighbour lies outside the window never contributes there.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")
    if chunk >= frames:
        return [((0, frames), torch.ones(frames, dtype=torch.float64))]
    if overlap >= chunk:
        raise ValueError(f"overlap ({overlap}) must be smaller than chunk ({chunk})")
    spans = tile_spans(frames, chunk, overlap)
    raw = []
    for i, (start, stop) in enumerate(spans):
        w = torch.ones(stop - start, dtype=torch.float64)
        if i > 0:
            shared = spans[i - 1][1] - start
            if shared > 0:
                w[:shared] = torch.minimum(w[:shared], _ramp(shared))
        if i < len(spans) - 1:
            shared = stop - spans[i + 1][0]
            if shared > 0:
                w[-shared:] = torch.minimum(w[-shared:], _ramp(shared).flip(0))
        raw.append(w)
    total = torch.zeros(frames, dtype=torch.float64)
    for (start, stop), w in zip(spans, raw):
        total[start:stop] += w
    if bool((total <= 0).any()):
        raise ValueError(f"chunk {chunk} with overlap {overlap} leaves frames without weight")
    return [(span, w / total[span[0]:span[1]]) for span, w in zip(spans, raw)]


def _ramp(length: int) -> Tensor:
    if length == 1:
        return torch.full((1,), 0.5, dtype=torch.float64)
    return torch.arange(length, dtype=torch.float64) / (length - 1)


def decode_video_temporal(
    vae: TemporalAutoencoder,
    latents: Tensor,
    *,
    chunk: int = 14,
    overlap: int = 4,
    device: torch.device | str | None = None,
    out_device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> Tensor:
    """Scaled latents `b c f h w` -> video `b 3 f H W` (float32 on ``out_device``, not clamped).

    Windows of ``chunk`` frames overlapping by ``overlap`` (see ``temporal_windows``) are decoded one at
    a time on ``device`` and blended into the output on ``out_device``; ``chunk >= f`` is one call,
    identical to the full decode. ``callback(frames_done, frames_total)`` runs after every window (frames
    before the next window's start are final); an exception raised there aborts decoding.
    """
    _check_latents(latents)
    b, _, f, _, _ = latents.shape
    windows = temporal_windows(f, chunk, overlap)
    out: Tensor | None = None
    with placed_on(vae, device) as target, torch.no_grad():
        for bi in range(b):
            for wi, ((start, stop), weight) in enumerate(windows):
                z = latents[bi : bi + 1, :, start:stop].to(target, torch.float32) / vae.config.scaling_factor
                frames = vae.decode(z.to(vae.dtype)).to(out_device, torch.float32)
                if out is None:
                    out = torch.zeros((b, frames.shape[1], f, *frames.shape[3:]), dtype=torch.float32,
                                      device=out_device)
                if len(windows) == 1:
                    out[bi] = frames[0]
                else:
                    w = weight.to(device=out_device, dtype=torch.float32)[None, :, None, None]
                    out[bi, :, start:stop] += frames[0] * w
                del frames
                if callback is not None:
                    done = windows[wi + 1][0][0] if wi + 1 < len(windows) else f
                    callback(bi * f + done, b * f)
    assert out is not None
    return out


# ----------------------------------------------------------------------------- 2-D fallback
def temporal_smooth(
    video: Tensor, strength: float = 0.5, *, sigma: float = 0.1, radius: int = 1, context: tuple[int, int] = (0, 0)
) -> Tensor:
    """Temporal bilateral filter of a decoded video `b c f H W` (values around [-1, 1]).

    ``out_t = (x_t + sum_d w_d x_{t+d}) / (1 + sum_d w_d)`` over ``0 < |d| <= radius`` with
    ``w_d = strength * exp(-(|x_{t+d} - x_t|_c / sigma)^2 / 2)``, the difference averaged over channels
    per pixel. ``strength = 0`` returns the input unchanged. ``context = (before, after)``: that many
    leading/trailing frames are neighbours only and are dropped from the result (streaming).
    """
    if not strength > 0:
        before, after = context
        return video[:, :, before : video.shape[2] - after]
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    x = video.float()
    f = x.shape[2]
    before, after = context
    num = x[:, :, before : f - after].clone()
    den = torch.ones_like(num[:, :1])
    for t_out, t in enumerate(range(before, f - after)):
        centre = x[:, :, t]
        for d in range(-radius, radius + 1):
            s = t + d
            if d == 0 or not 0 <= s < f:
                continue
            other = x[:, :, s]
            diff = (other - centre).abs().mean(dim=1, keepdim=True)
            w = strength * torch.exp(-0.5 * (diff / sigma) ** 2)
            num[:, :, t_out] += w * other
            den[:, :, t_out] += w
    return (num / den).to(video.dtype)


def decode_video_smooth(
    vae: AutoencoderKL,
    latents: Tensor,
    *,
    chunk: int = 8,
    smooth: float = 0.0,
    sigma: float = 0.1,
    radius: int = 1,
    device: torch.device | str | None = None,
    out_device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> Tensor:
    """Plain SD VAE: decode ``chunk`` frames at a time, optionally smoothed with ``temporal_smooth``.

    Frames are independent in a 2-D VAE, so chunking changes nothing; with ``smooth > 0`` each chunk is
    decoded with ``radius`` extra frames on each side so that the filter sees the same neighbours as on
    the whole video, and the result does not depend on ``chunk`` either.
    """
    from .vae import decode_video

    _check_latents(latents)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    b, _, f, _, _ = latents.shape
    pad = radius if smooth > 0 else 0
    out: Tensor | None = None
    for start in range(0, f, chunk):
        stop = min(start + chunk, f)
        lo, hi = max(0, start - pad), min(f, stop + pad)
        frames = decode_video(vae, latents[:, :, lo:hi], chunk=hi - lo, device=device, out_device=out_device)
        frames = temporal_smooth(frames, smooth, sigma=sigma, radius=radius, context=(start - lo, hi - stop))
        if out is None:
            out = torch.empty((b, frames.shape[1], f, *frames.shape[3:]), dtype=torch.float32, device=out_device)
        out[:, :, start:stop] = frames
        if callback is not None:
            callback(stop * b, f * b)
    assert out is not None
    return out


def decode_video_any(vae: nn.Module, latents: Tensor, **kwargs: Any) -> Tensor:
    """``decode_video_temporal`` for a TemporalAutoencoder, ``decode_video_smooth`` for a 2-D VAE.

    Keyword arguments the chosen path does not take are ignored (``overlap`` for the 2-D VAE, ``smooth``,
    ``sigma``, ``radius`` for the temporal one).
    """
    if isinstance(vae, TemporalAutoencoder):
        keep = {k: v for k, v in kwargs.items() if k in ("chunk", "overlap", "device", "out_device", "callback")}
        return decode_video_temporal(vae, latents, **keep)
    keep = {k: v for k, v in kwargs.items()
            if k in ("chunk", "smooth", "sigma", "radius", "device", "out_device", "callback")}
    return decode_video_smooth(vae, latents, **keep)


# ----------------------------------------------------------------------------- metrics
def flicker_metrics(video: Tensor) -> dict[str, float]:
    """Temporal statistics of a video `b c f H W`.

    ``mean_abs_diff``: mean |x_t - x_{t-1}|, all change between frames (motion and flicker).
    ``flicker``: mean |x_{t+1} - 2 x_t + x_{t-1}| / 2, the part of the change that reverses from one
    frame to the next; steady motion contributes little to it, frame-to-frame jitter a lot.
    """
    x = video.float()
    if x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"video must be [B, C, F, H, W] with F >= 2, got {list(x.shape)}")
    first = (x[:, :, 1:] - x[:, :, :-1]).abs().mean()
    second = (x[:, :, 2:] - 2 * x[:, :, 1:-1] + x[:, :, :-2]).abs().mean() / 2 if x.shape[2] >= 3 else first * 0
    return {"mean_abs_diff": float(first), "flicker": float(second)}
