"""The LaVie UNet: one class, configured as base, interpolation or VSR network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import fused
from .blocks import (
    Downsample,
    FrameConv2d,
    RelativePositionBias,
    VideoGroupNorm,
    ResnetBlock,
    RotaryEmbedding,
    SpatialTransformer,
    TemporalModule,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
    to_channels_last,
    widen,
)
from .config import UNetConfig


class _Level(nn.Module):
    """One resolution level: resnets, optional transformers after each, optional resampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)

    def layers(self):
        attentions = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            yield resnet, attentions[i] if attentions is not None else None


class LaVieUNet(nn.Module):
    """Video UNet. `forward(x, timesteps, context, noise_level=None)` with `x` as `b c f h w`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        chans = c.block_out_channels
        levels = len(chans)
        temb = c.time_embed_dim
        rotary = RotaryEmbedding(c.rotary_dim) if c.temporal_attention == "rotary" else None
        if rotary is not None and c.kind == "vsr":
            # The VSR checkpoint also lists the shared rotary table at the top level.
            self.temporal_rotary_emb = rotary

        def transformer(channels: int, spatial: str) -> SpatialTransformer:
            rel_pos = None
            if c.temporal_attention == "rotary":
                rel_pos = RelativePositionBias(c.heads, c.rel_pos_buckets, c.rel_pos_max_distance)
            return SpatialTransformer(
                channels,
                c.heads,
                c.cross_attention_dim,
                groups=c.norm_groups,
                linear_projection=c.linear_projection,
                temporal_resblock=c.temporal_resblocks,
                spatial=spatial,
                temporal_attr=c.temporal_attr,
                temporal_after_ff=c.temporal_after_ff,
                rotary=rotary,
                rel_pos=rel_pos,
            )

        def spatial_kind(level: int) -> str:
            return "text" if c.text_only_attention[level] else c.spatial_attention

        def resnet(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, temb, c.norm_groups, c.norm_eps)

        self.conv_in = FrameConv2d(c.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        if c.num_noise_levels is not None:
            self.class_embedding = nn.Embedding(c.num_noise_levels, temb)

        self.down_blocks = nn.ModuleList()
        cout = chans[0]
        for i in range(levels):
            cin, cout = cout, chans[i]
            attn = c.attention_levels[i]
            level = _Level(
                [resnet(cin if j == 0 else cout, cout) for j in range(c.layers_per_block)],
                [transformer(cout, spatial_kind(i)) for _ in range(c.layers_per_block)] if attn else None,
            )
            if i < levels - 1:
                level.downsamplers = nn.ModuleList([Downsample(cout)])
            self.down_blocks.append(level)

        self.mid_block = _Level(
            [resnet(chans[-1], chans[-1]), resnet(chans[-1], chans[-1])],
            [transformer(chans[-1], c.spatial_attention)],
        )

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        cout = rev[0]
        for i in range(levels):
            prev, cout = cout, rev[i]
            skip_in = rev[min(i + 1, levels - 1)]
            down_level = levels - 1 - i
            attn = c.attention_levels[down_level]
            n = c.layers_per_block + 1
            level = _Level(
                [resnet((prev if j == 0 else cout) + (skip_in if j == n - 1 else cout), cout) for j in range(n)],
                [transformer(cout, spatial_kind(down_level)) for _ in range(n)] if attn else None,
            )
            if i < levels - 1:
                level.upsamplers = nn.ModuleList([Upsample(cout)])
            self.up_blocks.append(level)

        if c.temporal_modules:
            self.down_temporal_blocks = nn.ModuleList(TemporalModule(ch, temb, c.norm_groups) for ch in chans)
            self.mid_temporal_block = TemporalModule(chans[-1], temb, c.norm_groups)
            self.up_temporal_blocks = nn.ModuleList(TemporalModule(ch, temb, c.norm_groups) for ch in rev)

        self.conv_norm_out = VideoGroupNorm(c.norm_groups, chans[0], eps=c.norm_eps)
        self.conv_out = FrameConv2d(chans[0], c.out_channels, 3, padding=1)

    def use_channels_last(self) -> LaVieUNet:
        """Store convolution weights channels-last to match the activations (cuDNN's fast NHWC path)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                fmt = torch.channels_last if m.weight.ndim == 4 else torch.channels_last_3d
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def check_inputs(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        noise_level: torch.Tensor | int | None,
    ) -> None:
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"{c.kind} UNet expects x shaped [B, {c.in_channels}, F, H, W], got {list(x.shape)}"
            )
        if context.ndim != 3 or context.shape[-1] != c.cross_attention_dim:
            raise ValueError(
                f"{c.kind} UNet expects context shaped [B, tokens, {c.cross_attention_dim}], got {list(context.shape)}"
            )
        if context.shape[0] % x.shape[0]:
            raise ValueError(
                f"batch of context ({context.shape[0]}) must equal the batch of x ({x.shape[0]}) or a multiple of it"
            )
        if c.num_noise_levels is not None:
            if noise_level is None:
                raise ValueError(f"{c.kind} UNet needs a noise_level (0..{c.max_noise_level})")
            # Checked on the value as passed: an int costs no device sync. Compiled graphs and CUDA graph
            # captures skip the check (it would break them); the pipeline checks its int before sampling.
            levels = torch.as_tensor(noise_level)
            if _may_sync(levels) and (int(levels.max()) > c.max_noise_level or int(levels.min()) < 0):
                raise ValueError(f"noise_level must be in 0..{c.max_noise_level}, got {levels.tolist()}")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor,
        noise_level: torch.Tensor | int | None = None,
        *,
        image_frames: int = 0,
    ) -> torch.Tensor:
        """x: `b c f h w` (all input channels, official order) -> noise/velocity prediction `b 4 f h w`.

        `context` may hold several conditionings per sample, `(n b) l c` (guidance passes uncond and cond):
        the layers before the first text attention run once on `b`, then the activations are repeated `n`
        times, and the output is `(n b) 4 f h w`. With guidance that skips the duplicate half of the
        text-free prefix: the whole top level of the VSR UNet, and in the first spatial transformer
        everything ahead of its first text attention (`SpatialTransformer.forward`), there the first
        block's frame attention of the base and interpolation models.

        `image_frames`: the last frames are independent still images (joint image-video training); they
        bypass temporal attention. Inference leaves it at 0.
        """
        b = x.shape[0]
        timesteps = per_sample(timesteps, b, x.device)
        self.check_inputs(x, timesteps, context, noise_level)
        if noise_level is not None:
            noise_level = per_sample(noise_level, b, x.device).long()
        dtype = self.dtype
        x, context = x.to(dtype), context.to(dtype)

        emb = self.time_embedding(timestep_embedding(timesteps, self.config.block_out_channels[0]).to(dtype))
        if hasattr(self, "class_embedding"):
            emb = emb + self.class_embedding(noise_level).to(dtype)
        emb = F.silu(emb)  # what every block takes (`ResnetBlock`): computed once, not once per block

        n = context.shape[0]
        temporal = self.config.temporal_modules
        h = self.conv_in(to_channels_last(x))
        skips = [h]
        for i, level in enumerate(self.down_blocks):
            for resnet, attn in level.layers():
                bias = folded_bias(attn)
                h = resnet(h, emb, out_bias=bias)
                if attn is not None:
                    emb = widen(emb, n)
                    h = attn(h, context, image_frames, biased=bias is not None, overwrite=True)  # (n b) samples out
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
            if temporal:
                h = self.down_temporal_blocks[i](h, emb)

        r0, r1 = self.mid_block.resnets
        h, emb = widen(h, n), widen(emb, n)
        attn = self.mid_block.attentions[0]
        bias = folded_bias(attn)
        h = r0(h, emb, out_bias=bias)
        h = r1(attn(h, context, image_frames, biased=bias is not None, overwrite=True), emb)
        if temporal:
            h = self.mid_temporal_block(h, emb)
        return self._up(0, h, emb, context, skips, image_frames)

    def _up(
        self,
        start: int,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
        image_frames: int,
        *,
        from_upsampler: bool = False,
    ) -> torch.Tensor:
        """Up levels from `start` on, then the output convolution; with `from_upsampler`, level `start`'s
        resnets have run. Where an upsampled activation would be large, the rest runs one sample at a time."""
        temporal = self.config.temporal_modules
        for i in range(start, len(self.up_blocks)):
            level = self.up_blocks[i]
            if not (from_upsampler and i == start):
                for resnet, attn in level.layers():
                    bias = folded_bias(attn)
                    # Its own statement: through the resnet, h would otherwise hold the input below the skip
                    # (traced VSR peak +1.25 GiB).
                    h = concat_skip(h, skips.pop())
                    h = resnet(h, emb, out_bias=bias)
                    if attn is not None:
                        h = attn(h, context, image_frames, biased=bias is not None, overwrite=True)
            if hasattr(level, "upsamplers"):
                if h.shape[0] > 1 and 4 * h.numel() >= SPLIT_BATCH_MIN_NUMEL:
                    return torch.cat([
                        self._up(i, h[j : j + 1], emb[j : j + 1], context[j : j + 1],
                                 [sample(skip, j) for skip in skips], image_frames, from_upsampler=True)
                        for j in range(h.shape[0])
                    ])
                h = level.upsamplers[0](h, skips[-1].shape[-2:])
            if temporal:
                h = self.up_temporal_blocks[i](h, emb)

        return self.conv_out(self.conv_norm_out(h, silu=True)).contiguous()


# From this many elements of an upsampled activation on, the levels above it run one sample at a time:
# samples are independent, and one sample still fills the GPU there. A guided VSR call (8 frames, 320x512
# latents) splits at its last upsampler; on an H200 its peak fell from 13.3 to 10.3 GiB compiled and from
# 15.9 to 11.0 eager, at the same speed.
SPLIT_BATCH_MIN_NUMEL = 2**29


def folded_bias(attn: SpatialTransformer | None) -> torch.Tensor | None:
    """The output bias of the transformer after a resnet, where the resnet's last kernel may add it for the
    transformer (`SpatialTransformer.forward`'s `biased`), which then writes its output over that resnet's,
    which nothing else reads; None where it may not. The UNet calls the two itself rather than through one
    helper: a helper's caller would keep the resnet's input alive while the transformer runs (traced VSR
    peak +0.62 GiB)."""
    return attn.proj_out.bias if attn is not None and attn.folds_output_bias() else None


def per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """`value` (a number, or one per sample) as a `batch`-long tensor on `device`. A number becomes a fill
    kernel, not a copy from host memory, so CUDA graphs can capture it (`lavie_core.graphs`)."""
    if isinstance(value, torch.Tensor):
        return value.to(device).reshape(-1).expand(batch)
    return torch.full((batch,), value, device=device)


def _may_sync(levels: torch.Tensor) -> bool:
    """Whether reading `levels` on the host is allowed: not while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    return not (levels.is_cuda and torch.cuda.is_current_stream_capturing())


def concat_skip(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """`torch.cat([h, widen(skip, len(h))], dim=1)`: on NVIDIA GPUs outside `torch.compile` (which writes
    the parts into the result itself), one pass that reads the skip's shared samples in place."""
    if fused.eager_kernels_usable(h) and fused.concat_channels_fits(h, skip):
        return fused.concat_channels(h, skip)
    return torch.cat([h, widen(skip, h.shape[0])], dim=1)


def sample(t: torch.Tensor, j: int) -> torch.Tensor:
    """Sample j of a `(n b) ...` batch from `t`, which is that batch or the `b ...` one `widen` repeats."""
    j %= t.shape[0]
    return t[j : j + 1]


# Every shape a session meets (each stage, size, VSR chunk and tile, guidance mode) is one more graph of the
# one `LaVieUNet.forward`; past torch's default of 8 graphs per function, new shapes silently run eagerly.
RECOMPILE_LIMIT = 64


def compile_unet(unet: nn.Module, *, backend: str = "inductor") -> nn.Module:
    """`torch.compile` of a UNet with static shapes: every input shape gets its own graph on first use.

    A stage calls its UNet with the same shapes at every step, so nothing recompiles within a stage; a
    new shape (frames, size, a VSR chunk, a guidance mode) compiles once more. The wrapper shares the
    UNet's parameters, so weights moved or patched in place (device offloading, LoRA) stay in use.
    Measured on an H200 (fp16, one guided call, replayed from CUDA graphs: `lavie_core.graphs`), eager
    against compiled (an earlier version): base 36.2-36.4 -> 39.8-39.9 ms, interpolation 151.4-151.9 ->
    166.0-167.0 ms, VSR 8-frame chunk 545-546 -> 568.4 ms: the eager path's kernels do the fusions Inductor does, and
    compiling takes about 1 to 3 minutes per stage and shape.
    `backend` is torch.compile's (Inductor by default).

    Raises torch's per-function graph limit (process-wide) to at least `RECOMPILE_LIMIT`, since all UNets
    and shapes share one forward.
    """
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    # einops records each tensor type it meets in a dict that the compiled graph guards on. If the first
    # einops call of the process is inside the traced call, the second call finds the dict changed and
    # compiles the whole UNet again.
    rearrange(torch.empty(0), "n -> n")
    return torch.compile(unet, dynamic=False, backend=backend)
