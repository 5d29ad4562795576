"""What travels on the pack's wires: the UNet handle, the pack's CLIP and VAE, and tensor layouts.

ComfyUI conventions kept here:
- LATENT is `{"samples": [F, 4, h, w]}`, one video with its frames as the batch, holding the raw
  VAE latent (the core's UNet-space latent divided by the VAE's scaling factor), so the host's
  own VAEDecode turns it into an IMAGE batch of frames.
- IMAGE is `[F, H, W, 3]` float in 0..1.
- CONDITIONING is `[[tensor [1, tokens, D], {...}], ...]`.

CLIP and VAE inputs accept both the host's objects (from a checkpoint loader) and the pack's own
wrappers (diffusers folders, the bundled tiny set); the pack's wrappers also answer the subset of
the host's CLIP/VAE interface that the core nodes use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lavie_core import compile_unet, pipeline
from lavie_core.loading import KIND_NAMES
from lavie_core.vae import VAEConfig

from . import bridge
from .defaults import RELEASED_UNETS

SD_SCALE = VAEConfig.sd().scaling_factor
X4_SCALE = VAEConfig.x4_upscaler().scaling_factor
# The UNet-space latent of each stage is the latent of the VAE that stage was trained with, times
# that VAE's scaling factor (x8 SD VAE for base and interpolation, x4 upscaler VAE for VSR).
STAGE_SCALE = {"base": SD_SCALE, "interpolation": SD_SCALE, "vsr": X4_SCALE}
STAGE_VAE = {"base": "x8", "interpolation": "x8", "vsr": "x4"}


class LaVieError(Exception):
    """An expected failure (wrong input, missing file); its message says what to do."""


def kind_name(kind: str) -> str:
    return KIND_NAMES.get(kind, kind)


# ----------------------------------------------------------------------------- UNet handle
@dataclass
class LaVieModel:
    """The LAVIE_UNET wire: which cascade stage, and the host patcher that owns the weights."""

    kind: str
    patcher: Any
    name: str = ""
    # The LaVie Loader's `compile`: stages get the UNet through torch.compile.
    compile: bool = False
    # The LaVie Loader's `cuda_graph`: stages replay their UNet calls from CUDA graphs.
    cuda_graph: bool = True
    _compiled: torch.nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def unet(self) -> torch.nn.Module:
        return bridge.module_of(self.patcher)

    @property
    def config(self) -> Any:
        return self.unet.config

    def load(self, memory_required: int = 0) -> torch.nn.Module:
        """The UNet on its compute device, compiled if asked (once per module, so graphs are reused)."""
        module = bridge.load_module(self.patcher, memory_required)
        if not self.compile:
            return module
        if self._compiled is None or self._compiled._orig_mod is not module:
            self._compiled = compile_unet(module)
        return self._compiled

    @property
    def device(self) -> torch.device:
        return bridge.load_device(self.patcher)


def require_kind(model: Any, kind: str, node: str) -> LaVieModel:
    if not isinstance(model, LaVieModel):
        raise LaVieError(
            f"{node} needs a LAVIE_UNET from the LaVie Loader, got {type(model).__name__}; "
            "ComfyUI's own MODEL wires cannot drive the LaVie stages."
        )
    if model.kind != kind:
        source = f" ({model.name})" if model.name else ""
        raise LaVieError(
            f"{node} needs a {kind_name(kind)} UNet, but the connected model{source} is a "
            f"{kind_name(model.kind)} UNet. In the LaVie Loader feeding this node, pick the "
            f"{kind} checkpoint (released: {RELEASED_UNETS[kind]})."
        )
    return model


# ----------------------------------------------------------------------------- text
class LaVieCLIP:
    """The pack's CLIP wire: a core TextEncoder managed by the host."""

    def __init__(self, encoder: Any, patcher: Any, name: str = ""):
        self.encoder = encoder
        self.patcher = patcher
        self.name = name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def encode(self, text: str) -> torch.Tensor:
        """`[1, tokens, D]` float32 on the CPU, as the host keeps conditioning."""
        bridge.load_module(self.patcher)
        return self.encoder.encode([text]).float().cpu()

    # Host CLIP interface, so the core CLIPTextEncode node works with this wire too.
    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
        return {"lavie": self.encoder.tokenize([text])}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False, **kwargs: Any):
        bridge.load_module(self.patcher)
        ids = tokens["lavie"].to(self.encoder.device)
        with torch.no_grad():
            out = self.encoder.model(input_ids=ids)
        cond = out.last_hidden_state.float().cpu()
        pooled = getattr(out, "pooler_output", None)
        pooled = pooled.float().cpu() if pooled is not None else None
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, **kwargs: Any) -> list:
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]


def encode_text(clip: Any, text: str) -> list:
    """CONDITIONING for `text` from the pack's CLIP or the host's."""
    if isinstance(clip, LaVieCLIP):
        return [[clip.encode(text), {}]]
    if clip is None or not hasattr(clip, "tokenize"):
        raise LaVieError(
            f"LaVie Text Encode needs a CLIP (from LaVie Components Loader or a checkpoint loader), "
            f"got {type(clip).__name__}"
        )
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    extra = {"pooled_output": pooled} if pooled is not None else {}
    return [[cond.float().cpu(), extra]]


def _context_of(conditioning: Any, which: str, node: str) -> torch.Tensor:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise LaVieError(f"{node}: the {which} input is not a CONDITIONING (got {type(conditioning).__name__})")
    first = conditioning[0]
    tensor = first[0] if isinstance(first, (list, tuple)) and first else None
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        raise LaVieError(f"{node}: the {which} conditioning holds no [1, tokens, D] text embedding")
    if len(conditioning) > 1:
        bridge.log.warning("%s: %s conditioning has %d entries; LaVie uses the first", node, which, len(conditioning))
    return tensor[:1]


def contexts(positive: Any, negative: Any, model: LaVieModel, node: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, uncond_context), checked against the UNet's text width and brought to equal length."""
    cond = _context_of(positive, "positive", node)
    uncond = _context_of(negative, "negative", node)
    want = int(model.config.cross_attention_dim)
    for which, t in (("positive", cond), ("negative", uncond)):
        if t.shape[-1] != want:
            hint = {768: "Stable Diffusion v1 CLIP ViT-L/14", 1024: "the x4 upscaler's OpenCLIP ViT-H"}.get(want)
            raise LaVieError(
                f"{node}: the {which} conditioning has {t.shape[-1]}-d text embeddings but the "
                f"{kind_name(model.kind)} UNet expects {want}-d"
                + (f" (encode the prompt with {hint})" if hint else "")
                + ". Use the text encoder that belongs to this stage."
            )
    # Prompts over 77 tokens come as several 77-token chunks; batched guidance needs equal lengths,
    # so the shorter side is repeated, as the host's own samplers do.
    n, m = cond.shape[1], uncond.shape[1]
    if n != m:
        lcm = n * m // math.gcd(n, m)
        cond = cond.repeat(1, lcm // n, 1)
        uncond = uncond.repeat(1, lcm // m, 1)
    return cond, uncond


# ----------------------------------------------------------------------------- VAE
class LaVieVAE:
    """The pack's VAE wire: a core AutoencoderKL managed by the host.

    `decode`/`encode` follow the host VAE's contract, so the core VAEDecode/VAEEncode nodes accept it.
    """

    def __init__(self, vae: Any, patcher: Any, name: str = ""):
        self.vae = vae
        self.patcher = patcher
        self.name = name
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downscale_ratio = self.upscale_ratio = int(vae.config.downscale)
        self.latent_channels = int(vae.config.latent_channels)

    def decode_video(self, latents: torch.Tensor, chunk: int, callback: Any = None) -> torch.Tensor:
        """Scaled latents `[B, 4, F, h, w]` -> `[B, 3, F, H, W]` in [-1, 1]-ish, on the CPU."""
        from lavie_core.vae import decode_video

        b, _, f, h, w = latents.shape
        device = bridge.load_device(self.patcher)
        need = decode_memory(bridge.module_of(self.patcher), min(chunk, b * f), h, w, device)
        module = bridge.load_module(self.patcher, need)
        return decode_video(module, latents, chunk=chunk, device=device, out_device="cpu", callback=callback)

    def decode(self, samples_in: torch.Tensor) -> torch.Tensor:
        latents = raw_to_video(samples_in, self.scaling_factor)
        return video_to_image(self.decode_video(latents, chunk=4))

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        from lavie_core.vae import encode_video

        module = bridge.load_module(self.patcher)
        video = image_to_video(pixel_samples[..., :3])
        latents = encode_video(module, video, chunk=4, sample=False)
        return video_to_raw(latents.cpu(), self.scaling_factor)


def decode_memory(vae: torch.nn.Module, frames: int, h: int, w: int, device: torch.device) -> int:
    """Estimated activation bytes of decoding ``frames`` latents of ``h x w`` at once with ``vae`` (a core
    per-image or temporal VAE), for the host to free before the decode; 0 if unknown. The x4 decode of one
    320x512 latent took 3.13 GiB on an H200, more than twice the upscale UNet's weights."""
    try:
        return pipeline.estimate_decode_memory(vae.config, max(1, frames), max(1, h), max(1, w), vae.dtype,
                                               device=device)
    except Exception:  # an estimate only steers offloading; never fail a run on it
        return 0


def vae_scale(vae: Any) -> float:
    """Scaling factor between the raw latent of `vae` and the UNet space of its stage."""
    if isinstance(vae, LaVieVAE):
        return vae.scaling_factor
    ratio = int(getattr(vae, "downscale_ratio", 8) or 8)
    return X4_SCALE if ratio == 4 else SD_SCALE


def vae_ratio(vae: Any) -> int:
    return int(getattr(vae, "upscale_ratio", getattr(vae, "downscale_ratio", 8)) or 8)


def check_vae(vae: Any, stage: str, node: str, input_name: str = "vae") -> None:
    if vae is None or not hasattr(vae, "decode"):
        raise LaVieError(f"{node}: the {input_name} input is not a VAE (got {type(vae).__name__})")
    want = 4 if STAGE_VAE[stage] == "x4" else 8
    have = vae_ratio(vae)
    if have != want:
        raise LaVieError(
            f"{node}: the {kind_name(stage)} stage decodes with the x{want} VAE, but the connected VAE is x{have}. "
            + ("Load the x4 upscaler VAE (LaVie Components Loader with vae = x4)." if want == 4
               else "Load the Stable Diffusion VAE (LaVie Components Loader with vae = x8).")
        )


# ----------------------------------------------------------------------------- layouts
def raw_to_video(samples: torch.Tensor, scale: float) -> torch.Tensor:
    """LATENT samples `[F, 4, h, w]` (raw) -> core latents `[1, 4, F, h, w]` (UNet space)."""
    if samples.ndim != 4:
        raise LaVieError(f"expected a LATENT of frames [F, 4, h, w], got shape {list(samples.shape)}")
    return (samples.float() * scale).permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def video_to_raw(latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Core latents `[B, 4, F, h, w]` -> LATENT samples `[B*F, 4, h, w]` (raw, float32, CPU)."""
    b, c, f, h, w = latents.shape
    return (latents.float().cpu() / scale).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).contiguous()


def image_to_video(images: torch.Tensor) -> torch.Tensor:
    """IMAGE `[F, H, W, 3]` in 0..1 -> `[1, 3, F, H, W]` in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise LaVieError(f"expected an IMAGE batch [F, H, W, 3], got shape {list(images.shape)}")
    return (images[..., :3].float() * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def video_to_image(video: torch.Tensor) -> torch.Tensor:
    """`[B, 3, F, H, W]` in [-1, 1] -> IMAGE `[B*F, H, W, 3]` in 0..1."""
    b, c, f, h, w = video.shape
    frames = video.permute(0, 2, 3, 4, 1).reshape(b * f, h, w, c)
    return ((frames.float() + 1.0) / 2.0).clamp_(0.0, 1.0)


def decode_frames(vae: Any, samples: torch.Tensor, *, chunk: int, progress: bridge.Progress | None = None) -> torch.Tensor:
    """LATENT samples `[F, 4, h, w]` -> IMAGE `[F, H, W, 3]`, `chunk` frames at a time.

    Each chunk goes straight into the preallocated output, so peak memory is the output plus one
    chunk; full-size VSR frames (61 x 1280 x 2048) would not fit twice.
    """
    frames = samples.shape[0]
    chunk = max(1, int(chunk))
    out: torch.Tensor | None = None
    scale = vae_scale(vae)
    for start in range(0, frames, chunk):
        part = samples[start:start + chunk]
        if isinstance(vae, LaVieVAE):
            images = video_to_image(vae.decode_video(raw_to_video(part, scale), chunk=chunk))
        else:
            images = vae.decode(part)
            if images.ndim == 5:  # video VAEs of newer hosts return [B, F, H, W, C]
                images = images.reshape(-1, *images.shape[-3:])
            images = images[..., :3].float().cpu()
        if out is None:
            out = torch.empty((frames, *images.shape[1:]), dtype=torch.float32)
        out[start:start + images.shape[0]] = images
        del images
        if progress is not None:
            progress.tick(min(start + chunk, frames), frames)
    if out is None:
        raise LaVieError("the LATENT holds no frames")
    return out
