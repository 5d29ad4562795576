"""The three cascade stages as nodes: text -> 16 frames, 16 -> 61 frames, x4 super-resolution.

Shared input definitions, checks and stage running live in ``nodes.common``.
"""

from __future__ import annotations

from typing import Any

import torch

from lavie_core import pipeline

from . import bridge
from .common import (
    CATEGORY,
    MAX_SIZE,
    base_model_inputs,
    common_inputs,
    memory,
    overlap_error,
    raise_if_invalid,
    run_stage,
    size_check,
    size_inputs,
    smaller_chunks,
    stage_fits,
    stage_kwargs,
    stage_need,
)
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
            **base_model_inputs(),
            "frames": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": (
                "Frames to generate; the base model was trained on 16.")}),
            **size_inputs(),
            **common_inputs(7.5, "ddpm", "ddpm: lavie_ddpm, ddim: lavie_ddim, euler: euler_discrete, others: karras"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width: int, height: int) -> bool | str:
        return size_check(width, height)

    def sample(self, model: LaVieModel, positive: list, negative: list, frames: int, width: int, height: int, steps: int, cfg: float,
               sampler_name: str, schedule: str, seed: int) -> tuple[dict]:
        node = "LaVie Sampler"
        raise_if_invalid(node, self.VALIDATE_INPUTS(width, height))
        model = require_kind(model, "base", node)
        context, uncond = contexts(positive, negative, model, node)
        need = memory(model, frames, height // 8, width // 8, cfg)
        unet = model.load(need)
        bar = bridge.progress(steps, latent_format="sd15", device=model.device)
        latents = run_stage(
            node, pipeline.text_to_video, unet, context, uncond, frames=frames, height=height, width=width,
            **stage_kwargs(model, bar, need, steps=steps, cfg=cfg, sampler_name=sampler_name, schedule=schedule, seed=seed),
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
            **common_inputs(4.0, "ddim", "lavie_respaced for every sampler"),
            "frame_window": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": (
                "Output frames the UNet sees at once, to bound memory; 0 runs all frames together (official). "
                "Windows are blended at every step.")}),
            "window_overlap": ("INT", {"default": 4, "min": 0, "max": 1024, "tooltip": (
                "Frames shared by neighbouring windows when frame_window is set.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, frame_window: int, window_overlap: int) -> bool | str:
        return overlap_error("frame_window", frame_window, "window_overlap", window_overlap) or True

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
        raise_if_invalid(node, self.VALIDATE_INPUTS(frame_window, window_overlap))
        context, uncond = contexts(positive, negative, model, node)
        window = frame_window or None
        out_frames = 4 * n - 3
        need = memory(model, min(window or out_frames, out_frames), *samples.shape[-2:], cfg)
        unet = model.load(need)
        bar = bridge.progress(steps, latent_format="sd15", device=model.device)
        latents = run_stage(
            node, pipeline.interpolate, unet, raw_to_video(samples, STAGE_SCALE["interpolation"]), context, uncond,
            frame_window=window, window_overlap=window_overlap,
            **stage_kwargs(model, bar, need, steps=steps, cfg=cfg, sampler_name=sampler_name, schedule=schedule, seed=seed),
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
            **common_inputs(5.0, "ddim", "lavie_ddim for every sampler"),
            "tile": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 8, "tooltip": (
                "Spatial tile size in input pixels for patch-wise denoising; 0 denoises whole frames. "
                "Smaller tiles use less memory.")}),
            "tile_overlap": ("INT", {"default": 32, "min": 0, "max": MAX_SIZE, "tooltip": (
                "Pixels shared by neighbouring tiles; blended to hide seams.")}),
            "chunk_frames": ("INT", {"default": 8, "min": 0, "max": 1024, "tooltip": (
                "Frames the UNet sees at once (official: 8); 0 processes all frames together. GPU memory of a "
                "call at a 320x512 input with guidance, fp16, weights included: about 7.9 GiB for 8 frames, "
                "4.7 GiB for 4; a whole stage needs more, as the pool fragments. Where the card lacks room for a "
                "stage of them (12 GiB cards: 4 frames, 8 GiB: 2) the node halves them, saying so in the log.")}),
            "chunk_overlap": ("INT", {"default": 2, "min": 0, "max": 1024, "tooltip": (
                "Frames shared by neighbouring chunks, blended for temporal consistency; 0 gives the official cuts.")}),
            "decode_chunk": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip": (
                "Frames the x4 VAE decodes at once. Each 1280x2048 frame needs about 3.1 GiB (fp16, NVIDIA "
                "GPUs); more at once are no faster.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile: int, tile_overlap: int, chunk_frames: int, chunk_overlap: int) -> bool | str:
        errors = [e for e in (
            overlap_error("tile", tile, "tile_overlap", tile_overlap),
            overlap_error("chunk_frames", chunk_frames, "chunk_overlap", chunk_overlap),
        ) if e]
        return "; ".join(errors) if errors else True

    def upscale(self, model: LaVieModel, images: torch.Tensor, positive: list, negative: list, vae: Any,
                noise_level: int, steps: int, cfg: float,
                sampler_name: str, schedule: str, seed: int, tile: int = 0, tile_overlap: int = 32,
                chunk_frames: int = 8, chunk_overlap: int = 2, decode_chunk: int = 1) -> tuple[torch.Tensor, dict]:
        node = "LaVie Upscale"
        model = require_kind(model, "vsr", node)
        check_vae(vae, "vsr", node)
        raise_if_invalid(node, self.VALIDATE_INPUTS(tile, tile_overlap, chunk_frames, chunk_overlap))
        context, uncond = contexts(positive, negative, model, node)
        low_res = image_to_video(images)
        _, _, f, h, w = low_res.shape
        # The chunk the card likely holds is chosen before the stage (stage_need); out of GPU memory all the
        # same, the stage starts again with smaller chunks rather than fail the run.
        plans = [(chunk_frames or None, chunk_overlap), *smaller_chunks(chunk_frames, chunk_overlap, f)]
        failed = False
        for attempt, (window_frames, overlap) in enumerate(plans):
            if failed:
                # After the except block: the failed attempt's tensors and graphs are gone by now.
                bridge.unload_all()
            need = memory(model, min(window_frames or f, f), min(tile or h, h), min(tile or w, w), cfg)
            unet = model.load(stage_need(need))
            last = attempt == len(plans) - 1
            if not last and not stage_fits(model, need):
                smaller, smaller_overlap = plans[attempt + 1]
                bridge.log.info(
                    "LaVie: %s starts with %d-frame chunks overlapping by %d: %.1f GiB free, %d-frame chunks need "
                    "about %.1f GiB (set chunk_frames to %d to start there)", node, smaller, smaller_overlap,
                    bridge.free_memory(model.device) / 2**30, window_frames or f, stage_need(need) / 2**30, smaller)
                continue
            bar = bridge.progress(steps, latent_format="sd_x4", device=model.device)
            try:
                latents = run_stage(
                    node, pipeline.upscale, unet, low_res, context, uncond, noise_level=noise_level,
                    tile=tile or None, tile_overlap=tile_overlap, chunk_frames=window_frames, chunk_overlap=overlap,
                    latent_device="cpu",
                    **stage_kwargs(model, bar, need, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                   schedule=schedule, seed=seed),
                )
                break
            except Exception as e:
                if not bridge.is_out_of_memory(e) or last:
                    raise
                failed = True
                smaller, smaller_overlap = plans[attempt + 1]
                bridge.log.warning(
                    "LaVie: %s ran out of GPU memory with %d-frame chunks; starting again with %d-frame chunks "
                    "overlapping by %d (set chunk_frames to %d to start there)", node, window_frames or f, smaller,
                    smaller_overlap, smaller)
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
