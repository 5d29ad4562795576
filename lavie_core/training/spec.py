"""Sizes of the tiny cascade: the bundled one, and a micro one that trains in seconds on a CPU."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import UNetConfig
from ..vae import VAEConfig
from .text import TextSpec


@dataclass(frozen=True)
class CascadeSpec:
    """Everything that fixes tensor shapes: resolutions, frame counts and the six networks."""

    size: int  # base and interpolation frames are size x size pixels
    frames: int  # base clip length; interpolation makes factor * (frames - 1) + 1
    text: TextSpec
    vae: VAEConfig  # x8: base and interpolation latents
    vae_x4: VAEConfig  # x4: VSR latents
    base: UNetConfig
    interpolation: UNetConfig
    vsr: UNetConfig
    factor: int = 4
    vsr_scale: int = 4
    vsr_chunk: int = 8
    image_frames: int = 4  # still images appended to each clip in joint image-video training

    @property
    def latent_size(self) -> int:
        return self.size // self.vae.downscale

    @property
    def interpolated_frames(self) -> int:
        return self.factor * (self.frames - 1) + 1

    @property
    def vsr_size(self) -> int:
        return self.size * self.vsr_scale


def _unet(kind: str, channels: tuple[int, ...], attention: tuple[bool, ...], heads: int, text_dim: int, groups: int,
          rotary: int, text_only: tuple[bool, ...] | None = None) -> UNetConfig:
    return UNetConfig.tiny(
        kind,
        block_out_channels=channels,
        attention_levels=attention,
        text_only_attention=text_only or (False,) * len(channels),
        layers_per_block=1,
        heads=heads,
        cross_attention_dim=text_dim,
        norm_groups=groups,
        rotary_dim=rotary,
    )


def tiny_cascade() -> CascadeSpec:
    """The bundled cascade: 16 frames of 64x64 -> 61 frames -> 256x256; about 27 MB in fp16."""
    text = TextSpec(hidden=64, layers=2, heads=4, intermediate=256)
    return CascadeSpec(
        size=64,
        frames=16,
        text=text,
        # 32 groups everywhere: the VAE loader assumes the Stable Diffusion norm layout.
        vae=VAEConfig((32, 64, 64, 64), 1),
        vae_x4=VAEConfig((32, 64, 64), 1),
        base=_unet("base", (64, 128), (True, True), 4, text.hidden, 32, 16),
        # Same widths as the base model, so its spatial weights can initialise this one (as LaVie does).
        interpolation=_unet("interpolation", (64, 128), (True, True), 4, text.hidden, 32, 16),
        # Attention only at the coarsest level (16x16 latents): the top levels are what CPU time goes to.
        vsr=_unet("vsr", (32, 64, 64), (False, False, True), 4, text.hidden, 16, 8),
    )


def micro_cascade() -> CascadeSpec:
    """Smallest shapes that exercise every code path; for smoke runs and tests."""
    text = TextSpec(hidden=32, layers=1, heads=2, intermediate=64)
    return CascadeSpec(
        size=16,
        frames=4,
        text=text,
        vae=VAEConfig((32, 32, 32, 32), 1),
        vae_x4=VAEConfig((32, 32, 32), 1),
        base=_unet("base", (32, 64), (True, True), 2, text.hidden, 8, 8),
        interpolation=_unet("interpolation", (32, 64), (True, True), 2, text.hidden, 8, 8),
        vsr=_unet("vsr", (16, 32), (False, True), 2, text.hidden, 8, 8),
        vsr_chunk=4,
        image_frames=2,
    )


SPECS = {"tiny": tiny_cascade, "micro": micro_cascade}
