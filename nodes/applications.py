"""Nodes beyond the cascade: LoRA personalisation, long videos, and video-aware VAE decoding."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lavie_core.long_video import clip_plan, extend_video, sliding_window_video
from lavie_core.lora import LoraError, load_lora_file, lora_deltas, parse_lora
from lavie_core.temporal_vae import (
    TemporalAutoencoder,
    decode_video_temporal,
    detect_layout,
    load_temporal_vae,
    temporal_smooth,
)

from . import bridge
from .models import (
    SD_SCALE,
    STAGE_SCALE,
    LaVieError,
    LaVieModel,
    LaVieVAE,
    contexts,
    decode_memory,
    image_to_video,
    raw_to_video,
    require_kind,
    video_to_image,
    video_to_raw,
)
from .common import (
    CATEGORY,
    base_model_inputs,
    common_inputs,
    dtype_device_inputs,
    memory,
    raise_if_invalid,
    run_stage,
    size_check,
    size_inputs,
    stage_kwargs,
)

NONE = "none"
LORA_DIR = "loras"


# ----------------------------------------------------------------------------- LoRA
def lora_files() -> list[str]:
    """LoRA files in the lavie folders: everything under `loras/`, and files named like a LoRA elsewhere."""
    out = []
    for name in bridge.model_files():
        parts = Path(name).parts
        if parts[0] == LORA_DIR or "lora" in Path(name).stem.lower():
            out.append(name)
    return out


def _missing_lora(name: str) -> str:
    return (f"LoRA file '{name}' was not found. Put Stable Diffusion 1.x LoRA files in "
            f"ComfyUI/models/lavie/{LORA_DIR}/ (searched: {', '.join(bridge.model_folders())}) and refresh.")


def _patched_clone(patcher: Any, patches: dict[str, tuple[torch.Tensor]]) -> Any:
    """A clone of the host patcher carrying whole-tensor differences, applied by the host when it loads
    the model and removed when it unloads it, like its own LoRA loader; the source patcher is untouched."""
    clone = patcher.clone()
    added = clone.add_patches(patches, 1.0)
    if added is not None and len(added) != len(patches):
        missing = sorted(set(patches) - set(added))[:5]
        raise LaVieError(f"LaVie LoRA Loader: the host refused {len(patches) - len(added)} patches, e.g. {missing}")
    return clone


class LaVieLoRALoader:
    DESCRIPTION = (
        "Applies a Stable Diffusion 1.x LoRA (kohya / A1111, diffusers / PEFT, LyCORIS LoCon, LoHa, LoKr) to "
        "the spatial layers of a LaVie base or interpolation UNet; the temporal layers stay as trained. Chain "
        "several loaders to stack LoRAs. Keys that do not fit are listed in the report, never dropped silently; "
        "an SDXL or SD 2.x LoRA is refused with the offending key and shapes."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("LAVIE_UNET", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = (
        "The UNet with the LoRA applied while it is loaded (the input model stays unchanged).",
        "What was applied: patched layers, and text-encoder, temporal or unmatched keys that were not.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("LAVIE_UNET", {"tooltip": "A LaVie base or interpolation UNet (LaVie Loader or another LoRA loader)."}),
            "lora_name": ([NONE, *lora_files()], {"default": NONE, "tooltip": (
                f"Stable Diffusion 1.x LoRA file from models/lavie/{LORA_DIR}/ (.safetensors, .pt). none passes "
                "the model through unchanged.")}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip": (
                "Multiplier of the LoRA's change (on top of its alpha / rank scaling); 0 leaves the model exactly "
                "as it was, negative values push away from the LoRA's concept.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: str) -> bool | str:
        if lora_name in (None, NONE):
            return True
        return True if bridge.resolve_model_path(lora_name) else _missing_lora(lora_name)

    def apply(self, model, lora_name: str, strength: float) -> tuple[LaVieModel, str]:
        node = "LaVie LoRA Loader"
        if not isinstance(model, LaVieModel):
            raise LaVieError(f"{node} needs a LAVIE_UNET from the LaVie Loader, got {type(model).__name__}")
        if lora_name == NONE:
            return model, "no LoRA selected; model unchanged"
        path = bridge.resolve_model_path(lora_name)
        if path is None:
            raise LaVieError(_missing_lora(lora_name))
        try:
            state_dict, metadata = load_lora_file(path)
            parsed = parse_lora(state_dict, name=lora_name, metadata=metadata)
            deltas, reports = lora_deltas(model.unet, [(parsed, float(strength))])
        except (LoraError, ValueError, OSError) as e:
            raise LaVieError(f"{node}: {e}") from None
        report = reports[0].summary()
        bridge.log.info("LaVie: %s", report)
        if not deltas:
            return model, report
        params = dict(model.unet.named_parameters())
        patches = {f"diffusion_model.{name}": (delta.to(params[name].dtype),) for name, delta in deltas.items()}
        patched = _patched_clone(model.patcher, patches)
        label = f"{model.name} + {Path(lora_name).name}@{strength:g}" if model.name else lora_name
        return dataclasses.replace(model, patcher=patched, name=label), report


# ----------------------------------------------------------------------------- long videos
class LaVieExtendVideo:
    DESCRIPTION = (
        "Long videos with the LaVie base UNet by recursive extension (LVDM-style): each new 16-frame clip starts "
        "with the last frames generated so far, written into the clip at every step (inpainting by replacement), "
        "optionally with conditional latent perturbation and unconditional guidance against drift. Connect a "
        "latent to continue an existing video. Clip seams can show: the released model was not trained for this; "
        "LaVie Sliding Window Sampler blends instead."
    )
    CATEGORY = CATEGORY
    FUNCTION = "extend"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Video latent with total_frames frames (frames as the batch).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                **base_model_inputs(),
                "total_frames": ("INT", {"default": 64, "min": 2, "max": 4096, "tooltip": (
                    "Frames of the whole video, including a connected latent's frames.")}),
                "clip_frames": ("INT", {"default": 16, "min": 2, "max": 256, "tooltip": (
                    "Frames the UNet generates per clip; the base model was trained on 16.")}),
                "cond_frames": ("INT", {"default": 4, "min": 1, "max": 255, "tooltip": (
                    "Last frames of the video so far that start every new clip; each clip adds clip_frames - "
                    "cond_frames frames.")}),
                "cond_noise": ("INT", {"default": 0, "min": 0, "max": 999, "tooltip": (
                    "Conditional latent perturbation: extra noise on the carried-over frames, as a training "
                    "timestep (LVDM used 100), so artefacts are not copied clip after clip. 0: none.")}),
                "uncond_guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip": (
                    "LVDM's unconditional guidance w: (1 + w) x (clip with the carried frames) - w x (new frames "
                    "alone), to keep new clips tied to the video. LVDM used 0.1; 0 saves a pass per step.")}),
                **size_inputs(),
                **common_inputs(7.5, "ddpm", "ddpm: lavie_ddpm, ddim: lavie_ddim, euler: euler_discrete, others: karras"),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": (
                    "Optional video latent to continue (e.g. from LaVie Sampler); its size replaces width and height.")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width: int, height: int, clip_frames: int, cond_frames: int) -> bool | str:
        size = size_check(width, height)
        if size is not True:
            return size
        if clip_frames is not None and cond_frames is not None and int(cond_frames) >= int(clip_frames):
            return f"cond_frames ({cond_frames}) must be smaller than clip_frames ({clip_frames})"
        return True

    def extend(self, model, positive, negative, total_frames: int, clip_frames: int, cond_frames: int,
               cond_noise: int, uncond_guidance: float, width: int, height: int, steps: int, cfg: float,
               sampler_name: str, schedule: str, seed: int, latent: dict | None = None) -> tuple[dict]:
        node = "LaVie Extend Video"
        raise_if_invalid(node, self.VALIDATE_INPUTS(width, height, clip_frames, cond_frames))
        model = require_kind(model, "base", node)
        context, uncond = contexts(positive, negative, model, node)
        initial = None
        if latent is not None:
            samples = latent.get("samples") if isinstance(latent, dict) else None
            if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
                raise LaVieError(f"{node}: the latent input holds no video latent [F, 4, h, w]")
            initial = raw_to_video(samples, STAGE_SCALE["base"])
            height, width = initial.shape[-2] * 8, initial.shape[-1] * 8
        start = initial.shape[2] if initial is not None else min(clip_frames, total_frames)
        clips = len(clip_plan(total_frames, clip_frames, cond_frames, start)) + (initial is None)
        need = memory(model, clip_frames, height // 8, width // 8, cfg)
        unet = model.load(need)
        bar = bridge.progress(max(1, clips) * steps, latent_format="sd15", device=model.device)
        latents = run_stage(
            node, extend_video, unet, context, uncond,
            total_frames=total_frames, clip_frames=clip_frames, cond_frames=cond_frames, cond_noise=cond_noise,
            uncond_guidance=uncond_guidance, initial=initial, height=height, width=width,
            **stage_kwargs(model, bar, need, steps=steps, cfg=cfg, sampler_name=sampler_name, schedule=schedule, seed=seed),
        )
        return ({"samples": video_to_raw(latents, STAGE_SCALE["base"])},)


class LaVieSlidingWindowSampler:
    DESCRIPTION = (
        "Long videos with the LaVie base UNet by sliding context windows (like AnimateDiff's context options): "
        "all frames are denoised together; at every step the UNet sees overlapping windows of context_length "
        "frames whose predictions are blended smoothly. With context_length >= frames it is LaVie Sampler exactly."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Video latent with the requested frames (frames as the batch).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            **base_model_inputs(),
            "frames": ("INT", {"default": 64, "min": 1, "max": 4096, "tooltip": "Frames of the whole video."}),
            "context_length": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": (
                "Frames the UNet sees at once; the base model was trained on 16.")}),
            "context_overlap": ("INT", {"default": 4, "min": 0, "max": 255, "tooltip": (
                "Frames shared by neighbouring windows, blended with smooth weights; more overlap, smoother "
                "transitions, more UNet calls.")}),
            **size_inputs(),
            **common_inputs(7.5, "ddpm", "ddpm: lavie_ddpm, ddim: lavie_ddim, euler: euler_discrete, others: karras"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width: int, height: int, context_length: int, context_overlap: int) -> bool | str:
        size = size_check(width, height)
        if size is not True:
            return size
        if context_length is not None and context_overlap is not None and int(context_overlap) >= int(context_length):
            return f"context_overlap ({context_overlap}) must be smaller than context_length ({context_length})"
        return True

    def sample(self, model, positive, negative, frames: int, context_length: int, context_overlap: int,
               width: int, height: int, steps: int, cfg: float, sampler_name: str, schedule: str,
               seed: int) -> tuple[dict]:
        node = "LaVie Sliding Window Sampler"
        raise_if_invalid(node, self.VALIDATE_INPUTS(width, height, context_length, context_overlap))
        model = require_kind(model, "base", node)
        context, uncond = contexts(positive, negative, model, node)
        need = memory(model, min(context_length, frames), height // 8, width // 8, cfg)
        unet = model.load(need)
        bar = bridge.progress(steps, latent_format="sd15", device=model.device)
        latents = run_stage(
            node, sliding_window_video, unet, context, uncond,
            frames=frames, context_length=context_length, context_overlap=context_overlap, height=height,
            width=width, latent_device="cpu",
            **stage_kwargs(model, bar, need, steps=steps, cfg=cfg, sampler_name=sampler_name, schedule=schedule, seed=seed),
        )
        return ({"samples": video_to_raw(latents, STAGE_SCALE["base"])},)


# ----------------------------------------------------------------------------- temporal VAE
def vae_files() -> list[str]:
    """VAE files in the lavie folders: anything in a `vae` folder or named like a VAE."""
    out = []
    for name in bridge.model_files():
        path = Path(name)
        if "vae" in (p.lower() for p in path.parts[:-1]) or "vae" in path.stem.lower():
            out.append(name)
    return out


class LaVieVideoVAE:
    """VAE wire that decodes whole videos: the SVD temporal decoder in overlapping windows, or a 2-D VAE
    (the pack's or the host's) frame by frame with optional temporal smoothing.

    It answers the host VAE contract (``decode`` of `[F, 4, h, w]` raw latents -> `[F, H, W, 3]`), so
    ComfyUI's VAE Decode and LaVie Decode accept it. Every call is decoded as one video, so give it all
    frames at once (LaVie Decode: frame_chunk >= frames); memory is bounded by ``chunk`` here.
    """

    def __init__(self, *, temporal: TemporalAutoencoder | None = None, patcher: Any = None, inner: Any = None,
                 chunk: int = 14, overlap: int = 4, smooth: float = 0.0, sigma: float = 0.1, name: str = ""):
        self.temporal = temporal
        self.patcher = patcher
        self.inner = inner
        self.chunk = chunk
        self.overlap = overlap
        self.smooth = smooth
        self.sigma = sigma
        self.name = name
        if temporal is not None:
            self.scaling_factor = float(temporal.config.scaling_factor)
            self.downscale_ratio = self.upscale_ratio = int(temporal.config.downscale)
            self.latent_channels = int(temporal.config.latent_channels)
        else:
            self.scaling_factor = float(getattr(inner, "scaling_factor", SD_SCALE))
            self.downscale_ratio = self.upscale_ratio = int(getattr(inner, "downscale_ratio", 8) or 8)
            self.latent_channels = int(getattr(inner, "latent_channels", 4) or 4)

    def decode(self, samples_in: torch.Tensor) -> torch.Tensor:
        if samples_in.ndim != 4:
            raise LaVieError(f"expected a LATENT of frames [F, 4, h, w], got shape {list(samples_in.shape)}")
        frames = samples_in.shape[0]
        bar = bridge.progress(frames, latent_format=None)
        if self.temporal is not None:
            device = bridge.load_device(self.patcher)
            need = decode_memory(bridge.module_of(self.patcher), min(self.chunk, frames), *samples_in.shape[-2:], device)
            module = bridge.load_module(self.patcher, need)
            video = decode_video_temporal(
                module, raw_to_video(samples_in, self.scaling_factor), chunk=self.chunk, overlap=self.overlap,
                device=device, out_device="cpu", callback=bar.tick,
            )
            return video_to_image(video)
        return self._decode_2d(samples_in, bar)

    def _decode_2d(self, samples: torch.Tensor, bar: bridge.Progress) -> torch.Tensor:
        frames = samples.shape[0]
        pad = 1 if self.smooth > 0 else 0
        out: torch.Tensor | None = None
        for start in range(0, frames, self.chunk):
            stop = min(frames, start + self.chunk)
            lo, hi = max(0, start - pad), min(frames, stop + pad)
            images = self.inner.decode(samples[lo:hi])
            if images.ndim == 5:
                images = images.reshape(-1, *images.shape[-3:])
            video = image_to_video(images[..., :3].float().cpu())
            video = temporal_smooth(video, self.smooth, sigma=self.sigma, context=(start - lo, hi - stop))
            part = video_to_image(video)
            if out is None:
                out = torch.empty((frames, *part.shape[1:]), dtype=torch.float32)
            out[start:stop] = part
            bar.tick(stop, frames)
        if out is None:
            raise LaVieError("the LATENT holds no frames")
        return out

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        if self.temporal is None:
            return self.inner.encode(pixel_samples)
        module = bridge.load_module(self.patcher)
        if not module.config.has_encoder:
            raise LaVieError(f"{self.name}: this temporal VAE file has no encoder; it can only decode")
        images = pixel_samples[..., :3].float().movedim(-1, 1) * 2.0 - 1.0
        device = bridge.load_device(self.patcher)
        latents = []
        with torch.no_grad():
            for start in range(0, images.shape[0], max(1, self.chunk)):
                mean, _ = module.encode(images[start:start + self.chunk].to(device, module.dtype))
                latents.append(mean.float().cpu())
        return torch.cat(latents)


class LaVieTemporalVAELoader:
    DESCRIPTION = (
        "A VAE that decodes LaVie latents as video. With the Stable Video Diffusion VAE (stabilityai/"
        "stable-video-diffusion-img2vid vae/, diffusers or single-file layout) its temporal layers decode SD 1.x "
        "latents with less flicker, in overlapping windows of frames. With a plain SD VAE (a file here, or the vae "
        "input) frames decode independently, and optional smoothing averages small frame-to-frame flicker. Feed "
        "the whole video at once: in LaVie Decode set frame_chunk to at least the frame count (memory is bounded "
        "by chunk here)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("VAE for LaVie Decode or ComfyUI's VAE Decode (x8, SD 1.x latent space).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae_name": ([NONE, *vae_files()], {"default": NONE, "tooltip": (
                    "VAE file under models/lavie/ (a vae/ folder or a name containing 'vae'): the SVD temporal "
                    "VAE, or a plain SD VAE. none: use the vae input.")}),
                "chunk": ("INT", {"default": 14, "min": 1, "max": 1024, "tooltip": (
                    "Frames decoded at once (SVD decodes 14); lower it if decoding runs out of memory.")}),
                "overlap": ("INT", {"default": 4, "min": 0, "max": 1023, "tooltip": (
                    "Temporal VAE only: frames shared by neighbouring windows, cross-faded; at least 2 lets every "
                    "frame see its neighbours.")}),
                "smoothing": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                    "2-D VAE only: weight of the neighbouring frames in a temporal bilateral filter on the "
                    "decoded pixels; 0 is off. Reduces flicker, softens slowly moving fine texture.")}),
                "smoothing_sigma": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                    "2-D VAE only: pixel difference (on a -1..1 scale) above which a neighbour counts as motion "
                    "and is not averaged in.")}),
                **dtype_device_inputs(),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": (
                    "A loaded 2-D VAE (LaVie Components Loader or a checkpoint loader) to decode with when vae_name "
                    "is none.")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name: str, chunk: int, overlap: int) -> bool | str:
        if vae_name not in (None, NONE) and bridge.resolve_model_path(vae_name) is None:
            return (f"VAE file '{vae_name}' was not found in the lavie model folders "
                    f"({', '.join(bridge.model_folders())})")
        if chunk is not None and overlap is not None and int(overlap) >= int(chunk) > 1:
            return f"overlap ({overlap}) must be smaller than chunk ({chunk})"
        return True

    def load(self, vae_name: str, chunk: int, overlap: int, smoothing: float, smoothing_sigma: float,
             dtype: str = "auto", device: str = "auto", vae: Any = None) -> tuple[LaVieVideoVAE]:
        node = "LaVie Temporal VAE Loader"
        raise_if_invalid(node, self.VALIDATE_INPUTS(vae_name, chunk, overlap))
        overlap = min(overlap, chunk - 1) if chunk > 1 else 0
        settings = dict(chunk=chunk, overlap=overlap, smooth=smoothing, sigma=smoothing_sigma)
        if vae_name == NONE:
            if vae is None:
                raise LaVieError(f"{node}: choose a vae_name or connect a VAE to the vae input")
            return (LaVieVideoVAE(inner=vae, name=getattr(vae, "name", "vae input"), **settings),)
        path = bridge.resolve_model_path(vae_name)
        compute = bridge.compute_device(device)
        weight_dtype = bridge.resolve_dtype(dtype, compute, "vae")
        try:
            state_dict = _read_state_dict(Path(path))
            if detect_layout(state_dict) is not None:
                module = load_temporal_vae(state_dict, dtype=weight_dtype)
            else:
                from lavie_core.vae import load_vae

                plain = load_vae(state_dict, dtype=weight_dtype)
                wire = LaVieVAE(plain, bridge.wrap_module(plain, device, attr="first_stage_model"), name=vae_name)
                bridge.log.info("LaVie: %s is a 2-D VAE; decoding frame by frame", vae_name)
                return (LaVieVideoVAE(inner=wire, name=vae_name, **settings),)
        except (ValueError, OSError) as e:
            raise LaVieError(f"{node}: cannot load {vae_name}: {e}") from None
        offload = bridge.offload_device(device)
        if offload != torch.device("cpu"):
            module.to(offload)
        patcher = bridge.wrap_module(module, device, attr="first_stage_model")
        bridge.log.info("LaVie: loaded temporal VAE %s (%s)", vae_name, weight_dtype)
        return (LaVieVideoVAE(temporal=module, patcher=patcher, name=vae_name, **settings),)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


NODE_CLASS_MAPPINGS = {
    "LaVieLoRALoader": LaVieLoRALoader,
    "LaVieExtendVideo": LaVieExtendVideo,
    "LaVieSlidingWindowSampler": LaVieSlidingWindowSampler,
    "LaVieTemporalVAELoader": LaVieTemporalVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LaVieLoRALoader": "LaVie LoRA Loader",
    "LaVieExtendVideo": "LaVie Extend Video (long, clip by clip)",
    "LaVieSlidingWindowSampler": "LaVie Sliding Window Sampler (long)",
    "LaVieTemporalVAELoader": "LaVie Temporal VAE Loader",
}
