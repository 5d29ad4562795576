"""Configuration of the three LaVie UNets.

The base, interpolation and VSR networks are one architecture with different switches. Field names are
part of the saved-checkpoint format (they travel as JSON in safetensors metadata), so they never change.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

ModelKind = Literal["base", "interpolation", "vsr"]
KINDS: tuple[str, ...] = ("base", "interpolation", "vsr")


@dataclass(frozen=True)
class UNetConfig:
    """One UNet of the cascade.

    Levels are listed top (full resolution) to bottom; up levels mirror the down levels.
    """

    kind: str
    in_channels: int
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Which levels carry spatial transformers. SD 1.x: all but the deepest; x4 upscaler: all but the top.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    heads: int = 8
    cross_attention_dim: int = 768
    # The x4 upscaler projects in/out of transformers with Linear layers, SD 1.x with 1x1 convolutions.
    linear_projection: bool = False
    # Per level: the first attention of each transformer block attends to text instead of to the frame
    # (an x4-upscaler trait; the mid block never does).
    text_only_attention: tuple[bool, ...] = (False, False, False, False)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # "full": attention within each frame; "sparse_causal": frame i attends to frames 0 and i-1.
    spatial_attention: str = "full"
    # "rotary": rotary positions on q/k plus a learned T5 relative bias; "plain": no positional signal.
    temporal_attention: str = "rotary"
    temporal_after_ff: bool = False
    # State-dict stem of the temporal attention: attn_temp/norm_temp (base, interpolation) or
    # attn_temporal/norm_temporal (VSR).
    temporal_attr: str = "temp"
    # VSR: a Conv3d residual block over time in front of every spatial transformer.
    temporal_resblocks: bool = False
    # VSR: a temporal module after every down, mid and up block.
    temporal_modules: bool = False
    num_noise_levels: int | None = None
    max_noise_level: int | None = None
    rotary_dim: int = 32
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 32

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if self.kind not in KINDS:
            raise ValueError(f"UNetConfig.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("attention_levels", "text_only_attention"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UNetConfig.{name} needs one entry per level ({n}), got {len(getattr(self, name))}"
                )
        if self.spatial_attention not in ("full", "sparse_causal"):
            raise ValueError(f"unknown spatial_attention {self.spatial_attention!r}")
        if self.temporal_attention not in ("rotary", "plain"):
            raise ValueError(f"unknown temporal_attention {self.temporal_attention!r}")
        for c in self.block_out_channels:
            if c % self.heads or c % self.norm_groups:
                raise ValueError(
                    f"channels {c} must be divisible by heads ({self.heads}) and norm_groups ({self.norm_groups})"
                )
        if self.temporal_attention == "rotary":
            head_dim = min(self.block_out_channels) // self.heads
            if self.rotary_dim % 2 or self.rotary_dim > head_dim:
                raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= the head size {head_dim}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def conditioning_channels(self) -> int:
        """Channels concatenated to the noisy latent: copied latent (interpolation) or low-res RGB (VSR)."""
        return self.in_channels - self.out_channels

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UNetConfig:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}")
        for key, value in data.items():
            if isinstance(value, list):
                data[key] = tuple(value)
        return cls(**data)

    # Presets of the released checkpoints.
    @classmethod
    def base(cls) -> UNetConfig:
        return cls(kind="base", in_channels=4)

    @classmethod
    def interpolation(cls) -> UNetConfig:
        return cls(
            kind="interpolation",
            in_channels=8,
            spatial_attention="sparse_causal",
            temporal_attention="plain",
            temporal_after_ff=True,
        )

    @classmethod
    def vsr(cls) -> UNetConfig:
        return cls(
            kind="vsr",
            in_channels=7,
            block_out_channels=(256, 512, 512, 1024),
            attention_levels=(False, True, True, True),
            cross_attention_dim=1024,
            linear_projection=True,
            text_only_attention=(True, True, True, False),
            temporal_attr="temporal",
            temporal_resblocks=True,
            temporal_modules=True,
            num_noise_levels=1000,
            max_noise_level=350,
        )

    @classmethod
    def preset(cls, kind: str) -> UNetConfig:
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
        return getattr(cls, kind)()

    @classmethod
    def tiny(cls, kind: str, **overrides: Any) -> UNetConfig:
        """The same architecture at toy width, for tests: two levels, 32/64 channels, 2 heads."""
        full = cls.preset(kind)
        top_attention = kind != "vsr"
        small = replace(
            full,
            block_out_channels=(32, 64),
            attention_levels=(top_attention, not top_attention),
            text_only_attention=(False, kind == "vsr"),
            layers_per_block=1,
            heads=2,
            cross_attention_dim=32,
            norm_groups=8,
            rotary_dim=8,
            num_noise_levels=full.num_noise_levels and 400,
        )
        return replace(small, **overrides)
