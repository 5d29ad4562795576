"""The three cascade stages as nodes: text -> 16 frames, 16 -> 61 frames, x4 super-resolution."""

from __future__ import annotations

from typing import Any

import torch

from lavie_core import pipeline
from lavie_core.samplers import SAMPLERS
from lavie_core.schedules import SCHEDULES

from . import bridge
from .models import (
    STAGE_SCALE,
    LaVieError,
    LaVieModel,
    check_vae,
    contexts,
    decode_frames,
    image_to_video,
    raw_to_video,
    require_kind,
    video_to_raw,
)

CATEGORY = "LaVie"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_SIZE = 8192
AUTO = "auto"
SAMPLER_NAMES = list(SAMPLERS)
SCHEDULE_NAMES = [AUTO, *SCHEDULES]

_SCHEDULE_TIP = ("Sigma grid. auto: the official one for this stage and sampler ({}); karras or "
                 "euler_discrete trade fidelity to the paper for fewer steps.")


def _common_inputs(cfg: float, sampler: str, official_schedule: str) -> dict:
    return {
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": (
            "Sampler steps (network evaluations per step depend on the sampler; 50 is the official setting).")}),
        "cfg": ("FLOAT", {"default": cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": (
            f"Classifier-free guidance scale; {cfg} is the official value for this stage. 1 skips the negative pass.")}),
        "sampler_name": (SAMPLER_NAMES, {"default": sampler, "tooltip": (
            f"Sampler. {sampler} is the official one for this stage.")}),
        "schedule": (SCHEDULE_NAMES, {"default": AUTO, "tooltip": _SCHEDULE_TIP.format(official_schedule)}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": (
            "Seed of this stage's noise; the same seed gives the same video on any device.")}),
    }


def _schedule_kwargs(schedule: str) -> dict[str, Any]:
    # auto leaves the stage's own default in force, so the official pairing lives in the core only.
    return {} if schedule == AUTO else {"schedule": schedule}


def _size_error(name: str, value: Any) -> str | None:
    if value is None:  # linked from another node: only known at run time
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return f"{name} must be an integer, got {value!r}"
    if value < 8 or value > MAX_SIZE:
        return f"{name} {value} is outside 8..{MAX_SIZE}"
    if value % 8:
        lower, upper = value // 8 * 8, value // 8 * 8 + 8
        return (f"{name} {value} is not a multiple of 8 (the VAE works on 8x8 pixel blocks); "
                f"use {max(lower, 8)} or {upper}")
    return None


def _overlap_error(size_name: str, size: Any, overlap_name: str, overlap: Any) -> str | None:
    if size is None or overlap is None:
        return None
    size, overlap = int(size), int(overlap)
    if size < 0 or overlap < 0:
        return f"{size_name} and {overlap_name} must not be negative"
    if size > 0 and overlap >= size:
        return f"{overlap_name} ({overlap}) must be smaller than {size_name} ({size}), or set {size_name} to 0"
    return None


def _run_stage(node: str, fn: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise LaVieError(f"{node}: {e}") from None


def _load(model: LaVieModel, memory: int) -> torch.nn.Module:
    return model.load(memory_required=memory)


def _memory(model: LaVieModel, frames: int, h: int, w: int, cfg: float) -> int:
    try:
        unet = model.unet
        return pipeline.estimate_unet_memory(unet.config, max(1, frames), max(1, h), max(1, w),
                                             batch=1 if cfg == 1.0 else 2, dtype=unet.dtype)
    except Exception:  # an estimate only steers offloading; never fail a run on it
        return 0


class LaVieSampler:
    DESCRIPTION = (
        "Stage 1 of LaVie: generates a video latent from text with the base UNet (official: 16 frames, "
        "320x512, DDPM, 50 steps, cfg 7.5). Decode it with LaVie Decode or feed it to LaVie Interpolate."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Video latent, frames as the batch ([F, 4, H/8, W/8]); ComfyUI's VAE Decode also reads it.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("LAVIE_UNET", {"tooltip": "The LaVie base UNet (LaVie Loader with lavie_base)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt to follow (LaVie Text Encode with the SD v1 CLIP)."}),
            "negative": ("CONDITIONING", {"tooltip": "Prompt to steer away from; the official base uses an empty prompt."}),
            "frames": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": (
                "Frames to generate; the base model was trained on 16.")}),
            "width": ("INT", {"default": 512, "min": 8, "max": MAX_SIZE, "step": 8, "tooltip": (
                "Frame width in pixels, a multiple of 8; the model was trained at 512.")}),
            "height": ("INT", {"default": 320, "min": 8, "max": MAX_SIZE, "step": 8, "tooltip": (
                "Frame height in pixels, a multiple of 8; the model was trained at 320.")}),
            **_common_inputs(7.5, "ddpm", "ddpm: lavie_ddpm, ddim: lavie_ddim, euler: euler_discrete, others: karras"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width: int, height: int) -> bool | str:
        errors = [e for e in (_size_error("width", width), _size_error("height", height)) if e]
        return "; ".join(errors) if errors else True

    def sample(self, model: LaVieModel, positive: list, negative: list, frames: int, width: int, height: int, steps: int, cfg: float,
               sampler_name: str, schedule: str, seed: int) -> tuple[dict]:
        node = "LaVie Sampler"
        error = self.VALIDATE_INPUTS(width, height)
        if error is not True:
            raise LaVieError(f"{node}: {error}")
        model = require_kind(model, "base", node)
        context, uncond = contexts(positive, negative, model, node)
        unet = _load(model, _memory(model, frames, height // 8, width // 8, cfg))
        bar = bridge.progress(steps, latent_format="sd15", device=model.device)
        latents = _run_stage(
            node, pipeline.text_to_video, unet, context, uncond,
            frames=frames, height=height, width=width, steps=steps, cfg=cfg, sampler=sampler_name,
            seed=seed, device=model.device, callback=bar.on_step, on_call=bar.on_call,
            **_schedule_kwargs(schedule),
        )
        return ({"samples": video_to_raw(latents, STAGE_SCALE["base"])},)


class LaVieInterpolate:
    DESCRIPTION = (
        "Stage 2 of LaVie: interpolates a video latent from n to 4n-3 frames (16 -> 61) with the "
        "interpolation UNet; key frame k lands on output frame 4k. The official sampler appends ', 4k.' to the "
        "prompt and uses the word None as the negative prompt."
    )
    CATEGORY = CATEGORY
    FUNCTION = "interpolate"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Video latent with 4n-3 frames at the input's size.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("LAVIE_UNET", {"tooltip": "The LaVie interpolation UNet (LaVie Loader with lavie_interpolation)."}),
            "latent": ("LATENT", {"tooltip": "Video latent from LaVie Sampler (at least 2 frames)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt of the video (SD v1 CLIP)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt; the official interpolation sampler uses the text None."}),
            **_common_inputs(4.0, "ddim", "lavie_respaced for every sampler"),
            "frame_window": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": (
                "Output frames the UNet sees at once, to bound memory; 0 runs all frames together (official). "
                "Windows are blended at every step.")}),
            "window_overlap": ("INT", {"default": 4, "min": 0, "max": 1024, "tooltip": (
                "Frames shared by neighbouring windows when frame_window is set.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, frame_window: int, window_overlap: int) -> bool | str:
        return _overlap_error("frame_window", frame_window, "window_overlap", window_overlap) or True

    def interpolate(self, model: LaVieModel, latent: dict, positive: list, negative: list, steps: int, cfg: float, sampler_name: str,
                    schedule: str, seed: int, frame_window: int = 0, window_overlap: int = 4) -> tuple[dict]:
        node = "LaVie Interpolate"
        model = require_kind(model, "interpolation", node)
        samples = latent["samples"] if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise LaVieError(f"{node}: the latent input holds no video latent [F, 4, h, w]")
        n = samples.shape[0]
        if n < 2:
            raise LaVieError(f"{node}: interpolation needs at least 2 frames, the latent has {n}")
        error = self.VALIDATE_INPUTS(frame_window, window_overlap)
        if error is not True:
            raise LaVieError(f"{node}: {error}")
        context, uncond = contexts(positive, negative, model, node)
        window = frame_window or None
        out_frames = 4 * n - 3
        unet = _load(model, _memory(model, min(window or out_frames, out_frames), *samples.shape[-2:], cfg))
        bar = bridge.progress(steps, latent_format="sd15", device=model.device)
        latents = _run_stage(
            node, pipeline.interpolate, unet, raw_to_video(samples, STAGE_SCALE["interpolation"]), context, uncond,
            steps=steps, cfg=cfg, sampler=sampler_name, seed=seed, frame_window=window,
            window_overlap=window_overlap, device=model.device, callback=bar.on_step, on_call=bar.on_call,
            **_schedule_kwargs(schedule),
        )
        return ({"samples": video_to_raw(latents, STAGE_SCALE["interpolation"])},)


class LaVieUpscale:
    DESCRIPTION = (
        "Stage 3 of LaVie: x4 video super-resolution with the VSR UNet (patch-wise: spatial tiles and temporal "
        "chunks blended at every step), decoded with the x4 upscaler VAE. Official: 320x512 -> 1280x2048, "
        "noise_level 50, DDIM 50 steps, cfg 5, negative prompt 'blur, worst quality'."
    )
    CATEGORY = CATEGORY
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("images", "latent")
    OUTPUT_TOOLTIPS = ("Upscaled frames, 4x the input's width and height.",
                       "The x4 VAE latent at the input's size, for decoding elsewhere.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("LAVIE_UNET", {"tooltip": "The LaVie VSR UNet (LaVie Loader with lavie_vsr)."}),
            "images": ("IMAGE", {"tooltip": "Low-resolution frames to upscale, e.g. LaVie Decode's output."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt, encoded with the x4 upscaler's text encoder."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (official: 'blur, worst quality'), x4 upscaler text encoder."}),
            "vae": ("VAE", {"tooltip": "The x4 upscaler VAE (LaVie Components Loader with vae = x4, or the x4 upscaler checkpoint)."}),
            "noise_level": ("INT", {"default": 50, "min": 0, "max": 350, "tooltip": (
                "Noise added to the low-res frames before conditioning; higher invents more detail, lower stays closer.")}),
            **_common_inputs(5.0, "ddim", "lavie_ddim for every sampler"),
            "tile": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 8, "tooltip": (
                "Spatial tile size in input pixels for patch-wise denoising; 0 denoises whole frames. "
                "Smaller tiles use less memory.")}),
            "tile_overlap": ("INT", {"default": 32, "min": 0, "max": MAX_SIZE, "tooltip": (
                "Pixels shared by neighbouring tiles; blended to hide seams.")}),
            "chunk_frames": ("INT", {"default": 8, "min": 0, "max": 1024, "tooltip": (
                "Frames the UNet sees at once (official: 8); 0 processes all frames together.")}),
            "chunk_overlap": ("INT", {"default": 2, "min": 0, "max": 1024, "tooltip": (
                "Frames shared by neighbouring chunks, blended for temporal consistency; 0 gives the official cuts.")}),
            "decode_chunk": ("INT", {"default": 2, "min": 1, "max": 1024, "tooltip": (
                "Frames the x4 VAE decodes at once; lower it if decoding runs out of memory.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile: int, tile_overlap: int, chunk_frames: int, chunk_overlap: int) -> bool | str:
        errors = [e for e in (
            _overlap_error("tile", tile, "tile_overlap", tile_overlap),
            _overlap_error("chunk_frames", chunk_frames, "chunk_overlap", chunk_overlap),
        ) if e]
        return "; ".join(errors) if errors else True

    def upscale(self, model: LaVieModel, images: torch.Tensor, positive: list, negative: list, vae: Any,
                noise_level: int, steps: int, cfg: float,
                sampler_name: str, schedule: str, seed: int, tile: int = 0, tile_overlap: int = 32,
                chunk_frames: int = 8, chunk_overlap: int = 2, decode_chunk: int = 2) -> tuple[torch.Tensor, dict]:
        node = "LaVie Upscale"
        model = require_kind(model, "vsr", node)
        check_vae(vae, "vsr", node)
        error = self.VALIDATE_INPUTS(tile, tile_overlap, chunk_frames, chunk_overlap)
        if error is not True:
            raise LaVieError(f"{node}: {error}")
        context, uncond = contexts(positive, negative, model, node)
        low_res = image_to_video(images)
        _, _, f, h, w = low_res.shape
        window_frames = min(chunk_frames or f, f)
        unet = _load(model, _memory(model, window_frames, min(tile or h, h), min(tile or w, w), cfg))
        bar = bridge.progress(steps, latent_format="sd_x4", device=model.device)
        latents = _run_stage(
            node, pipeline.upscale, unet, low_res, context, uncond,
            noise_level=noise_level, steps=steps, cfg=cfg, sampler=sampler_name, seed=seed,
            tile=tile or None, tile_overlap=tile_overlap, chunk_frames=chunk_frames or None,
            chunk_overlap=chunk_overlap, device=model.device, latent_device="cpu",
            callback=bar.on_step, on_call=bar.on_call, **_schedule_kwargs(schedule),
        )
        del low_res
        samples = video_to_raw(latents, STAGE_SCALE["vsr"])
        del latents
        bridge.soft_empty_cache()
        decode_bar = bridge.progress(samples.shape[0], latent_format=None)
        frames = decode_frames(vae, samples, chunk=decode_chunk, progress=decode_bar)
        return frames, {"samples": samples}


NODE_CLASS_MAPPINGS = {
    "LaVieSampler": LaVieSampler,
    "LaVieInterpolate": LaVieInterpolate,
    "LaVieUpscale": LaVieUpscale,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LaVieSampler": "LaVie Sampler (text to video)",
    "LaVieInterpolate": "LaVie Interpolate (4n-3 frames)",
    "LaVieUpscale": "LaVie Upscale (x4 VSR)",
}
