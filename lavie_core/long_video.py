"""Videos longer than the base model's 16 training frames, two ways.

**Recursive extension** (``extend_video``, after LVDM: He et al. 2022, "Latent Video Diffusion Models
for High-Fidelity Long Video Generation", Sec. 3.3 and its released code). Clips of ``clip_frames``
are generated one after the other; each new clip starts with the last ``cond_frames`` frames of the
video so far and adds ``clip_frames - cond_frames`` new ones.

- Conditioning by replacement: at every network call the first ``cond_frames`` frames of the clip's
  noisy latent are overwritten by the known frames noised to the current level. LVDM trains its
  prediction model with the known frames on the input, plus a mask channel; the released LaVie base
  model was trained for unconditional 16-frame clips only, so here the known frames simply occupy
  the first positions of the clip, as in inpainting by replacement (Ho et al. 2022, "Video Diffusion
  Models"), and the temporal attention carries them into the new frames. The noise added to the
  known frames is drawn once per clip, so for a deterministic sampler they follow the path
  ``x_sigma = x_known + sigma * eps`` that exact denoising would give them.
- Conditional latent perturbation (LVDM): the known frames are used with extra noise of level
  ``cond_noise`` (a training timestep; LVDM samples with 100 on a model trained with 0..250), so the
  new clip does not copy their fine artefacts and errors do not compound from clip to clip. LVDM
  tells its model the extra level through a separate embedding; LaVie has none, so here the known
  frames carry ``sqrt(sigma^2 + sigma_cond^2)``: the current noise plus the perturbation, which
  dominates at the end of sampling. ``cond_noise = 0`` is plain replacement.
- Unconditional guidance (LVDM): ``eps = (1 + w) eps(z_t | frames) - w eps(z_t)``, the clip denoised
  with the known frames pushed away from the same new frames denoised without them. LVDM's
  unconditional branch is its own model run with the condition mask cleared (its code leaves the
  noisy known frames in that input; the mask tells the network they are not a condition). LaVie
  has no mask, so a branch that sees the frames is the conditional one; the frame-free branch here
  runs the new frames alone. Text guidance is applied inside both branches, and in the text
  branches of the conditional prediction both the cond and uncond text see the known frames.
  ``uncond_guidance = w`` (LVDM samples with 0.1); 0 skips the extra pass (it costs one more
  guided evaluation of ``clip_frames - cond_frames`` frames per step).

**Sliding context windows** (``sliding_window_video``; the "context options" of AnimateDiff in
ComfyUI, MultiDiffusion in time): the whole long latent is denoised jointly; at every network call
the UNet runs on overlapping windows of ``context_length`` frames, ``context_overlap`` apart, and the
x0 predictions are blended with raised-cosine weights (``lavie_core.tiling.TiledDenoiser``). A window
covering every frame is exactly ``pipeline.text_to_video``.

Both return UNet-space latents `b 4 f h w` (CPU, float32), like the pipeline stages, and take the
same sampling arguments, seeds, callbacks and ``cuda_graph`` switch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .guidance import CFGDenoiser
from .pipeline import (
    LATENT_CHANNELS,
    VAE_DOWNSCALE,
    CallCallback,
    Network,
    StageCallback,
    cfg_calls,
    check_cfg_mode,
    check_context,
    check_video_size,
    guided_denoiser,
    int_at_least,
    model_evaluations,
    non_negative,
    require_kind,
    resolve_device,
    resolve_sampling,
    run_sampler,
    stage_callback,
    text_to_video,
)
from .samplers import Sampler
from .schedules import ScheduleSpec
from .tiling import TiledDenoiser, plan_windows

__all__ = [
    "extend_video",
    "sliding_window_video",
    "ConditionedClipDenoiser",
    "clip_plan",
    "clip_seed",
    "segment_stats",
]


# ----------------------------------------------------------------------------- sampling plumbing
# Validation, sampler set-up and the guided denoiser are the pipeline stages' own (lavie_core.pipeline).


def _context(name: str, context: Any, batch: int, dim: int, device: torch.device) -> torch.Tensor:
    return check_context(name, context, batch, dim).to(device)


def _evaluations(sampler: str, sigmas: torch.Tensor, cfg: float, cfg_mode: str) -> int:
    return model_evaluations(sampler, sigmas) * cfg_calls(cfg, cfg_mode)


def _guided(
    unet: Any, spec: ScheduleSpec, context: torch.Tensor, uncond: torch.Tensor, cfg: float, cfg_mode: str,
    ticker: _Ticker, cuda_graph: bool,
) -> CFGDenoiser:
    check_cfg_mode(cfg_mode)
    net = Network(unet, noise_level=None, total_calls=ticker.total, on_call=ticker, cuda_graph=cuda_graph)
    return guided_denoiser(net, spec, "epsilon", context, uncond, cfg, cfg_mode, uncond_first=True)


def _run(
    sampler_fn: Sampler,
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    spec: ScheduleSpec,
    generator: torch.Generator,
    report: Callable[[dict[str, Any]], None] | None,
) -> torch.Tensor:
    """One sampler run from unit ``noise`` to the VP latent, as the pipeline stages do it."""
    with torch.no_grad():
        return run_sampler(sampler_fn, denoiser, noise, sigmas, spec, generator, report)


def clip_seed(seed: int, clip: int) -> int:
    """Seed of extension clip ``clip`` (>= 1); clip 0 uses ``seed`` itself, as ``text_to_video`` does."""
    return (seed * 0x9E3779B97F4A7C15 + clip * 0xBF58476D1CE4E5B9) % (1 << 63)


def clip_plan(total_frames: int, clip_frames: int, cond_frames: int, start_frames: int) -> list[tuple[int, int]]:
    """(first output frame, new frames) of every extension clip after ``start_frames`` existing frames."""
    new = clip_frames - cond_frames
    plan = []
    have = start_frames
    while have < total_frames:
        take = min(new, total_frames - have)
        plan.append((have, take))
        have += take
    return plan


class ConditionedClipDenoiser:
    """Wrap a guided denoiser so the first frames of every call hold the known frames.

    ``known`` `b c k h w` (x0), ``eps`` its fixed noise, ``sigma_cond`` the perturbation level;
    ``uncond_guidance`` weights the frame-free branch (see the module docstring). The x0 returned for
    the known positions is ``known`` itself.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        known: torch.Tensor,
        eps: torch.Tensor,
        *,
        sigma_cond: float = 0.0,
        uncond_guidance: float = 0.0,
    ) -> None:
        if known.shape != eps.shape:
            raise ValueError(f"known frames {list(known.shape)} and their noise {list(eps.shape)} differ in shape")
        self.model = model
        self.known = known
        self.eps = eps
        self.sigma_cond = float(sigma_cond)
        self.uncond_guidance = float(uncond_guidance)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        k = self.known.shape[2]
        s = sigma.to(torch.float64).reshape(-1, 1, 1, 1, 1)
        level = (s * s + self.sigma_cond**2).sqrt().to(x.dtype)
        x = x.clone()
        x[:, :, :k] = self.known.to(x.dtype) + level * self.eps.to(x.dtype)
        x0 = self.model(x, sigma, **kwargs)
        if self.uncond_guidance:
            free = self.model(x[:, :, k:].contiguous(), sigma, **kwargs)
            x0 = x0.clone()
            x0[:, :, k:] = x0[:, :, k:] + self.uncond_guidance * (x0[:, :, k:] - free)
        x0[:, :, :k] = self.known.to(x0.dtype)
        return x0


class _Ticker:
    """One ``on_call`` counter over several sampler runs."""

    def __init__(self, total: int, on_call: CallCallback | None) -> None:
        self.total = total
        self.on_call = on_call
        self.done = 0

    def __call__(self, *_: Any) -> None:
        self.done += 1
        if self.on_call is not None:
            self.on_call(self.done, self.total)


def _clip_callback(
    stage: str, clip: int, clips: int, steps: int, callback: StageCallback | None
) -> StageCallback | None:
    if callback is None:
        return None

    def report(info: dict[str, Any]) -> None:
        callback({**info, "stage": stage, "clip": clip, "clips": clips,
                  "step": clip * steps + int(info["step"]), "steps": clips * steps})

    return report


def _check_latents(name: str, latents: torch.Tensor, batch: int) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{name} must be [B, {LATENT_CHANNELS}, F, h, w], got {got}")
    if latents.shape[0] != batch:
        raise ValueError(f"{name} has batch {latents.shape[0]}, expected {batch}")


def extend_video(
    unet: Any,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    *,
    total_frames: int,
    clip_frames: int = 16,
    cond_frames: int = 4,
    cond_noise: float = 0.0,
    uncond_guidance: float = 0.0,
    initial: torch.Tensor | None = None,
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
    """Generate ``total_frames`` frames clip by clip (see the module docstring); `b 4 total h w` on the CPU.

    Without ``initial`` the first clip is ``text_to_video(frames=clip_frames, seed=seed)`` exactly; with
    ``initial`` latents `b 4 f0 h w` (f0 >= cond_frames) those frames are kept and extended (``height``
    and ``width`` then come from them). Extension clip n draws its noise from ``clip_seed(seed, n)``.
    ``callback`` info carries ``clip`` and ``clips``; ``step``/``steps`` count over all clips.
    """
    config = require_kind(unet, "base", "extend_video")
    total_frames = int_at_least("total_frames", total_frames, 1)
    clip_frames = int_at_least("clip_frames", clip_frames, 2)
    cond_frames = int_at_least("cond_frames", cond_frames, 1)
    if cond_frames >= clip_frames:
        raise ValueError(f"cond_frames ({cond_frames}) must be smaller than clip_frames ({clip_frames})")
    batch = int_at_least("batch", batch, 1)
    cond_noise = non_negative("cond_noise", cond_noise)
    uncond_guidance = non_negative("uncond_guidance", uncond_guidance)
    cfg = non_negative("cfg", cfg)
    sampler_fn, spec, sigmas = resolve_sampling(sampler, schedule, steps)
    if cond_noise >= spec.default_schedule.num_timesteps:
        raise ValueError(
            f"cond_noise is a training timestep, 0..{spec.default_schedule.num_timesteps - 1}; got {cond_noise}"
        )
    dim = config.cross_attention_dim
    device = resolve_device(device, unet)
    context = _context("context", context, batch, dim, device)
    uncond_context = _context("uncond_context", uncond_context, batch, dim, device)

    if initial is not None:
        _check_latents("initial", initial, batch)
        if initial.shape[2] < cond_frames:
            raise ValueError(f"initial has {initial.shape[2]} frames, fewer than cond_frames ({cond_frames})")
        video = initial.detach().to("cpu", torch.float32)
        h, w = video.shape[-2:]
    else:
        check_video_size(height, width)
        h, w = height // VAE_DOWNSCALE, width // VAE_DOWNSCALE
        video = None

    first = min(total_frames, clip_frames)
    plan = clip_plan(total_frames, clip_frames, cond_frames, video.shape[2] if video is not None else first)
    clips = len(plan) + (video is None)
    evaluations = _evaluations(sampler, sigmas, cfg, cfg_mode)
    per_extension = evaluations * (2 if uncond_guidance else 1)
    ticker = _Ticker(evaluations * (video is None) + per_extension * len(plan), on_call)
    stage = "extend_video"

    if video is None:
        video = text_to_video(
            unet, context, uncond_context, frames=first, height=h * VAE_DOWNSCALE, width=w * VAE_DOWNSCALE,
            steps=steps, cfg=cfg, sampler=sampler, schedule=schedule, seed=seed, batch=batch, cfg_mode=cfg_mode,
            device=device, callback=_clip_callback(stage, 0, clips, steps, callback), on_call=ticker,
            cuda_graph=cuda_graph,
        )
    sigma_cond = float(spec.default_schedule.t_to_sigma(cond_noise)) if cond_noise > 0 else 0.0
    guided = _guided(unet, spec, context, uncond_context, cfg, cfg_mode, ticker, cuda_graph)
    offset = clips - len(plan)
    for n, (_, take) in enumerate(plan):
        index = n + offset
        generator = torch.Generator().manual_seed(clip_seed(seed, index))
        noise = torch.randn((batch, LATENT_CHANNELS, clip_frames, h, w), generator=generator).to(device)
        eps = torch.randn((batch, LATENT_CHANNELS, cond_frames, h, w), generator=generator).to(device)
        known = video[:, :, -cond_frames:].to(device)
        denoiser = ConditionedClipDenoiser(guided, known, eps, sigma_cond=sigma_cond, uncond_guidance=uncond_guidance)
        report = stage_callback(stage, steps, _clip_callback(stage, index, clips, steps, callback))
        clip = _run(sampler_fn, denoiser, noise, sigmas, spec, generator, report)
        new = clip[:, :, cond_frames : cond_frames + take].to("cpu", torch.float32)
        video = torch.cat([video, new], dim=2)
    return video[:, :, :total_frames].contiguous()


def sliding_window_video(
    unet: Any,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    *,
    frames: int = 64,
    context_length: int = 16,
    context_overlap: int = 4,
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
    latent_device: torch.device | str | None = None,
    callback: StageCallback | None = None,
    on_call: CallCallback | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Denoise ``frames`` frames jointly with overlapping temporal windows; `b 4 frames h w` on the CPU.

    Noise, sampler and guidance are those of ``text_to_video`` (same seed, same numbers), so
    ``context_length >= frames`` reproduces it exactly. ``latent_device`` keeps the full latent
    elsewhere than the UNet (e.g. on the CPU for very long videos); each window moves to ``device``.
    """
    config = require_kind(unet, "base", "sliding_window_video")
    frames = int_at_least("frames", frames, 1)
    context_length = int_at_least("context_length", context_length, 1)
    context_overlap = int_at_least("context_overlap", context_overlap, 0)
    if context_length < frames and context_overlap >= context_length:
        raise ValueError(f"context_overlap ({context_overlap}) must be smaller than context_length ({context_length})")
    batch = int_at_least("batch", batch, 1)
    check_video_size(height, width)
    cfg = non_negative("cfg", cfg)
    sampler_fn, spec, sigmas = resolve_sampling(sampler, schedule, steps)
    dim = config.cross_attention_dim
    device = resolve_device(device, unet)
    latent_device = torch.device(latent_device) if latent_device is not None else device
    context = _context("context", context, batch, dim, device)
    uncond_context = _context("uncond_context", uncond_context, batch, dim, device)
    h, w = height // VAE_DOWNSCALE, width // VAE_DOWNSCALE

    generator = torch.Generator().manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, frames, h, w)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(latent_device)
    overlap = context_overlap if context_length < frames else 0
    windows = len(plan_windows(frames, h, w, chunk_frames=context_length, chunk_overlap=overlap))
    ticker = _Ticker(_evaluations(sampler, sigmas, cfg, cfg_mode) * windows, on_call)
    guided = _guided(unet, spec, context, uncond_context, cfg, cfg_mode, ticker, cuda_graph)
    tiled = TiledDenoiser(guided, chunk_frames=context_length, chunk_overlap=overlap, device=device)
    out = _run(sampler_fn, tiled, noise, sigmas, spec, generator, stage_callback("sliding_window", steps, callback))
    return out.to(device="cpu", dtype=torch.float32)


def segment_stats(video: torch.Tensor, segment: int = 16) -> list[dict[str, float]]:
    """Flicker and drift figures of a video `b c f h w` (latents or pixels), per segment of frames.

    Per segment: ``frame_diff`` mean |x_t - x_{t-1}| over the segment's frame pairs (the pair that
    crosses into the segment included, so a seam between clips shows up in the later segment);
    ``flicker`` mean |x_{t+1} - 2 x_t + x_{t-1}| / 2; ``mean_drift`` / ``std_drift``: the segment's
    average per-frame channel mean / std minus that of the first segment (0 for the first).
    """
    x = video.float()
    if x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"video must be [B, C, F, H, W] with F >= 2, got {list(x.shape)}")
    if segment < 1:
        raise ValueError(f"segment must be >= 1, got {segment}")
    f = x.shape[2]
    diff = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))  # pair t-1 -> t at index t-1
    second = (x[:, :, 2:] - 2 * x[:, :, 1:-1] + x[:, :, :-2]).abs().mean(dim=(0, 1, 3, 4)) / 2
    means = x.mean(dim=(3, 4)).mean(dim=(0, 1))
    stds = x.std(dim=(3, 4)).mean(dim=(0, 1))
    rows = []
    for start in range(0, f, segment):
        stop = min(f, start + segment)
        pairs = diff[max(start - 1, 0) : stop - 1]
        triples = second[max(start - 1, 0) : max(stop - 2, 0)]
        rows.append({
            "start": float(start),
            "frame_diff": float(pairs.mean()) if pairs.numel() else math.nan,
            "flicker": float(triples.mean()) if triples.numel() else math.nan,
            "mean": float(means[start:stop].mean()),
            "std": float(stds[start:stop].mean()),
        })
    for row in rows:
        row["mean_drift"] = row["mean"] - rows[0]["mean"]
        row["std_drift"] = row["std"] - rows[0]["std"]
    return rows
