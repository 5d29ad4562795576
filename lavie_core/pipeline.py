"""The three stages of the LaVie cascade: text -> 16 frames, 16 -> 61 frames, x4 super-resolution.

Latents handed between stages are `b 4 f h w` float32 tensors on the CPU in the UNets' space
(VAE latent times the VAE scaling factor). Text states are `[B or 1, tokens, D]` tensors, cond and
uncond passed separately.

Randomness: all noise (initial, ancestral, low-res augmentation) comes from one CPU
``torch.Generator().manual_seed(seed)`` per stage and is moved to the compute device afterwards, so
a seed draws the same numbers on any device (results then differ only by the device's arithmetic,
e.g. TF32 convolutions on CUDA), and every batch item gets its own noise.

Progress and cancellation: ``callback(info)`` runs after every sampler step with
``info = {"stage", "step", "steps", "denoised", "x", "sigma"}``: ``step`` counts completed steps
(1..steps), ``denoised`` is the step's x0 prediction (a preview), ``x`` the sample after the step
in sigma space (``x0 + sigma * noise``, not VP-scaled) and ``sigma`` the level the step started
at. ``on_call(done, total)`` runs after every UNet call, counted over the whole stage (CFG in split
mode and tiles make several calls per step). An exception raised from either aborts the stage and
propagates unchanged.

CUDA graphs: with ``cuda_graph=True`` (the default) a stage on a CUDA device replays its UNet calls
from CUDA graphs after the first call of each shape (``lavie_core.graphs``): the same results, with
the host no longer pacing the GPU. The graphs' memory is freed when the stage returns.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from . import fused
from .config import UNetConfig
from .graphs import GraphedCalls, signature
from .guidance import CFGDenoiser, DiscreteDenoiser
from .memory import decode_activation_peak, unet_activation_peak
from .samplers import SAMPLERS, Sampler
from .schedules import (
    SCHEDULES,
    ScheduleSpec,
    final_vp_scale,
    get_sigmas,
    initial_noise_scale,
)
from .temporal_vae import TemporalVAEConfig
from .tiling import TiledDenoiser, plan_windows
from .unet import LaVieUNet
from .vae import VAEConfig

__all__ = [
    "StageCallback",
    "CallCallback",
    "LATENT_CHANNELS",
    "VAE_DOWNSCALE",
    "DEFAULT_SCHEDULES",
    "X4_LOW_RES_BETAS",
    "default_schedule",
    "check_video_size",
    "estimate_decode_memory",
    "estimate_unet_memory",
    "interpolation_layout",
    "augment_low_res",
    "text_to_video",
    "interpolate",
    "upscale",
]

StageCallback = Callable[[dict[str, Any]], None]
CallCallback = Callable[[int, int], None]

LATENT_CHANNELS = 4
VAE_DOWNSCALE = 8
"""Pixel-to-latent factor of the SD v1-4 VAE shared by the base and interpolation stages."""

DEFAULT_SCHEDULES: dict[str, str] = {"ddpm": "lavie_ddpm", "ddim": "lavie_ddim", "euler": "euler_discrete"}
"""The base model's three official sampler/grid pairs; any other sampler defaults to karras."""

# Grids made of integer training timesteps: rounding the recovered timestep makes the network see
# exactly the integers the official samplers feed it.
INTEGER_GRIDS = frozenset({"lavie_ddpm", "lavie_ddim", "lavie_respaced"})

CFG_MODES = ("batched", "split")


def _x4_low_res_betas() -> torch.Tensor:
    # The low-res noise augmentation of stabilityai/stable-diffusion-x4-upscaler. Its
    # low_res_scheduler/scheduler_config.json is a DDPMScheduler with beta_start 0.0001,
    # beta_end 0.02, beta_schedule "scaled_linear", 1000 steps (read from a duplicate of that
    # folder on the Hub, asoderznik/sdx4-upscaler). It matches the model's LDM training config
    # (Stability-AI/stablediffusion configs/stable-diffusion/x4-upscaling.yaml: noise_schedule_config
    # linear_start 0.0001, linear_end 0.02, through make_beta_schedule("linear"), which squares a
    # linspace of square roots) and ComfyUI's SD_X4Upscaler noise augmentor. diffusers builds
    # scaled_linear betas in float32, as this does: at level 50 sqrt(abar) = 0.99541 and the noise
    # std is 0.096 (a plain linear schedule would give 0.173).
    return torch.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=torch.float32) ** 2


X4_LOW_RES_BETAS: torch.Tensor = _x4_low_res_betas()
"""Betas of the x4 upscaler's low-res noise augmentation (scaled_linear 1e-4 .. 0.02), float32."""


# ---------------------------------------------------------------------------------------------
# Validation helpers (shared with lavie_core.long_video)
# ---------------------------------------------------------------------------------------------


def int_at_least(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def non_negative(name: str, value: Any) -> float:
    """``float(value)`` if it is a number ``>= 0``; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _check_window(name: str, size: Any, overlap_name: str, overlap: Any) -> None:
    """A window parameter (``None`` = whole axis) and its overlap, named as the caller knows them."""
    int_at_least(overlap_name, overlap, 0)
    if size is None:
        return
    for value in size if isinstance(size, (tuple, list)) else (size,):
        int_at_least(name, value, 1)
        if overlap >= value:
            raise ValueError(f"{overlap_name} must be smaller than {name} ({value}), got {overlap}")


def check_video_size(height: int, width: int, *, multiple: int = VAE_DOWNSCALE) -> None:
    """Raise ``ValueError("height 321 is not a multiple of 8")``-style errors for bad pixel sizes."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if value % multiple:
            raise ValueError(f"{name} {value} is not a multiple of {multiple}")


def _config(unet: Any) -> UNetConfig:
    config = getattr(unet, "config", None)
    if not isinstance(config, UNetConfig):
        raise TypeError(f"expected a LaVieUNet (with a UNetConfig .config), got {type(unet).__name__}")
    return config


def require_kind(unet: Any, kind: str, stage: str) -> UNetConfig:
    """The config of ``unet``, which ``stage`` needs to be a LaVieUNet of ``kind``."""
    config = _config(unet)
    if config.kind != kind:
        raise ValueError(f"{stage} needs a {kind!r} UNet, got a {config.kind!r} UNet")
    return config


def check_context(name: str, context: Any, batch: int, dim: int) -> torch.Tensor:
    """``context`` if it is a `[1 or batch, tokens, dim]` tensor; ValueError naming ``name`` otherwise."""
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != dim:
        got = list(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{name} must be [1 or B, tokens, {dim}], got {got}")
    if context.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch {context.shape[0]}, expected 1 or {batch}")
    return context


def resolve_device(device: torch.device | str | None, unet: Any) -> torch.device:
    """``device``, else the UNet's own device, else the CPU."""
    if device is not None:
        return torch.device(device)
    own = getattr(unet, "device", None)
    return torch.device(own) if own is not None else torch.device("cpu")


def default_schedule(sampler: str) -> str:
    """The sigma grid a sampler gets when none is named: the official one where there is one."""
    return DEFAULT_SCHEDULES.get(sampler, "karras")


def resolve_sampling(sampler: str, schedule: str | None, steps: int) -> tuple[Sampler, ScheduleSpec, torch.Tensor]:
    """Checked sampler function, schedule spec (``None``: ``default_schedule(sampler)``) and sigma grid."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(sorted(SAMPLERS))}; got {sampler!r}")
    name = default_schedule(sampler) if schedule is None else schedule
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(sorted(SCHEDULES))}; got {name!r}")
    int_at_least("steps", steps, 1)
    spec = SCHEDULES[name]
    return SAMPLERS[sampler], spec, get_sigmas(name, steps)


def model_evaluations(sampler: str, sigmas: torch.Tensor) -> int:
    """Denoiser evaluations ``sampler`` makes on ``sigmas`` (before CFG and windows multiply them)."""
    steps = len(sigmas) - 1
    if sampler == "heun":
        # A second evaluation on every step that does not land on sigma 0.
        return steps + int((sigmas[1:] > 0).sum())
    return steps


def cfg_calls(cfg: float, cfg_mode: str) -> int:
    """UNet calls per guided evaluation: 2 in split mode with guidance, else 1."""
    return 1 if cfg == 1.0 or cfg_mode == "batched" else 2


# ---------------------------------------------------------------------------------------------
# Shared machinery (also used by lavie_core.long_video)
# ---------------------------------------------------------------------------------------------


class Network:
    """``unet`` as the ``net(x_vp, t, **kwargs) -> eps | v`` that DiscreteDenoiser wraps.

    Conditioning that the official models concatenate on channels after the noisy latent
    (``concat``) is appended here, after DiscreteDenoiser has scaled the latent alone. Every call
    ticks ``on_call(done, total)``. With ``cuda_graph``, calls on a CUDA device are replayed from
    CUDA graphs (``lavie_core.graphs``), freed with the Network at the end of the stage. Before an eager
    ``LaVieUNet``'s first call with new shapes, its Triton kernels compile all at once
    (``fused.compile_ahead``; once per process, model config and input signature).
    """

    def __init__(
        self,
        unet: Callable[..., torch.Tensor],
        *,
        noise_level: int | None,
        total_calls: int,
        on_call: CallCallback | None,
        cuda_graph: bool = False,
    ) -> None:
        self.unet = unet
        self.call = GraphedCalls(unet) if cuda_graph else unet
        self.noise_level = noise_level
        self.total_calls = total_calls
        self.on_call = on_call
        self.calls = 0

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, concat: torch.Tensor | None = None
    ) -> torch.Tensor:
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        args = (x, t, context)
        static = {} if self.noise_level is None else {"noise_level": self.noise_level}
        if isinstance(self.unet, LaVieUNet):  # compiled UNets: Inductor compiles its kernels in parallel itself
            key = (self.unet.config, self.unet.dtype, signature(args, static))
            fused.compile_ahead(self.unet, *args, key=key, **static)
        out = self.call(*args, **static)
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls, self.total_calls)
        return out


def stage_callback(stage: str, steps: int, callback: StageCallback | None) -> StageCallback | None:
    """Sampler step info -> the stage ``callback`` info described in the module docstring."""
    if callback is None:
        return None

    def report(info: Mapping[str, Any]) -> None:
        callback(
            {
                "stage": stage,
                "step": int(info["i"]) + 1,
                "steps": steps,
                "denoised": info["denoised"],
                "x": info["x"],
                "sigma": float(info["sigma"]),
            }
        )

    return report


def guided_denoiser(
    net: Network,
    spec: ScheduleSpec,
    prediction: str,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    cfg: float,
    cfg_mode: str,
    *,
    uncond_first: bool,
) -> CFGDenoiser:
    """``net`` as an x0 denoiser on the spec's training schedule (integer timesteps on the official grids),
    guided with weight ``cfg`` between ``context`` and ``uncond_context``."""
    denoiser = DiscreteDenoiser(
        net, spec.default_schedule, prediction, quantize=spec.name in INTEGER_GRIDS
    )
    return CFGDenoiser(
        denoiser,
        {"context": context},
        {"context": uncond_context},
        cfg,
        batched=cfg_mode == "batched",
        uncond_first=uncond_first,
        shared_input=shares_text_free_prefix(net.unet),
    )


def shares_text_free_prefix(unet: Any) -> bool:
    """Whether ``unet`` takes x once with several contexts per sample (``LaVieUNet``, compiled or not)."""
    return isinstance(getattr(unet, "_orig_mod", unet), LaVieUNet)


def check_cfg_mode(cfg_mode: str) -> None:
    """Raise ``ValueError`` unless ``cfg_mode`` is one of ``CFG_MODES``."""
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {', '.join(CFG_MODES)}; got {cfg_mode!r}")


def _check_common(steps: int, cfg: float, cfg_mode: str) -> float:
    int_at_least("steps", steps, 1)
    cfg = non_negative("cfg", cfg)
    check_cfg_mode(cfg_mode)
    return cfg


def run_sampler(
    sampler_fn: Sampler,
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    spec: ScheduleSpec,
    generator: torch.Generator,
    callback: StageCallback | None,
    extra_args: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run one sampler from ``noise`` (unit normal) and return the VP latent, like the official code."""
    x = noise * initial_noise_scale(sigmas, spec.noise_mode)
    out = sampler_fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, generator=generator)
    return out * final_vp_scale(sigmas)


# ---------------------------------------------------------------------------------------------
# Stage 1: text -> video
# ---------------------------------------------------------------------------------------------


def text_to_video(
    unet: Any,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    *,
    frames: int = 16,
    height: int = 320,
    width: int = 512,
    steps: int = 50,
    cfg: float = 7.5,
    sampler: str = "ddpm",
    schedule: str | None = None,
    seed: int = 0,
    batch: int = 1,
    cfg_mode: str = "batched",
    device: torch.device | str | None = None,
    callback: StageCallback | None = None,
    on_call: CallCallback | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Sample base-model latents `b 4 f h w` with ``h, w = height / 8, width / 8`` (CPU, float32).

    ``schedule=None`` picks the official grid of the sampler (ddpm: DDPM 980..0; ddim: DDIM
    981..1 ending on alphas_cumprod[0]; euler: diffusers' Euler grid) and karras over the LaVie
    sigma range for the others. CFG batch order is [uncond, cond] as in the official pipeline;
    ``cfg_mode="split"`` runs the two halves as separate calls (less memory, same result).
    """
    config = require_kind(unet, "base", "text_to_video")
    int_at_least("frames", frames, 1)
    int_at_least("batch", batch, 1)
    check_video_size(height, width)
    cfg = _check_common(steps, cfg, cfg_mode)
    sampler_fn, spec, sigmas = resolve_sampling(sampler, schedule, steps)
    dim = config.cross_attention_dim
    device = resolve_device(device, unet)
    context = check_context("context", context, batch, dim).to(device)
    uncond_context = check_context("uncond_context", uncond_context, batch, dim).to(device)

    generator = torch.Generator().manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, frames, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    total = model_evaluations(sampler, sigmas) * cfg_calls(cfg, cfg_mode)
    net = Network(unet, noise_level=None, total_calls=total, on_call=on_call, cuda_graph=cuda_graph)
    denoiser = guided_denoiser(net, spec, "epsilon", context, uncond_context, cfg, cfg_mode, uncond_first=True)
    report = stage_callback("text_to_video", steps, callback)
    with torch.no_grad():
        out = run_sampler(sampler_fn, denoiser, noise, sigmas, spec, generator, report)
    return out.to(device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Stage 2: frame interpolation
# ---------------------------------------------------------------------------------------------


def interpolation_layout(n: int) -> list[int]:
    """Source frame of each of the ``4n - 3`` interpolated positions: position p holds ``(p + 1) // 4``.

    This is the official copied-conditioning pattern (each key frame repeated 4 times, first copy
    and last two dropped): frame 0 three times, frames 1..n-2 four times, frame n-1 twice, and key
    frame k at position 4k.
    """
    int_at_least("n", n, 2)
    return [(p + 1) // 4 for p in range(4 * n - 3)]


def interpolate(
    unet: Any,
    latents: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    *,
    steps: int = 50,
    cfg: float = 4.0,
    sampler: str = "ddim",
    schedule: str | None = "lavie_respaced",
    seed: int = 0,
    frame_window: int | None = None,
    window_overlap: int = 4,
    cfg_mode: str = "batched",
    device: torch.device | str | None = None,
    callback: StageCallback | None = None,
    on_call: CallCallback | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Interpolate ``latents`` `b 4 n h w` to `b 4 (4n-3) h w` (CPU, float32).

    The conditioning latent is ``latents[:, :, interpolation_layout(n)]`` and the network input is
    ``cat([noisy, conditioning])`` on channels. Every output frame is generated, key frames
    included (nothing is pasted back), as in the official code. CFG batch order is [cond, uncond]
    like the official sampler; its negative text is the literal prompt "None".

    Difference from the official code: it decodes the base video, resamples it to 61 frames and
    VAE-encodes them again (with posterior sampling) to get the conditioning; here the base latents
    are used directly, which avoids a decode/encode round trip and its extra randomness.

    ``frame_window`` bounds memory: the UNet then runs on temporal windows of that many frames,
    overlapping by ``window_overlap`` and blended at every step (see ``lavie_core.tiling``).
    Because the network's sparse-causal attention anchors on the first frame it sees, windows
    other than the first anchor on their own first frame. ``None`` runs all frames at once, as the
    official code does.
    """
    config = require_kind(unet, "interpolation", "interpolate")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be [B, {LATENT_CHANNELS}, n, h, w], got {got}")
    b, _, n, h, w = latents.shape
    if n < 2:
        raise ValueError(f"interpolation needs at least 2 frames (n >= 2), got n={n}")
    cfg = _check_common(steps, cfg, cfg_mode)
    _check_window("frame_window", frame_window, "window_overlap", window_overlap)
    sampler_fn, spec, sigmas = resolve_sampling(sampler, schedule, steps)
    dim = config.cross_attention_dim
    device = resolve_device(device, unet)
    context = check_context("context", context, b, dim).to(device)
    uncond_context = check_context("uncond_context", uncond_context, b, dim).to(device)

    out_frames = 4 * n - 3
    conditioning = latents[:, :, interpolation_layout(n)].to(device=device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((b, LATENT_CHANNELS, out_frames, h, w), generator=generator, dtype=torch.float32).to(device)

    windows = len(
        plan_windows(out_frames, h, w, chunk_frames=frame_window, chunk_overlap=window_overlap if frame_window else 0)
    )
    total = model_evaluations(sampler, sigmas) * cfg_calls(cfg, cfg_mode) * windows
    net = Network(unet, noise_level=None, total_calls=total, on_call=on_call, cuda_graph=cuda_graph)
    guided = guided_denoiser(net, spec, "epsilon", context, uncond_context, cfg, cfg_mode, uncond_first=False)
    report = stage_callback("interpolation", steps, callback)
    with torch.no_grad():
        if frame_window is None:
            out = run_sampler(sampler_fn, guided, noise, sigmas, spec, generator, report, {"concat": conditioning})
        else:
            tiled = TiledDenoiser(
                guided,
                chunk_frames=frame_window,
                chunk_overlap=window_overlap,
                conditioning={"concat": conditioning},
            )
            out = run_sampler(sampler_fn, tiled, noise, sigmas, spec, generator, report)
    return out.to(device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Stage 3: video super-resolution
# ---------------------------------------------------------------------------------------------


def augment_low_res(
    low_res: torch.Tensor,
    noise_level: int,
    noise: torch.Tensor,
    *,
    betas: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sqrt(abar[nl]) * low_res + sqrt(1 - abar[nl]) * noise``, the x4 upscaler's noise augmentation.

    ``abar`` is the cumulative product of ``1 - betas`` (default ``X4_LOW_RES_BETAS``), evaluated
    in the betas' dtype as diffusers' ``DDPMScheduler.add_noise`` does.
    """
    betas = X4_LOW_RES_BETAS if betas is None else betas
    if not 0 <= noise_level < betas.numel():
        raise ValueError(f"noise_level must be in 0..{betas.numel() - 1}, got {noise_level}")
    abar = torch.cumprod(1.0 - betas, dim=0)[noise_level].to(device=low_res.device, dtype=low_res.dtype)
    return abar.sqrt() * low_res + (1.0 - abar).sqrt() * noise.to(low_res)


def upscale(
    unet: Any,
    low_res: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    *,
    noise_level: int = 50,
    steps: int = 50,
    cfg: float = 5.0,
    sampler: str = "ddim",
    schedule: str | None = "lavie_ddim",
    seed: int = 0,
    tile: int | tuple[int, int] | None = None,
    tile_overlap: int = 32,
    chunk_frames: int | None = 8,
    chunk_overlap: int = 2,
    low_res_betas: torch.Tensor | None = None,
    cfg_mode: str = "batched",
    device: torch.device | str | None = None,
    latent_device: torch.device | str = "cpu",
    callback: StageCallback | None = None,
    on_call: CallCallback | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Super-resolve ``low_res`` `b 3 f H W` in [-1, 1] to latents `b 4 f H W` (CPU, float32).

    The latents have the low-res size; the x4 VAE decodes them to ``4H x 4W``. The low-res video
    is noise-augmented once at ``noise_level`` (0..350, also the class label the UNet gets) and
    concatenated after the noisy latent on channels. The network is v-prediction, sampled with
    DDIM on diffusers' grid by default; CFG batch order is [uncond, cond] (official negative
    prompt: "blur, worst quality").

    Patch-wise denoising: at every step the UNet runs on spatial tiles of ``tile`` latent pixels
    (``None``: whole frames) overlapping by ``tile_overlap``, and on temporal chunks of
    ``chunk_frames`` frames (``None``: all) overlapping by ``chunk_overlap``; the x0 predictions
    are blended with smooth normalised weights (``lavie_core.tiling``). The full latent lives on
    ``latent_device``; each window goes to ``device`` (default: the UNet's) for its call.

    Difference from the official code: it runs each 8-frame chunk as a separate, complete
    diffusion run. Here all chunks share one step loop and are denoised jointly per step. With
    ``chunk_overlap=0`` and ``tile=None`` the chunks are the official ones and, for a
    deterministic sampler such as DDIM, the result equals independent per-chunk runs from the same
    noise. Random draws: low-res augmentation noise first, then the initial latent noise.
    """
    config = require_kind(unet, "vsr", "upscale")
    if not isinstance(low_res, torch.Tensor) or low_res.ndim != 5 or low_res.shape[1] != 3:
        got = list(low_res.shape) if isinstance(low_res, torch.Tensor) else type(low_res).__name__
        raise ValueError(f"low_res must be an RGB video [B, 3, F, H, W], got {got}")
    b, _, f, h, w = low_res.shape
    if isinstance(noise_level, bool) or not isinstance(noise_level, int):
        raise TypeError(f"noise_level must be an int, got {type(noise_level).__name__} {noise_level!r}")
    max_level = config.max_noise_level if config.max_noise_level is not None else 350
    if not 0 <= noise_level <= max_level:
        raise ValueError(f"noise_level must be in 0..{max_level}, got {noise_level}")
    cfg = _check_common(steps, cfg, cfg_mode)
    _check_window("tile", tile, "tile_overlap", tile_overlap)
    _check_window("chunk_frames", chunk_frames, "chunk_overlap", chunk_overlap)
    sampler_fn, spec, sigmas = resolve_sampling(sampler, schedule, steps)
    dim = config.cross_attention_dim
    device = resolve_device(device, unet)
    latent_device = torch.device(latent_device)
    context = check_context("context", context, b, dim).to(device)
    uncond_context = check_context("uncond_context", uncond_context, b, dim).to(device)
    windows = len(
        plan_windows(f, h, w, tile=tile, overlap=tile_overlap, chunk_frames=chunk_frames, chunk_overlap=chunk_overlap)
    )

    generator = torch.Generator().manual_seed(seed)
    low_res = low_res.detach().to(device="cpu", dtype=torch.float32)
    lr_noise = torch.randn(low_res.shape, generator=generator, dtype=torch.float32)
    low_res_noisy = augment_low_res(low_res, noise_level, lr_noise, betas=low_res_betas).to(latent_device)
    noise = torch.randn((b, LATENT_CHANNELS, f, h, w), generator=generator, dtype=torch.float32).to(latent_device)

    total = model_evaluations(sampler, sigmas) * cfg_calls(cfg, cfg_mode) * windows
    net = Network(unet, noise_level=noise_level, total_calls=total, on_call=on_call, cuda_graph=cuda_graph)
    guided = guided_denoiser(net, spec, "v", context, uncond_context, cfg, cfg_mode, uncond_first=True)
    tiled = TiledDenoiser(
        guided,
        tile=tile,
        overlap=tile_overlap,
        chunk_frames=chunk_frames,
        chunk_overlap=chunk_overlap,
        conditioning={"concat": low_res_noisy},
        device=device,
    )
    report = stage_callback("upscale", steps, callback)
    with torch.no_grad():
        out = run_sampler(sampler_fn, tiled, noise, sigmas, spec, generator, report)
    return out.to(device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Memory estimate
# ---------------------------------------------------------------------------------------------


# Eager peaks measured on an H200 (fp16 and fp32, the three UNets with and without the fused kernels, 1 to 61
# frames, tiles and whole frames, one text or two) were 1.00 to 1.06 times the traced activations: cuDNN's
# workspace and the allocator's rounding, with cudnn.benchmark off as ComfyUI runs (its algorithm search
# adds up to a third on a shape's first call).
_MEASURED_OVER_TRACED = 1.1
# The temporal VAE's decoder runs its convolutions in NCHW, and cuDNN copies half-precision tensors into its
# workspace for them: 14 frames of 40x64 latents (SVD's decoder, fp16, H200) peaked at 4.38 GiB against 3.83
# traced. Per-image VAEs decode channels-last on GPUs (`AutoencoderKL.decode`); the x4 and SD decodes of 1 to
# 16 frames peaked within 0.1% of the trace.
_TEMPORAL_DECODE_OVER_TRACED = 1.25


def estimate_unet_memory(
    config: UNetConfig,
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
    *,
    device: torch.device | str = "cuda",
) -> int:
    """Activation bytes of one eager UNet call at latent size ``height x width`` on ``device``.

    ``batch`` is the number of conditionings per sample (2 with guidance batched). The call is traced on
    the meta device (``lavie_core.memory``) along the code path ``device`` takes, with the fused kernels
    where they run there, and the traced peak gets 10% for the allocator and cuDNN. Weights are not
    included. Tracing takes about a second; repeated shapes are cached.

    Measured on an H200 (``cudnn.benchmark`` off; eager, fp16, guidance batched, peak minus weights and
    inputs; ``python bench/memory.py``) against the traced peaks: base 0.45 GiB on its first call, 0.42 on
    later ones (traced 0.42), interpolation 1.60 (1.59), VSR 8-frame chunk 6.49 (6.49); without the kernels
    1.05, 4.02 and 15.23 (the same as traced). Compiled calls measured no higher peaks (VSR: lower).
    """
    int_at_least("frames", frames, 1)
    int_at_least("height", height, 1)
    int_at_least("width", width, 1)
    int_at_least("batch", batch, 1)
    device = torch.device(device)
    traced = unet_activation_peak(
        config, frames, height, width, batch, dtype, device.type, fused.kernels_available(device)
    )
    return int(traced * _MEASURED_OVER_TRACED)


def estimate_decode_memory(
    config: VAEConfig | TemporalVAEConfig,
    frames: int,
    height: int,
    width: int,
    dtype: torch.dtype = torch.float16,
    *,
    device: torch.device | str = "cuda",
) -> int:
    """Activation bytes of decoding ``frames`` latents of ``height x width`` at once on ``device`` with the VAE
    ``config`` describes (per-image or temporal), traced as ``estimate_unet_memory`` traces a UNet call, with
    its margin (the temporal VAE's NCHW decoder: ``_TEMPORAL_DECODE_OVER_TRACED``). Weights are not included.
    """
    int_at_least("frames", frames, 1)
    int_at_least("height", height, 1)
    int_at_least("width", width, 1)
    device = torch.device(device)
    traced = decode_activation_peak(config, frames, height, width, dtype, device.type, fused.kernels_available(device))
    margin = _TEMPORAL_DECODE_OVER_TRACED if isinstance(config, TemporalVAEConfig) else _MEASURED_OVER_TRACED
    return int(traced * margin)
