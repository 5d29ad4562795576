"""Building blocks shared by the base, interpolation and VSR UNets.

Video tensors are `b c f h w`. Spatial layers fold frames into the batch, `(b f) c h w` or `(b f) (h w) c`;
temporal attention folds pixels into the batch, `(b h w) f c`. Module attribute names equal the official
state-dict names, so released checkpoints load without any key mapping.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Hashable, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils import flop_counter

from . import fused

T = TypeVar("T")


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first (flip_sin_to_cos=True, no frequency shift)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# Under torch.compile the GroupNorm kernels serve tensors from this size on (the VSR's top two levels).
# Inductor's own GroupNorm fuses with its neighbours and wins on smaller ones (compiled base call on an
# H200: 47.1 ms with this threshold, 51.3 with the kernels everywhere), but on the VSR's full-resolution
# tensors its reductions ran at a fifth of the card's bandwidth.
COMPILED_NORM_KERNEL_MIN_NUMEL = 2**27

# Folding an offset into GroupNorm's torch arithmetic saves a pass over the video (eager VSR call on an H200:
# 780 -> 760 ms) but adds a handful of tiny ops, whose launches cost about as much as the pass on small
# videos. (Eager calls on the kernels fold it into `fused.group_affine` at every size.)
FOLD_OFFSET_MIN_NUMEL = 2**25


def group_norm(
    x: torch.Tensor, norm: nn.GroupNorm, *, silu: bool = False, offset: torch.Tensor | None = None,
    channel_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm (then SiLU if asked) that keeps the channels-last layout the network runs in.

    x: `b c f h w` (statistics span all frames) or `n c h w` (statistics per image). Statistics are
    computed in float32 whatever the activation dtype, as the native kernel does. They come from
    per-channel sums, which read the tensor in its memory order; on NVIDIA GPUs two Triton kernels do the
    sums and the normalisation (with SiLU), each in one pass, and outside `torch.compile` (which fuses that
    arithmetic) a third turns the sums into the scale and shift.

    offset: `b c`, normalise `x + offset` (a resnet's time embedding) without writing that sum: the
    per-channel sums and the shift absorb it, which saves a pass over the video. channel_offset: `c`, a
    further offset shared by the samples (a bias), absorbed the same way.
    """
    kernels, affine_kernel = _norm_path(x, norm)
    b, c = x.shape[0], x.shape[1]
    offset, channel_offset = _merge_offsets(offset, channel_offset, b, c, affine_kernel)
    if offset is not None and not affine_kernel and x.numel() < FOLD_OFFSET_MIN_NUMEL:
        x, offset = x + offset.view(b, c, *[1] * (x.ndim - 2)), None
    rows = _norm_rows(x, kernels)
    # The affine kernel adds up the partial sums itself.
    sums = _channel_sums(rows, kernels, partial=affine_kernel)
    scale, shift = _norm_affine(sums, norm, rows.shape[1], affine_kernel, offset, channel_offset)
    return normalise(x, scale, shift, silu=silu, rows=rows, kernels=kernels)


def _norm_path(x: torch.Tensor, norm: nn.GroupNorm | None = None) -> tuple[bool, bool]:
    """Whether GroupNorm on x takes the kernels, and whether `norm`'s scale and shift come from one of them."""
    kernels = x.dtype != torch.float64 and fused.kernels_usable(x)
    compiling = torch.compiler.is_compiling()
    if kernels and compiling:
        kernels = x.numel() >= COMPILED_NORM_KERNEL_MIN_NUMEL
    # Eagerly one kernel turns the sums into the scale and shift, the offset folded at no cost: torch's
    # arithmetic for it is about fifteen launches of a few microseconds, per GroupNorm.
    return kernels, kernels and not compiling and norm is not None and norm.affine


def _merge_offsets(
    offset: torch.Tensor | None, channel_offset: torch.Tensor | None, b: int, c: int, affine_kernel: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The affine kernel takes both offsets; torch's arithmetic takes their sum as one `b c` offset."""
    if channel_offset is None or affine_kernel:
        return offset, channel_offset
    channel_offset = channel_offset.view(1, c)
    return (channel_offset.expand(b, c) if offset is None else offset + channel_offset), None


def _norm_rows(x: torch.Tensor, kernels: bool) -> torch.Tensor:
    """x `b c ...` as `b n c` rows, a view when x is channels-last. Both kernels read rows in memory order:
    a video that is not channels-last (a concatenation of one-frame videos, whose layout torch cannot tell)
    is copied here once, not by each kernel."""
    rows = x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
    return rows.contiguous() if kernels else rows


def _channel_sums(rows: torch.Tensor, kernels: bool, *, partial: bool = False) -> torch.Tensor:
    if kernels:
        return fused.channel_sums(rows, partial=partial)
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return torch.stack([rows.sum(1, dtype=acc), torch.linalg.vector_norm(rows, 2, dim=1, dtype=acc).square()], 1)


def _norm_affine(
    sums: torch.Tensor, norm: nn.GroupNorm, rows: int, affine_kernel: bool,
    offset: torch.Tensor | None = None, channel_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `b c` scale and shift from the channel sums of `rows` rows per sample. Without the affine kernel the
    caller has merged `channel_offset` into `offset` already."""
    if affine_kernel:
        return fused.group_affine(
            sums, norm.weight, norm.bias, norm.num_groups, rows, norm.eps, offset=offset, channel_offset=channel_offset
        )
    if sums.ndim == 4:
        sums = sums.sum(1)
    return _group_affine(sums, norm.weight, norm.bias, norm.num_groups, rows, norm.eps, offset=offset)


def norm_scale_shift(
    parts: list[list[torch.Tensor]], norm: nn.GroupNorm, *, offset: torch.Tensor | None = None,
    channel_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm's float32 `b c` scale and shift (`normalise` applies them) for a video held as `parts[j]`,
    the pieces of sample j (`1 c ...` each, along frames): the statistics of the whole video, without it
    ever being whole in memory. offset and channel_offset as in `group_norm`."""
    kernels, affine_kernel = _norm_path(parts[0][0], norm)
    b, c = len(parts), parts[0][0].shape[1]
    offset, channel_offset = _merge_offsets(offset, channel_offset, b, c, affine_kernel)
    sums = torch.cat([sum(_channel_sums(_norm_rows(p, kernels), kernels) for p in sample) for sample in parts])
    rows = sum(p[0].numel() // c for p in parts[0])
    return _norm_affine(sums, norm, rows, affine_kernel, offset, channel_offset)


def normalise(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, silu: bool = False, overwrite: bool = False,
    rows: torch.Tensor | None = None, kernels: bool | None = None,
) -> torch.Tensor:
    """`x * scale + shift` per sample and channel (float32 `b c`), then SiLU if asked, in x's layout: GroupNorm's
    second pass. `overwrite`: the result goes over x, which the caller no longer needs (the kernel's path,
    outside `torch.compile`). `rows` and `kernels`: as `group_norm` found them."""
    b, c = x.shape[0], x.shape[1]
    if kernels is None:
        kernels = _norm_path(x)[0]
    if rows is None:
        rows = _norm_rows(x, kernels)
    if kernels:
        out = fused.scale_shift(rows, scale, shift, silu=silu, out=rows if overwrite else None)
    else:
        out = torch.addcmul(shift.view(b, 1, c).to(x.dtype), rows, scale.view(b, 1, c).to(x.dtype))
        out = F.silu(out) if silu else out
    return out.view(x.movedim(1, -1).shape).movedim(-1, 1)


def _group_affine(
    sums: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, rows: int, eps: float,
    *, offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused.group_affine` in torch, in the sums' precision: GroupNorm's `b c` scale and shift from the
    `b 2 c` channel sums (and sums of squares) of `rows` rows per sample; `offset` as there."""
    b, _, c = sums.shape
    acc = sums.dtype
    total, squares = sums.unbind(1)
    if offset is not None:
        t = offset.to(acc).view(b, c)
        total, squares = total + rows * t, squares + t * (2 * total + rows * t)
    n = rows * (c // groups)
    mean = total.view(b, groups, -1).sum(-1, keepdim=True) / n
    var = (squares.view(b, groups, -1).sum(-1, keepdim=True) / n - mean.square()).clamp(min=0)
    scale = torch.rsqrt(var + eps) * weight.to(acc).view(1, groups, -1)
    shift = bias.to(acc).view(1, groups, -1) - mean * scale
    if offset is not None:
        shift = shift + t.view(b, groups, -1) * scale
    return scale.view(b, c), shift.view(b, c)


class VideoGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and keys) computed without leaving the channels-last layout."""

    def forward(
        self, x: torch.Tensor, *, silu: bool = False, offset: torch.Tensor | None = None,
        channel_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return group_norm(x, self, silu=silu, offset=offset, channel_offset=channel_offset)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`b c f h w` stored as b f h w c: frames fold into the batch and pixels into tokens as pure views."""
    return x.contiguous(memory_format=torch.channels_last_3d)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _pointwise(conv: nn.Conv2d | nn.Conv3d) -> bool:
    """1x1, stride 1, unpadded, one group: a matmul over channels."""
    padding = conv.padding if isinstance(conv.padding, tuple) else ()  # "same" and "valid": none for 1x1
    one = all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
    return one and conv.groups == 1 and not any(padding)


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else a + b


# Up to this many output pixels, a 3x3 convolution runs as one cuBLAS matmul of its unfolded windows
# (`fused.unfold_3x3`): on so few rows cuDNN's kernels leave much of the GPU idle. At the base model's 5x8 level
# (32 frames) on an H200 cuDNN ran at 420-435 TFLOP/s against 620-670 for the matmul alone.
SMALL_CONV_PIXELS = 2048


def _small_conv(module: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether `_conv_product` unfolds: a zero-padded 3x3 Conv2d of stride 1 on few channels-last pixels, with
    a channels-last weight (its `o (3 3 c)` rows are then a view), on the kernels."""
    return (
        isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1)
        and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
        and module.padding_mode == "zeros" and x.ndim == 4 and x.shape[0] * x.shape[2] * x.shape[3] <= SMALL_CONV_PIXELS
        and x.is_contiguous(memory_format=torch.channels_last)
        and module.weight.is_contiguous(memory_format=torch.channels_last) and fused.eager_kernels_usable(x)
    )


def _conv_product(module: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The convolution without its bias, in x's layout."""
    if not _small_conv(module, x):
        return module._conv_forward(x, module.weight, None)
    n, _, h, w = x.shape
    rows = F.linear(fused.unfold_3x3(x), module.weight.permute(0, 2, 3, 1).reshape(module.out_channels, -1))
    return rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def conv(
    module: nn.Conv2d | nn.Conv3d, x: torch.Tensor, *, residual: torch.Tensor | None = None,
    bias: bool = True, extra_bias: torch.Tensor | None = None, into_residual: bool = False,
) -> torch.Tensor:
    """`module(x) + residual`, in the layout of x (`n c h w` or `b c f h w`); `bias=False` leaves out the
    module's bias, for callers that fold it into the next layer, and `extra_bias` adds a second one (the next
    layer's, folded in). `into_residual`: the sum is written over the residual, which the caller no longer
    needs, and returned: no new tensor of the output's size outlives the call.

    cuDNN writes a convolution without its bias, and torch adds it to a channels-last tensor through its
    broadcasting kernel, at under a third of the card's bandwidth (eager VSR call on an H200: 102 ms of
    its 690). Here a 1x1 convolution of a channels-last tensor is a matmul of its rows, with the bias in
    cuBLAS's epilogue; on NVIDIA GPUs outside `torch.compile` (which fuses the bias itself) other
    convolutions get the bias, and the residual, in one pass (`fused.bias_add_`).
    """
    b, extra = module.bias if bias else None, extra_bias
    if b is None:
        b, extra = extra, None
    if into_residual:
        if residual is None:
            raise ValueError("conv: into_residual needs a residual")
        if b is not None and not _pointwise(module) and fused.eager_kernels_usable(x):
            y = _conv_product(module, x)
            if fused.bias_add_fits(residual, y):
                return fused.bias_add_(residual, b, y, extra=extra)
            y.add_(_plus(b, extra).view(-1, *[1] * (y.ndim - 2)))
            return residual.add_(y)
        return residual.add_(conv(module, x, bias=bias, extra_bias=extra_bias))
    rows = fused.channels_last_rows(x) if _pointwise(module) else None
    if rows is not None:
        y = F.linear(rows, module.weight.flatten(1), _plus(b, extra))
        y = y.view(*x.movedim(1, -1).shape[:-1], -1).movedim(-1, 1)
        return y if residual is None else y.add_(residual)
    if b is None:
        y = _conv_product(module, x)
    elif fused.eager_kernels_usable(x):
        y = _conv_product(module, x)
        if fused.bias_add_fits(y, residual):
            return fused.bias_add_(y, b, residual, extra=extra)
        y = y.add_(_plus(b, extra).view(-1, *[1] * (y.ndim - 2)))  # in place, as torch adds a convolution's bias
    else:
        y = module._conv_forward(x, module.weight, _plus(b, extra))
    # The residual first: the sum takes its layout (a CPU Conv3d returns its output in the default one).
    return y if residual is None else residual + y


class FrameConv2d(nn.Conv2d):
    """A 2-D convolution applied to every frame (weights are plain Conv2d tensors)."""

    def forward(
        self, x: torch.Tensor, *, residual: torch.Tensor | None = None, bias: bool = True,
        extra_bias: torch.Tensor | None = None, into_residual: bool = False,
    ) -> torch.Tensor:
        """`conv(self, ...)` per frame of `b c f h w` videos."""
        f = x.shape[2]
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        if residual is not None:
            residual = rearrange(residual, "b c f h w -> (b f) c h w")
        out = conv(self, frames, residual=residual, bias=bias, extra_bias=extra_bias, into_residual=into_residual)
        return rearrange(out, "(b f) c h w -> b c f h w", f=f)


# From this many elements per frame on, a resnet block whose output may go over its skip runs its convolutions
# a frame at a time (`ResnetBlock._forward_by_frame`): the VSR's full-resolution level (84M at 512 channels).
# There one frame still fills the GPU, and the block holds one full-size activation instead of three. Smaller
# frames would run slower one at a time (interpolation call on an H200 with the 2.5M of its top level: 151 ->
# 172 ms).
RESNET_BY_FRAME_MIN_NUMEL = 2**26


class ResnetBlock(nn.Module):
    """SD resnet block on video. GroupNorm sees the 5-D tensor, so its statistics span all frames.

    It takes the SiLU of the time embedding, which the UNet computes once for all its blocks (the official
    blocks each apply it to the same embedding)."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = VideoGroupNorm(groups, in_channels, eps=eps)
        self.conv1 = FrameConv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = VideoGroupNorm(groups, out_channels, eps=eps)
        self.conv2 = FrameConv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = FrameConv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, *, out_bias: torch.Tensor | None = None, overwrite: bool = False
    ) -> torch.Tensor:
        """emb: `silu(time embedding)`, `b d`. out_bias: `c`, added to the output by the last kernel, at no
        cost (the next layer's bias, folded). overwrite: x is not needed after the call (its caller made it),
        so the output may take its memory."""
        if self._by_frame(x, overwrite):
            return self._forward_by_frame(x, emb, out_bias)
        # conv1's bias joins the time embedding in norm2's offset, which its sums absorb: no pass adds it.
        h = self.conv1(self.norm1(x, silu=True), bias=False)
        h = self.norm2(h, silu=True, offset=self.time_emb_proj(emb), channel_offset=self.conv1.bias)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return self.conv2(h, residual=skip, extra_bias=out_bias)

    def _by_frame(self, x: torch.Tensor, overwrite: bool) -> bool:
        """Whether `forward` runs its convolutions a frame at a time: a large channels-last video, no gradient,
        and an output that may go over the skip (x itself where `overwrite`, or the shortcut's product)."""
        return (
            x.ndim == 5 and x.shape[1] * x.shape[3] * x.shape[4] >= RESNET_BY_FRAME_MIN_NUMEL and x.shape[0] * x.shape[2] > 1
            and not torch.is_grad_enabled() and (overwrite or self.conv_shortcut is not None)
            and x.is_contiguous(memory_format=torch.channels_last_3d)
        )

    def _forward_by_frame(self, x: torch.Tensor, emb: torch.Tensor, out_bias: torch.Tensor | None) -> torch.Tensor:
        """`forward` with the norms' statistics over the whole video, as ever, but each frame normalised,
        convolved and added into the skip on its own: of the block's three full-size activations (norm1's
        output, conv1's, norm2's) only conv1's is whole at any time, and the output takes the skip's memory.
        Same arithmetic, frame by frame."""
        b, f = x.shape[0], x.shape[2]
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        scale, shift = norm_scale_shift([[x]], self.norm1)
        h = [[self.conv1(normalise(x[j : j + 1, :, t : t + 1], scale[j : j + 1], shift[j : j + 1], silu=True), bias=False)
              for t in range(f)] for j in range(b)]
        scale, shift = norm_scale_shift(h, self.norm2, offset=self.time_emb_proj(emb), channel_offset=self.conv1.bias)
        for j in range(b):
            for t in range(f):
                frame, h[j][t] = h[j][t], None
                frame = normalise(frame, scale[j : j + 1], shift[j : j + 1], silu=True, overwrite=True)
                self.conv2(frame, residual=skip[j : j + 1, :, t : t + 1], extra_bias=out_bias, into_residual=True)
        return skip


class TemporalConvBlock(nn.Module):
    """Residual block of Conv3d layers with kernels (k, 1, 1): mixes frames only, zero-padded at clip ends."""

    def __init__(self, channels: int, temb_dim: int | None, groups: int, kernel: int = 3, eps: float = 1e-6):
        super().__init__()
        self.norm1 = VideoGroupNorm(groups, channels, eps=eps)
        self.conv1 = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0))
        self.time_emb_proj = nn.Linear(temb_dim, channels) if temb_dim is not None else None
        self.norm2 = VideoGroupNorm(groups, channels, eps=eps)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, *, overwrite: bool = False) -> torch.Tensor:
        """emb: `silu(time embedding)`, as `ResnetBlock` takes it. overwrite: as there; without a gradient the
        output then goes over x."""
        h = conv(self.conv1, self.norm1(x, silu=True), bias=False)
        offset = self.time_emb_proj(emb) if self.time_emb_proj is not None else None
        # As in ResnetBlock: conv1's bias folded into norm2.
        h = self.norm2(h, silu=True, offset=offset, channel_offset=self.conv1.bias)
        return conv(self.conv2, h, residual=x, into_residual=overwrite and not torch.is_grad_enabled())


class TemporalModule(nn.Module):
    """VSR temporal module: a temporal then a spatial resnet block, added back through a zero-initialised 1x1."""

    def __init__(self, channels: int, temb_dim: int, groups: int):
        super().__init__()
        self.resblocks_3d_t = TemporalConvBlock(channels, temb_dim, groups, kernel=5)
        self.resblocks_3d_s = ResnetBlock(channels, channels, temb_dim, groups, eps=1e-6)
        self.shift_conv = FrameConv2d(channels, channels, 1)
        nn.init.zeros_(self.shift_conv.weight)
        nn.init.zeros_(self.shift_conv.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """emb: `silu(time embedding)`, as `ResnetBlock` takes it."""
        return self.shift_conv(self.resblocks_3d_s(self.resblocks_3d_t(x, emb), emb, overwrite=True), residual=x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _phase_fold(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(p q a b) (y x)`: which taps of a 3x3 kernel sum into tap (a, b) of output phase (p, q).

    Output row 2i + p of a 3x3 convolution on a nearest-upsampled image reads input rows (i - 1, i, i) for
    p = 0 and (i, i, i + 1) for p = 1, so the kernel's rows (y) fold onto two taps (a), and columns alike.
    Built on the device from an identity: a table copied from the host would wait for the GPU's queue.
    """
    e = torch.eye(3, device=device, dtype=dtype)
    fold = torch.stack([e[0], e[1] + e[2], e[0] + e[1], e[2]])  # (p a) y
    return rearrange(torch.kron(fold, fold), "(p a q b) yx -> (p q a b) yx", p=2, a=2, q=2)


def upsample_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel `o i 3 3` as the 2x2 kernels `(p q o) i 2 2` of the four output phases (row p, column q),
    channels-last. One matmul does the sums, so each folded tap is rounded once (from float32 sums on GPUs);
    on NVIDIA GPUs outside `torch.compile`, one kernel (`fused.upsample_weight`, whose sums are float32)."""
    if weight.dtype != torch.float64 and fused.eager_kernels_usable(weight):
        return fused.upsample_weight(weight)
    # o i y x -> o (y x) i, a view of channels-last weights. Not through einops: its first sight of a
    # Parameter type inside a compiled call changes a global that torch.compile guards on (one recompile).
    taps = weight.flatten(2).transpose(1, 2)
    k = torch.matmul(_phase_fold(weight.device, weight.dtype), taps)
    return rearrange(k, "o (p q a b) i -> (p q o) a b i", p=2, q=2, a=2).permute(0, 3, 1, 2)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(nearest_upsample_2x(x))` for images `n c h w`, computed at the input's size.

    `conv` is a 3x3 convolution with padding 1. Each output phase (even/odd row, even/odd column) is a 2x2
    convolution of the input, so one 2x2 convolution with four times the output channels does the work in
    16 multiply-adds per output pixel and channel instead of 36, and the upsampled input is never written.
    The kernels are folded from `conv.weight` at every call, so weights patched in place (LoRA) are used.
    """
    n, _, h, w = x.shape
    o = conv.out_channels
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    weight = upsample_conv_weight(conv.weight).contiguous(memory_format=fmt)
    # Padding 1 with a 2x2 kernel gives (h + 1) x (w + 1) positions; phase (p, q) reads those from (p, q) on:
    # output (c, 2i + p, 2j + q) is y's channel (2p + q) o + c at (i + p, j + q), one strided view of y, so a
    # single pass interleaves the phases and adds the bias.
    y = F.conv2d(x, weight, None, padding=1)
    bias = None if conv.bias is None else conv.bias.view(1, o, 1, 1, 1, 1)
    needs_grad = torch.is_grad_enabled() and (y.requires_grad or bias is not None and bias.requires_grad)
    if not needs_grad and fused.eager_kernels_usable(y) and fused.upsample_phases_fits(y):
        # torch's strided add below runs at a fifth of the bandwidth (eager VSR call on an H200: 9.1 ms).
        return fused.upsample_phases(y, conv.bias)
    sn, sc, sh, sw = y.stride()
    phases = y.as_strided((n, o, h, 2, w, 2), (sn, sc, sh, sh + 2 * o * sc, sw, sw + o * sc))
    out = torch.empty(n, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=fmt)
    if bias is not None and not needs_grad and not torch.compiler.is_compiling():
        # out= has no backward, and Dynamo does not trace it into a strided tensor (Inductor fuses the add).
        torch.add(phases, bias, out=out.view(n, o, h, 2, w, 2))
    else:
        out.view(n, o, h, 2, w, 2).copy_(phases if bias is None else phases + bias)
    return out


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Sized by the skip connection it meets, so latents not divisible by the total stride still line up.
        f = x.shape[2]
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        if tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return rearrange(upsample_conv(frames, self.conv), "(b f) c h w -> b c f h w", f=f)
        frames = F.interpolate(frames, size=size, mode="nearest")
        return self.conv(rearrange(frames, "(b f) c h w -> b c f h w", f=f))


def widen(t: torch.Tensor, batch: int) -> torch.Tensor:
    """`b ...` -> `(n b) ...`: activations of the text-free prefix become the same for every conditioning.
    cat, unlike repeat, keeps the channels-last layout the convolutions need."""
    return torch.cat([t] * (batch // t.shape[0])) if t.shape[0] != batch else t


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "n l (h d) -> n h l d", h=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "n h l d -> n l (h d)")


class Attention(nn.Module):
    """Multi-head attention with the SD layout: q/k/v without bias, `to_out.0` with bias."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
        *, residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.output(merge_heads(out), residual)

    def output(self, heads: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`to_out.0` of the merged heads; with `residual` (contiguous, rows in the heads' order), that
        product without its bias added into `residual` in place (`add_product_`), which is returned."""
        if residual is None:
            return self.to_out[0](heads)
        return add_product_(residual, heads, self.to_out[0].weight)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v of self-attention as one matmul (views of one `... 3c` product): x is read once and the
        wider product uses the GPU better (compiled base call on an H200: 44.8 -> 43.7 ms). For consumers that
        read the views through strides (SDPA, the fused temporal kernel), not for ones that regroup them.

        The weights are concatenated at each call, so weights patched in place (LoRA) are what it uses.
        """
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        q, k, v = F.linear(x, weight).chunk(3, dim=-1)
        return q, k, v

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, *, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`residual`: see `output`."""
        if context is None:
            return self.attend(*self.project(x), residual=residual)
        return self.attend(self.to_q(x), self.to_k(context), self.to_v(context), residual=residual)


# FlopCounterMode (bench/speed.py's FLOP counts) knows addmm but not the in-place addmm_ of add_product_.
if torch.ops.aten.addmm_ not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.aten.addmm_, get_raw=True)(flop_counter.flop_registry[torch.ops.aten.addmm])


def add_product_(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x += a @ weight.T` in place, x contiguous with a's rows: a residual add that cuBLAS's epilogue does
    (beta = 1, one rounding), not a pass of its own. Returns x."""
    x.view(-1, x.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]), weight.t())
    return x


def _attention_kernels_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused attention kernels take these projections. float32 stays on SDPA: the exact reference
    path (the kernels' tensor-core dots would round to tf32). Checked on the projections, which need a
    gradient whenever any of their weights is trained."""
    return q.dtype != torch.float32 and all(fused.kernels_usable(t) for t in (q, k, v))


def text_attention(
    attn: Attention, x: torch.Tensor, context: torch.Tensor, frames: int, *, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-attention to one text per clip: every frame's tokens attend to the same keys.

    `(b f) l c` queries are regrouped to `b (f l) c`, so keys/values are projected once per clip instead of
    once per frame, with the same result. `residual`: see `Attention.output`.
    """
    q = rearrange(attn.to_q(x), "(b f) l c -> b (f l) c", f=frames)
    k, v = attn.to_k(context), attn.to_v(context)
    if k.shape[1] <= fused.SHORT_KEYS_MAX and _attention_kernels_usable(q, k, v):
        # All of a text's keys at once, heads of 40 split 32 + 16 where cuDNN pads them to 64: a guided call's
        # text attention on an H200 (fp16, graph-replayed) took 0.53 ms instead of 0.75 (base), 2.37 instead
        # of 2.80 (interpolation) and 6.1 instead of 9.2 (VSR 8-frame chunk).
        out = attn.output(fused.short_key_attention(q, k, v, attn.heads), residual)
    else:
        out = attn.attend(q, k, v, residual=residual)
    return out if residual is not None else rearrange(out, "b (f l) c -> (b f) l c", f=frames)


def sparse_causal_attention(
    attn: Attention, x: torch.Tensor, frames: int, *, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Frame i attends to the tokens of frame 0 and of frame i-1 (frame 0 to itself twice).

    `residual`: see `Attention.output`."""
    # Separate projections: k and v are gathered by frame below. With views of one product here and in its
    # temporal layers, the interpolation model's eager call on an H200 took 228 ms, against 218 without.
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    if _attention_kernels_usable(q, k, v):
        # Keys read in place, heads split 32 + 16 rather than padded to 64: one layer of the interpolation
        # model on an H200 (bench/attention.py, fp16) took 7.7 / 1.1 / 0.53 ms at its three levels, against
        # 10.0 / 2.4 / 1.21 with SDPA on gathered keys.
        key_frames = position_cache(attn, lambda: ("key frames", frames, x.device), lambda: _key_frames(frames, x.device))
        return attn.output(fused.key_frame_attention(q, k, v, attn.heads, frames, key_frames), residual)
    previous = _key_frames(frames, x.device)[:, 1]
    k, v = (rearrange(t, "(b f) l c -> b f l c", f=frames) for t in (k, v))
    k = rearrange(torch.cat([k[:, :1].expand_as(k), k[:, previous]], dim=2), "b f l c -> (b f) l c")
    v = rearrange(torch.cat([v[:, :1].expand_as(v), v[:, previous]], dim=2), "b f l c -> (b f) l c")
    return attn.attend(q, k, v, residual=residual)


def _key_frames(frames: int, device: torch.device) -> torch.Tensor:
    """Sparse causal attention's `f 2` table: frame 0 and frame max(i-1, 0)."""
    previous = (torch.arange(frames, device=device) - 1).clamp(min=0)
    return torch.stack([torch.zeros_like(previous), previous], dim=1)


_POSITION_CACHE_SIZE = 8


def position_cache(module: nn.Module, key: Callable[[], Hashable], compute: Callable[[], T]) -> T:
    """`compute()`, kept on `module` per `key()` (frame count, device, and the version of any buffer it reads).

    Position tables depend on the frame count only, yet took tiny kernels at every call, each costing a CUDA
    graph replay about as much as a launch: about 20 per temporal layer (base call: 16 layers), 5 per sparse
    causal layer's key-frame table (interpolation call: 16 layers).
    Computed anew where a gradient may be recorded (a cached tensor made under inference mode cannot be saved
    for backward) and under torch.compile, which folds them into its own kernels; `key` runs only when the
    cache is used (it reads tensor metadata, which Dynamo would guard on and recompile for).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return compute()
    cache = module.__dict__.setdefault("_position_cache", {})
    key = key()
    if key not in cache:
        if len(cache) >= _POSITION_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = compute()
    return cache[key]


class RotaryEmbedding(nn.Module):
    """Rotary positions over frames on the first `dim` channels of each head, channel pairs interleaved."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("freqs", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim))

    def table(self, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 `(cos, sin)`, each `f dim`: the angle of frame p on channels 2i and 2i+1 is p * freqs[i]."""
        return position_cache(self, lambda: self._table_key(frames, device), lambda: self._table(frames, device))

    def _table_key(self, frames: int, device: torch.device) -> tuple:
        freqs = self.freqs
        # Inference tensors (weights loaded under inference mode, as ComfyUI loads them) keep no version.
        version = None if freqs.is_inference() else freqs._version
        return frames, torch.device(device), freqs.data_ptr(), freqs.dtype, version

    def _table(self, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(frames, device=device, dtype=torch.float32)
        angles = torch.repeat_interleave(positions[:, None] * self.freqs.float()[None], 2, dim=-1)
        return angles.cos(), angles.sin()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x: `n h f d`, rotated on its first `dim` channels by each frame's angles."""
        dim = 2 * self.freqs.shape[0]
        cos, sin = (t.to(x.dtype) for t in self.table(x.shape[-2], x.device))
        head, tail = x[..., :dim], x[..., dim:]
        pairs = rearrange(head, "... (d r) -> ... d r", r=2)
        rotated_half = rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... d r -> ... (d r)")
        return torch.cat([head * cos + rotated_half * sin, tail], dim=-1)


class RelativePositionBias(nn.Module):
    """T5 bucketed relative position bias over frames, one learned scalar per (bucket, head)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def buckets(self, frames: int, device: torch.device) -> torch.Tensor:
        """Bucket index of every (query frame, key frame) pair, `f f`."""
        return position_cache(self, lambda: (frames, torch.device(device)), lambda: self._buckets(frames, device))

    def _buckets(self, frames: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(frames, dtype=torch.long, device=device)
        n = pos[:, None] - pos[None, :]  # query minus key: keys in the past are positive
        half = self.num_buckets // 2
        offset = (n < 0).long() * half
        n = n.abs()
        max_exact = half // 2
        log_ratio = torch.log(n.clamp(min=1).float() / max_exact) / math.log(self.max_distance / max_exact)
        large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
        return offset + torch.where(n < max_exact, n, large)

    def forward(self, frames: int, device: torch.device) -> torch.Tensor:
        """The `h f f` bias, gathered straight into that layout (one kernel; the fused temporal attention reads
        it as it is, in the weights' dtype)."""
        return self.relative_attention_bias.weight.t()[:, self.buckets(frames, device)]


class TemporalAttention(Attention):
    """Self-attention across frames at each pixel.

    Input `(b h w) f c`, or `b f l c` (the spatial layers' layout viewed per frame), which the fused
    kernel and SDPA group by pixel through strides, without a copy.
    """

    def __init__(self, dim: int, heads: int, rotary: RotaryEmbedding | None, rel_pos: RelativePositionBias | None):
        super().__init__(dim, heads)
        if rotary is not None:
            self.rotary_emb = rotary
        if rel_pos is not None:
            self.time_rel_pos_bias = rel_pos

    @property
    def plain(self) -> bool:
        """No rotary and no relative bias (the interpolation model): SDPA computes it as is."""
        return not hasattr(self, "rotary_emb") and not hasattr(self, "time_rel_pos_bias")

    def reads_video_tokens(self, x: torch.Tensor, frames: int) -> bool:
        """Whether `forward` takes `b f l c` here without regrouping tokens by pixel.

        The fused kernel serves up to `fused.MAX_FRAMES` frames (compiled interpolation call on an H200: 180
        ms, against 189 with the regrouped matmuls). Past that, SDPA serves the plain attention eagerly (228
        ms, against 248 regrouped) but not under torch.compile, where the regrouped path measured faster (187
        against 193 ms).
        """
        sdpa = self.plain and fused.is_cuda(x) and not torch.compiler.is_compiling()
        return fused.available(x, frames) or sdpa

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`residual` (x's shape): see `Attention.output`. `norm`: applied to x first; its output is gone once
        q, k and v are projected, where a caller passing it in would hold it through the attention (traced VSR
        peak +0.62 GiB)."""
        frames = x.shape[1]
        bias = self.time_rel_pos_bias(frames, x.device) if hasattr(self, "time_rel_pos_bias") else None
        if norm is not None:
            x = norm(x)
        # The kernel reads q, k and v through strides, so one projection serves it. The paths below regroup
        # them; the interpolation model, which takes them, ran slower eagerly with views of one product.
        q, k, v = self.project(x) if fused.available(x, frames) else (self.to_q(x), self.to_k(x), self.to_v(x))
        video_tokens = x.ndim == 4
        del x
        # Checked on q, which needs a gradient whenever these weights are trained (the kernel has no backward).
        if fused.available(q, frames):
            rotary = self.rotary_emb.table(frames, q.device) if hasattr(self, "rotary_emb") else None
            return self.output(fused.temporal_attention(q, k, v, self.heads, rotary=rotary, bias=bias), residual)
        if video_tokens and self.plain:
            return self.output(video_token_attention(q, k, v, self.heads), residual)
        pixels = q.shape[2] if video_tokens else None
        grouped = "b f l (h d) -> (b l) h f d" if video_tokens else "n f (h d) -> n h f d"
        q, k, v = (rearrange(t, grouped, h=self.heads) for t in (q, k, v))
        if hasattr(self, "rotary_emb"):
            q, k = self.rotary_emb.rotate(q), self.rotary_emb.rotate(k)
        bias = None if bias is None else bias.to(q.dtype)
        out = short_sequence_attention(q, k, v, bias)
        if video_tokens:
            return self.output(rearrange(out, "(b l) h f d -> b f l (h d)", l=pixels), residual)
        return self.output(merge_heads(out), residual)


# Some SDPA CUDA kernels launch a block per head on a grid axis that holds at most 65535.
SDPA_MAX_HEADS = 2**15


def video_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention across frames at every pixel of `b f l (h d)` tokens, as SDPA over `b (l h) f d` views.

    Each pixel's heads count as SDPA heads, so no token moves; pixels are taken in groups when there are
    more heads than a launch can hold.
    """
    def per_pixel(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, -1)).permute(0, 2, 3, 1, 4).flatten(1, 2)  # b f l h d -> b (l h) f d

    pixels = q.shape[2]
    step = max(1, SDPA_MAX_HEADS // heads)
    outs = [
        F.scaled_dot_product_attention(*(per_pixel(t[:, :, i : i + step]) for t in (q, k, v)))
        for i in range(0, pixels, step)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.unflatten(1, (pixels, heads)).permute(0, 3, 1, 2, 4).flatten(3)  # b (l h) f d -> b f l (h d)


def short_sequence_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Attention over a few dozen frames for a very large batch of pixels: `n h f d`.

    The fused SDPA kernels reject batches this large and the fallback runs in float32; plain batched
    matmuls in the activation dtype (float32 accumulation, softmax in float32) are exact and fast here.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        half = x.dtype in (torch.float16, torch.bfloat16) and all(
            p is not None and p.dtype == x.dtype and p.device == x.device for p in (w, b)
        )
        trainable = torch.is_grad_enabled() and w.requires_grad
        if half and fused.kernels_usable(x) and fused.geglu_fits(x, w) and not trainable:
            # One kernel, and the 2x-wide product never reaches memory. On an H200 it lowers the peaks
            # (compiled VSR call 14.7 -> 13.3 GiB, interpolation 5.2 -> 3.9); at the models' shapes it takes
            # 1.0-1.75x the time of cuBLAS's product alone, which would still have to write and reread it.
            return fused.geglu(x, w, b)
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and keys). On NVIDIA GPUs outside `torch.compile` (which fuses it with
    its neighbours), one kernel: `fused.layer_norm`, 3x torch's speed on half-precision videos."""

    def fused_for(self, x: torch.Tensor) -> bool:
        """Whether `forward` takes the kernel for x."""
        w, b = self.weight, self.bias
        trainable = torch.is_grad_enabled() and w is not None and w.requires_grad
        return w is not None and b is not None and not trainable and fused.eager_kernels_usable(x)

    def forward(self, x: torch.Tensor, *, offset: torch.Tensor | None = None) -> torch.Tensor:
        """offset: `c`, normalise `x + offset`; the kernel adds it on the fly, without a pass of its own."""
        if self.fused_for(x):
            return fused.layer_norm(x, self.weight, self.bias, self.eps, offset=offset)
        return super().forward(x if offset is None else x + offset.to(x.dtype))


# Elements of the feed-forward's inner activation made at once on the stream path. It is 4x the tokens' width,
# the largest activation of a VSR call (8-frame chunk: 2.5 GiB at 160x256 latents); tokens are independent, so
# the stream's rows go through it in pieces this size at most. Base and interpolation calls stay whole.
FF_PIECE_ELEMENTS = 2**29


def stream_pieces(x: torch.Tensor, inner: int) -> list[torch.Tensor]:
    """Contiguous `r c` row blocks of the contiguous stream x whose `r inner` products each hold at most
    `FF_PIECE_ELEMENTS`, or single rows (x itself, as rows, where it fits at once)."""
    rows = x.view(-1, x.shape[-1])
    pieces = min(rows.shape[0], -(-rows.shape[0] * inner // FF_PIECE_ELEMENTS))
    return list(rows.tensor_split(pieces)) if pieces > 1 else [rows]


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`residual`: the output projection without its bias added into it in place (`add_product_`)."""
        if residual is None:
            return self.net(x)
        return add_product_(residual, self.net[0](x), self.net[2].weight)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: frame attention, text attention, temporal attention, feed-forward.

    `spatial` picks the first attention ("full", "sparse_causal" or "text"); interpolation puts the temporal
    attention after the feed-forward, the other two models before it.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int,
        *,
        spatial: str,
        temporal_attr: str,
        temporal_after_ff: bool,
        rotary: RotaryEmbedding | None,
        rel_pos: RelativePositionBias | None,
    ):
        super().__init__()
        self.spatial = spatial
        self.temporal_after_ff = temporal_after_ff
        self.temporal_attr = temporal_attr
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, context_dim if spatial == "text" else None)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.add_module(f"norm_{temporal_attr}", LayerNorm(dim))
        self.add_module(f"attn_{temporal_attr}", TemporalAttention(dim, heads, rotary, rel_pos))
        nn.init.zeros_(getattr(self, f"attn_{temporal_attr}").to_out[0].weight)
        self.ff = FeedForward(dim)
        self.norm3 = LayerNorm(dim)

    def temporal_layers(self) -> tuple[LayerNorm, TemporalAttention]:
        """The temporal attention's norm and attention (named after the checkpoint's keys: `temporal_attr`)."""
        return getattr(self, f"norm_{self.temporal_attr}"), getattr(self, f"attn_{self.temporal_attr}")

    def frame_attention(
        self, h: torch.Tensor, context: torch.Tensor, frames: int, *, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The first attention (`spatial`) of normalised `(b f) l c` tokens; `residual`: see `Attention.output`."""
        if self.spatial == "full":
            return self.attn1(h, residual=residual)
        if self.spatial == "sparse_causal":
            return sparse_causal_attention(self.attn1, h, frames, residual=residual)
        return text_attention(self.attn1, h, context, frames, residual=residual)

    def temporal(self, x: torch.Tensor, frames: int, image_frames: int = 0) -> torch.Tensor:
        norm, attn = self.temporal_layers()
        if not image_frames and attn.reads_video_tokens(x, frames):
            # The attention groups tokens by pixel through strides: no layout change around the layer.
            video = x.unflatten(0, (-1, frames))  # (b f) l c -> b f l c, a view
            return (video + attn(norm(video))).flatten(0, 1)
        tokens = x.shape[1]
        x = rearrange(x, "(b f) l c -> (b l) f c", f=frames)
        video = frames - image_frames
        # Joint image-video training appends still images as extra frames; they skip temporal attention.
        x = torch.cat([x[:, :video] + attn(norm(x[:, :video])), x[:, video:]], dim=1) if image_frames else x + attn(norm(x))
        return rearrange(x, "(b l) f c -> (b f) l c", l=tokens)

    def later_branches(self) -> tuple[str, str]:
        """The order of the two residual branches after the text attention: "temporal" and "ff"."""
        return ("ff", "temporal") if self.temporal_after_ff else ("temporal", "ff")

    def residual_biases(self) -> list[torch.Tensor | None]:
        """The biases of the four residual branches' output projections, in the order they are added."""
        later = {"temporal": self.temporal_layers()[1].to_out[0].bias, "ff": self.ff.net[2].bias}
        return [self.attn1.to_out[0].bias, self.attn2.to_out[0].bias, *(later[b] for b in self.later_branches())]

    def folds_biases(self, x: torch.Tensor, frames: int, image_frames: int = 0) -> bool:
        """Whether `forward` takes `offsets` here: no gradient, every LayerNorm a kernel that adds an offset
        on the fly, every branch with a bias, and the temporal attention on the tokens in place."""
        norm, attn = self.temporal_layers()
        norms = (self.norm1, self.norm2, self.norm3, norm)
        return (
            not torch.is_grad_enabled() and not image_frames and all(n.fused_for(x) for n in norms)
            and all(b is not None for b in self.residual_biases()) and attn.reads_video_tokens(x, frames)
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, frames: int, image_frames: int = 0,
        *, offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: `(b f) l c`, context: `(n b) l c`. With n > 1 (guidance) a frame attention that does not read
        the text runs once per sample, before x is repeated for the n conditionings: `(n b f) l c` out.

        offsets: float32 `4 c`, where `folds_biases`. x is then a contiguous stream, and branch k's input
        (`residual_biases` order) is `x + offsets[k]`: each LayerNorm adds the offset on the fly, and each
        branch adds its output projection into the stream in place without the bias (cuBLAS's epilogue reads
        the stream), so no residual add is a pass of its own (eager VSR call on an H200: they took 13 ms).
        The stream is returned; the block's output is it plus `offsets[3]` and the last branch's bias.
        `SpatialTransformer` starts the stream ahead by all the biases (its projection in adds them), so
        that sum is zero.
        """
        samples = context.shape[0] * frames
        if self.spatial == "text":
            x = widen(x, samples)
        if offsets is not None:
            return self._forward_stream(x, context, frames, offsets)
        x = widen(x + self.frame_attention(self.norm1(x), context, frames), samples)
        x = x + text_attention(self.attn2, self.norm2(x), context, frames)
        for branch in self.later_branches():
            x = self.temporal(x, frames, image_frames) if branch == "temporal" else x + self.ff(self.norm3(x))
        return x

    def _forward_stream(self, x: torch.Tensor, context: torch.Tensor, frames: int, offsets: torch.Tensor) -> torch.Tensor:
        self.frame_attention(self.norm1(x, offset=offsets[0]), context, frames, residual=x)
        x = widen(x, context.shape[0] * frames)
        text_attention(self.attn2, self.norm2(x, offset=offsets[1]), context, frames, residual=x)
        video = x.unflatten(0, (-1, frames))  # (b f) l c -> b f l c, a view
        norm, attn = self.temporal_layers()
        for k, branch in enumerate(self.later_branches(), start=2):
            if branch == "temporal":
                attn(video, residual=video, norm=functools.partial(norm, offset=offsets[k]))
            else:
                for rows in stream_pieces(x, self.ff.net[0].proj.out_features // 2):
                    self.ff(self.norm3(rows, offset=offsets[k]), residual=rows)
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm (per frame) -> projection in -> transformer block -> projection out, plus residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        *,
        groups: int,
        linear_projection: bool,
        temporal_resblock: bool,
        **block_args,
    ):
        super().__init__()
        if temporal_resblock:
            self.resblock_temporal = TemporalConvBlock(channels, None, groups)
        self.norm = VideoGroupNorm(groups, channels, eps=1e-6)
        self.linear_projection = linear_projection
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim, **block_args)])

    def folds_output_bias(self) -> bool:
        """Whether `forward` takes `biased` input: the projection out has a bias, the norm reads the input
        first (no temporal resblock ahead of it), and no gradient is needed (the input is overwritten)."""
        return self.proj_out.bias is not None and not hasattr(self, "resblock_temporal") and not torch.is_grad_enabled()

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, image_frames: int = 0, *, biased: bool = False,
        overwrite: bool = False,
    ) -> torch.Tensor:
        """x: `b c f h w`, context: `(n b) l c` -> `(n b) c f h w`. With n > 1 (guidance) the text-free layers
        (temporal resblock, norm, projection in, the first block's frame attention unless it reads the text)
        run once per sample, and the activations are repeated for the n conditionings after them. A guided
        interpolation call skips half of its costliest attention layer: on an H200, 153.9 / 154.9 -> 149.6 /
        150.4 ms (old, new alternated).

        biased (where `folds_output_bias`): x arrives as `x + proj_out.bias`, which its producer's last kernel
        added, and is overwritten. The norm takes the bias off on the fly, and the projection out adds its
        product into x in place (cuBLAS's epilogue), so the residual add is not a pass of its own.

        overwrite: x is not needed after the call; the temporal resblock's output then goes over it (a caller
        holds x through the call, so a new tensor would be one more full-size activation).
        """
        b, c, f, hh, ww = x.shape
        if context.shape[0] % b:
            raise ValueError(f"context holds {context.shape[0]} samples, not a multiple of the video's {b}")
        if biased and not self.folds_output_bias():
            raise ValueError("biased input needs a projection out with a bias, no temporal resblock and no gradient")
        if hasattr(self, "resblock_temporal"):
            x = self.resblock_temporal(x, overwrite=overwrite)
        residual = rearrange(x, "b c f h w -> (b f) c h w")
        if all(block.folds_biases(residual, f, image_frames) for block in self.transformer_blocks):
            offsets, stream_bias, norm_offset = self._stream_biases(residual, biased)
            # The norm's output is a temporary of the projection in, gone before the blocks run (a name bound
            # to it here would hold it through them: traced VSR peak +0.62 GiB).
            stream = F.linear(rearrange(self.norm(residual, channel_offset=norm_offset), "n c h w -> n (h w) c"),
                              self.proj_in.weight.flatten(1), stream_bias)
            h = self._blocks_folded(stream, context, f, offsets)
        else:
            h = self.norm(residual, channel_offset=-self.proj_out.bias if biased else None)
            if self.linear_projection:
                h = self.proj_in(rearrange(h, "n c h w -> n (h w) c"))
            else:
                h = rearrange(conv(self.proj_in, h), "n c h w -> n (h w) c")
            for block in self.transformer_blocks:
                h = block(h, context, f, image_frames)
        h = self._project_out(h, residual, hh, biased)
        return rearrange(h, "(b f) c h w -> b c f h w", f=f)

    def _project_out(self, h: torch.Tensor, residual: torch.Tensor, height: int, biased: bool) -> torch.Tensor:
        """`proj_out(h) + residual` as `(n b f) c h w`, from `(n b f) (h w) c` tokens and the `(b f) c h w`
        residual that the n conditionings share (`widen`). `biased`: the residual holds the projection's bias
        already and may be overwritten."""
        weight = self.proj_out.weight.flatten(1)  # a Linear's, or a 1x1 convolution's: a matmul of the rows
        if biased:
            residual = widen(residual, h.shape[0])
        rows = fused.channels_last_rows(residual)
        if biased and rows is not None:
            add_product_(rows, h, weight)
            return residual
        out = rearrange(F.linear(h, weight, None if biased else self.proj_out.bias), "n (h w) c -> n c h w", h=height)
        if rows is None:
            return out + widen(residual, out.shape[0])
        # Each conditioning's output is a block of rows: the shared residual is added to each in place, so
        # it is never repeated in memory.
        fused.channels_last_rows(out).view(-1, *rows.shape).add_(rows)
        return out

    def _stream_biases(
        self, x: torch.Tensor, biased: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For `_blocks_folded`: the blocks' offsets (float32 `blocks 4 c`), the projection in's bias, which
        also adds every branch's bias ahead of time, in x's dtype, and, for biased input, the norm's offset
        (`-proj_out.bias`). On NVIDIA GPUs outside `torch.compile`, one kernel (`fused.stream_biases`)."""
        biases = [b for block in self.transformer_blocks for b in block.residual_biases()]
        out_bias = self.proj_out.bias if biased else None
        if len(biases) == 4 and fused.eager_kernels_usable(x):
            offsets, bias, norm_offset = fused.stream_biases(biases, self.proj_in.bias, out_bias, x.dtype)
            return offsets.unsqueeze(0), bias, norm_offset
        biases = torch.stack(biases).float()
        due = biases.cumsum(0)
        total = due[-1]
        offsets = (due - biases - total).view(len(self.transformer_blocks), 4, -1)
        bias = total if self.proj_in.bias is None else self.proj_in.bias.float() + total
        return offsets, bias.to(x.dtype), None if out_bias is None else -out_bias

    def _blocks_folded(
        self, stream: torch.Tensor, context: torch.Tensor, frames: int, offsets: torch.Tensor
    ) -> torch.Tensor:
        """The blocks on one stream (`TransformerBlock.forward`'s `offsets`), which the projection in started
        with the bias from `_stream_biases`, which also adds every branch's bias ahead of time; each LayerNorm
        takes off what is not yet due. Either projection in (a Linear or a 1x1 convolution) is a matmul of the
        normalised channels-last rows."""
        for block, block_offsets in zip(self.transformer_blocks, offsets):
            stream = block(stream, context, frames, offsets=block_offsets)
        return stream
