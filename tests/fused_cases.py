"""Fused kernels against plain torch, case by case (temporal, key-frame and short-key attention, GroupNorm passes,
GEGLU, bias add, LayerNorm, channel concatenation, upsampling phases and weights, a transformer stream's biases, row
softmax, small convolutions' unfolded windows); prints one JSON line per case.

Run as a script (tests/test_fused.py does, with TRITON_INTERPRET=1 on the CPU) or imported on CUDA.
"""
from __future__ import annotations

import json
import sys
from unittest import mock

import torch
import torch.nn.functional as F
from einops import rearrange

from lavie_core import blocks, fused

# id: (rows, tokens, frames, heads, head_dim, rotary_dim, bias). tokens None: `n f c` rows; otherwise
# `rows` clips of `tokens` pixels, laid out `(b f) l c` as the spatial layers leave them. bias "lookup": the
# `h f f` view of an `f f h` table in the activation dtype, as the relative position embedding returns it.
CASES = {
    "vsr-8-frames-rotary-bias": (5, None, 8, 2, 64, 32, True),
    "base-16-frames-head-40": (3, None, 16, 2, 40, 32, True),
    "odd-frames-no-bias": (4, None, 7, 3, 16, 8, False),
    "plain-13-frames": (2, None, 13, 2, 8, 0, False),
    "long-61-frames": (2, None, 61, 2, 16, 0, False),
    "interpolation-61-frames-head-160": (1, 3, 61, 1, 160, 0, False),
    "base-16-frames-head-160": (2, None, 16, 1, 160, 32, True),
    "base-48-frames-rotary-bias": (1, 2, 48, 2, 40, 32, True),
    "many-rows-one-frame": (37, None, 1, 2, 8, 8, True),
    "video-layout-2-clips": (2, 5, 8, 2, 64, 32, True),
    "video-layout-odd-tokens": (3, 7, 6, 2, 16, 8, False),
    "bias-strided-lookup": (3, None, 9, 2, 16, 8, "lookup"),
    "four-heads-per-program": (2, 3, 8, 4, 16, 8, True),
    "eight-heads-batched-video-lookup": (1, 3, 16, 8, 40, 32, "lookup"),
}


def max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    rows, tokens, frames, heads, head_dim, rotary_dim, with_bias = CASES[case]
    g = torch.Generator().manual_seed(0)
    shape = (rows, frames, heads * head_dim) if tokens is None else (rows * frames, tokens, heads * head_dim)
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3))
    if tokens is not None:
        q, k, v = (t.unflatten(0, (rows, frames)) for t in (q, k, v))
    bias = torch.randn(heads, frames, frames, generator=g).to(device) if with_bias else None
    if with_bias == "lookup":
        bias = bias.permute(1, 2, 0).contiguous().to(dtype).permute(2, 0, 1)
        assert not bias.is_contiguous()
    rotary = blocks.RotaryEmbedding(rotary_dim).to(device) if rotary_dim else None
    grouped = "b f l (h d) -> (b l) h f d" if tokens is not None else "n f (h d) -> n h f d"
    qh, kh, vh = (rearrange(t.float(), grouped, h=heads) for t in (q, k, v))
    if rotary is not None:
        qh, kh = rotary.rotate(qh), rotary.rotate(kh)
    expected = blocks.short_sequence_attention(qh, kh, vh, None if bias is None else bias.float())
    ungrouped = "(b l) h f d -> b f l (h d)" if tokens is not None else "n h f d -> n f (h d)"
    expected = rearrange(expected, ungrouped, **({"l": tokens} if tokens is not None else {}))
    table = rotary.table(frames, q.device) if rotary is not None else None
    out = fused.temporal_attention(q, k, v, heads, rotary=table, bias=bias)
    assert out.shape == q.shape and out.dtype == dtype
    return (out.float() - expected).abs().max().item()


# GroupNorm's two passes. id: (clips, rows, channels, silu, sliced); rows past one program's share and
# channel counts that are not powers of two cover the kernels' edges; `sliced` passes the first rows of a
# longer tensor (a view whose clips lie further apart than its rows).
NORM_CASES = {
    "norm-vsr-like-silu": (2, 4100, 96, True, False),
    "norm-odd-channels": (3, 37, 40, False, False),
    "norm-wide-channels": (1, 70, 320, True, False),
    "norm-sliced-rows": (3, 50, 24, True, True),
}


def norm_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    clips, rows, channels, silu, sliced = NORM_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(clips, 2 * rows if sliced else rows, channels, generator=g) * 3 + 1).to(device, dtype)[:, :rows]
    scale, shift = (torch.randn(clips, channels, generator=g).to(device) for _ in range(2))
    sums = fused.channel_sums(x)
    partial = fused.channel_sums(x, partial=True)
    expected_sums = torch.stack([x.float().sum(1), x.float().square().sum(1)], dim=1)
    assert partial.ndim == 4 and partial.shape[0] == clips and partial.shape[2:] == (2, channels)
    torch.testing.assert_close(partial.sum(1), sums, rtol=0, atol=0)
    out = fused.scale_shift(x, scale, shift, silu=silu)
    expected = x.float() * scale[:, None] + shift[:, None]
    expected = torch.nn.functional.silu(expected) if silu else expected
    assert out.shape == x.shape and out.dtype == dtype and sums.shape == (clips, 2, channels)
    # Relative to the magnitude (at least 1): half-precision outputs carry rounding relative to their size.
    sums_error = ((sums - expected_sums).abs() / expected_sums.abs().clamp(min=1)).max().item()
    return max(sums_error, ((out.float() - expected).abs() / expected.abs().clamp(min=1)).max().item())


# The GEGLU projection. id: (leading shape of x, width k, inner n, launch config or None for the default,
# x a view 2 bytes off the 16-byte alignment that tensor descriptors need); the small tiles leave partial row,
# column and depth blocks, and the default configuration is the one the models run. Under the interpreter two
# persistent programs walk the tiles, so the cases with more tiles exercise the walk. Widths are multiples of
# 16: Triton 3.5's interpreter asks that of a descriptor's strides in elements (the GPU, in bytes).
GEGLU_CASES = {
    "geglu-partial-tiles": ((37,), 48, 48, (16, 32, 32, 2, 1, 1, 1), False),
    "geglu-two-programs-per-multiprocessor": ((300,), 64, 144, (16, 32, 32, 2, 1, 1, 2), False),
    "geglu-large-product-config": ((300,), 64, 144, fused._GEGLU_CONFIGS[0], False),
    "geglu-narrow-default": ((3, 5), 32, 16, None, False),
    "geglu-wide-default": ((2, 10), 512, 48, None, False),
    "geglu-default-partial-tiles": ((300,), 64, 144, None, False),
    "geglu-unaligned-view": ((37,), 48, 48, (16, 32, 32, 2, 1, 1, 1), True),
    "geglu-no-tokens": ((2, 0), 16, 8, None, False),
}


def geglu_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Error relative to the magnitude (at least 1), against float32 arithmetic on the same half inputs."""
    lead, k, n, config, unaligned = GEGLU_CASES[case]
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16  # the kernel takes half types
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, k, generator=g).to(device, dtype)
    if unaligned:
        x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)
        assert x.data_ptr() % 16
    weight = (torch.randn(2 * n, k, generator=g) / k**0.5).to(device, dtype)
    bias = torch.randn(2 * n, generator=g).to(device, dtype)
    value, gate = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).chunk(2, dim=-1)
    expected = value * torch.nn.functional.gelu(gate)
    out = fused.geglu(x, weight, bias) if config is None else fused._launch_geglu(x, weight, bias, config)
    assert out.shape == (*lead, n) and out.dtype == dtype
    if not out.numel():
        return 0.0
    return ((out.float() - expected).abs() / expected.abs().clamp(min=1)).max().item()


# Key-frame attention. id: (clips, frames, query tokens, key tokens, heads, head_dim, key frames: "sparse"
# for (0, i-1) or a list of rows). Heads of 40 (32 + 16 with the row-sum column), 80 (64 + 16), 160
# (128 + 32), 8 (one masked 16) and 24 (16 + 16); token counts that leave partial blocks (pointer loads),
# and "tma" ones that the blocks tile exactly (tensor descriptors: two blocks a frame, whose 16-wide tiles
# of 8-wide heads also read the next head, or past the last).
KEY_FRAME_CASES = {
    "key-frames-sparse-head-40": (2, 4, 33, 33, 2, 40, "sparse"),
    "key-frames-sparse-head-80": (1, 3, 20, 20, 2, 80, "sparse"),
    "key-frames-sparse-head-160": (1, 2, 17, 17, 1, 160, "sparse"),
    "key-frames-small-head-8": (1, 3, 9, 9, 3, 8, "sparse"),
    "key-frames-tma-head-40": (1, 3, 200, 256, 2, 40, "sparse"),
    "key-frames-tma-head-80": (2, 2, 128, 128, 2, 80, "sparse"),
    "key-frames-tma-head-160": (1, 3, 64, 64, 1, 160, "sparse"),
    "key-frames-tma-head-8": (1, 2, 40, 256, 6, 8, "sparse"),
    "key-frames-three-keys-head-24": (2, 3, 12, 70, 2, 24, [[0, 1, 2], [2, 2, 0], [1, 0, 1]]),
    "key-frames-one-frame-repeated": (1, 3, 12, 40, 2, 24, [[1, 1, 1], [0, 2, 0], [2, 2, 2]]),
}


def key_frame_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    clips, frames, tokens, key_tokens, heads, head_dim, table = KEY_FRAME_CASES[case]
    if table == "sparse":
        previous = (torch.arange(frames) - 1).clamp(min=0)
        table = torch.stack([torch.zeros_like(previous), previous], dim=1)
    key_frames = torch.as_tensor(table)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(clips * frames, tokens, heads * head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(clips * frames, key_tokens, heads * head_dim, generator=g).to(device, dtype) for _ in range(2))
    gathered = [
        rearrange(rearrange(t.float(), "(b f) m c -> b f m c", f=frames)[:, key_frames], "b f s m c -> (b f) (s m) c")
        for t in (k, v)
    ]
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(rearrange(t, "n l (h d) -> n h l d", h=heads) for t in (q.float(), *gathered))
    )
    expected = rearrange(expected, "n h l d -> n l (h d)")
    out = fused.key_frame_attention(q, k, v, heads, frames, key_frames.to(device))
    assert out.shape == q.shape and out.dtype == dtype
    return (out.float() - expected).abs().max().item()



# Short-key attention. id: (samples, query tokens, keys, heads, head_dim). A text's 77 keys (64 + 16), 16 and
# 128 (one part), 5 (one masked 16); heads of 40 (32 + 16), 80 (64 + 16), 160 (128 + 32), 64 and 8 (one masked
# 16); token counts that leave a partial block, and 2100 queries for the launch's four rounds a program.
SHORT_KEY_CASES = {
    "short-keys-77-head-40": (2, 70, 77, 2, 40),
    "short-keys-77-head-80": (1, 130, 77, 2, 80),
    "short-keys-77-head-160": (2, 33, 77, 1, 160),
    "short-keys-16-head-64": (1, 65, 16, 3, 64),
    "short-keys-5-head-8": (2, 9, 5, 2, 8),
    "short-keys-128-head-24": (1, 40, 128, 2, 24),
    "short-keys-four-rounds": (1, 2100, 77, 1, 16),
}


def short_key_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    samples, tokens, keys, heads, head_dim = SHORT_KEY_CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(samples, tokens, heads * head_dim, generator=g).to(device, dtype)
    # k and v as views of one product, as a projection of the text leaves them.
    k, v = torch.randn(samples, keys, 2 * heads * head_dim, generator=g).to(device, dtype).chunk(2, dim=-1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(rearrange(t.double(), "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    )
    out = fused.short_key_attention(q, k, v, heads)
    assert out.shape == q.shape and out.dtype == dtype
    return (out.double() - rearrange(expected, "b h n d -> b n (h d)")).abs().max().item()

# A convolution's bias (and residual) added in place. id: (shape `n c ...`, residual, extra bias); stored
# channels-last. 4 channels (the output convolution) and 320 (two column blocks, the second partial) cover
# the edges.
BIAS_CASES = {
    "bias-frames-residual": ((6, 40, 5, 7), True, False),
    "bias-video-5d": ((2, 24, 3, 5, 4), False, False),
    "bias-four-channels-residual": ((3, 4, 9, 11), True, False),
    "bias-wide-channels": ((2, 320, 3, 3), False, False),
    "bias-extra-residual": ((3, 320, 3, 5), True, True),
}


def bias_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Error relative to the magnitude (at least 1) against float32 sums of the same inputs."""
    shape, with_residual, with_extra = BIAS_CASES[case]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt) for _ in range(2))
    bias, extra = (torch.randn(shape[1], generator=g).to(device, dtype) for _ in range(2))
    extra = extra if with_extra else None
    total = bias.float() if extra is None else bias.float() + extra.float()
    expected = x.float() + total.view(-1, *[1] * (len(shape) - 2))
    expected = expected + residual.float() if with_residual else expected
    out = fused.bias_add_(x, bias, residual if with_residual else None, extra=extra)
    assert out is x and out.is_contiguous(memory_format=fmt)
    return ((out.float() - expected).abs() / expected.abs().clamp(min=1)).max().item()


# LayerNorm over the last dimension. id: (rows, channels, strided, offset): 40 and 1280 channels leave masked
# columns (one block of 64 and 2048); `strided` reads every other row of a longer tensor; `offset` normalises
# x + a float32 per-channel offset (a transformer stream's biases not yet added).
LAYER_NORM_CASES = {
    "layer-norm-odd-channels": (37, 40, False, False),
    "layer-norm-wide-1280": (5, 1280, False, False),
    "layer-norm-strided-rows": (9, 320, True, False),
    "layer-norm-offset-odd-channels": (11, 40, False, True),
    "layer-norm-offset-strided": (9, 320, True, True),
}


def layer_norm_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Error relative to the magnitude (at least 1) against float32 LayerNorm of the same inputs."""
    rows, channels, strided, with_offset = LAYER_NORM_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2 * rows if strided else rows, channels, generator=g) * 3 + 1).to(device, dtype)
    x = x[::2] if strided else x
    weight, bias = (torch.randn(channels, generator=g).to(device, dtype) for _ in range(2))
    offset = (torch.randn(channels, generator=g) * 2).to(device) if with_offset else None
    shifted = x.float() if offset is None else x.float() + offset
    expected = torch.nn.functional.layer_norm(shifted, (channels,), weight.float(), bias.float(), 1e-5)
    out = fused.layer_norm(x, weight, bias, 1e-5, offset=offset)
    assert out.shape == x.shape and out.dtype == dtype
    return ((out.float() - expected).abs() / expected.abs().clamp(min=1)).max().item()


# A skip connection joined on channels. id: (a's shape, b's channels, b's batch): b's samples repeat when its
# batch is smaller (guidance halves sharing the text-free prefix); 5 + 3 and 40 + 100 channels leave partial
# column blocks, one of them straddling the two parts.
CONCAT_CASES = {
    "concat-video-shared-skip": ((4, 40, 3, 5, 2), 100, 2),
    "concat-frames-same-batch": ((3, 5, 7, 9), 3, 3),
    "concat-one-skip-sample": ((2, 64, 4, 4), 64, 1),
}


def concat_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    a_shape, cb, b_batch = CONCAT_CASES[case]
    fmt = torch.channels_last if len(a_shape) == 4 else torch.channels_last_3d
    g = torch.Generator().manual_seed(0)
    a = torch.randn(a_shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    b = torch.randn(b_batch, cb, *a_shape[2:], generator=g).to(device, dtype).contiguous(memory_format=fmt)
    expected = torch.cat([a, torch.cat([b] * (a_shape[0] // b_batch))], dim=1)
    out = fused.concat_channels(a, b)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=fmt)
    return (out.float() - expected.float()).abs().max().item()


# An upsampling convolution's four phases interleaved into the 2x image. id: (y's shape `n 4o h+1 w+1`, bias):
# 40 channels leave a partial column block; 3 x 5 and 2 x 2 inputs put phases at every edge.
PHASES_CASES = {
    "phases-bias-odd-size": ((2, 160, 4, 6), True),
    "phases-no-bias": ((3, 32, 3, 3), False),
    "phases-wide-bias": ((1, 1280, 3, 4), True),
}


def phases_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Against the strided view `blocks.upsample_conv` reads the phases through."""
    shape, with_bias = PHASES_CASES[case]
    n, o4, h1, w1 = shape
    o, h, w = o4 // 4, h1 - 1, w1 - 1
    g = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(o, generator=g).to(device, dtype) if with_bias else None
    sn, sc, sh, sw = y.stride()
    phases = y.as_strided((n, o, h, 2, w, 2), (sn, sc, sh, sh + 2 * o * sc, sw, sw + o * sc)).float()
    expected = (phases if bias is None else phases + bias.float().view(1, o, 1, 1, 1, 1)).reshape(n, o, 2 * h, 2 * w)
    out = fused.upsample_phases(y, bias)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    return (out.float() - expected).abs().max().item()


# GroupNorm's scale and shift from per-channel sums. id: (samples, rows, channels, groups, offset, channel
# offset, splits): 10 and 6 channels per group leave masked columns, 5 groups a masked row of groups; splits
# > 1 passes `b s 2 c` partial sums (over s row ranges), 0 the `b 2 c` sums.
GROUP_AFFINE_CASES = {
    "group-affine-320-offset": (2, 7, 320, 32, True, False, 0),
    "group-affine-five-groups": (3, 5, 30, 5, False, False, 0),
    "group-affine-1280-offset": (1, 4, 1280, 32, True, False, 0),
    "group-affine-partial-sums-both-offsets": (2, 23, 320, 32, True, True, 20),
    "group-affine-one-split-channel-offset": (3, 5, 30, 5, False, True, 1),
}


def group_affine_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """`x * scale + shift` against torch's GroupNorm of `x + offset`, relative to the magnitude (at least 1)."""
    samples, rows, channels, groups, with_offset, with_channel_offset, splits = GROUP_AFFINE_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(samples, rows, channels, generator=g) * 2 + 0.5).to(device, dtype)
    weight, bias = (torch.randn(channels, generator=g).to(device, dtype) for _ in range(2))
    offset = torch.randn(samples, channels, generator=g).to(device, dtype) if with_offset else None
    channel_offset = torch.randn(channels, generator=g).to(device, dtype) if with_channel_offset else None
    shifted = x.float() if offset is None else x.float() + offset.float()[:, None]
    shifted = shifted if channel_offset is None else shifted + channel_offset.float()
    expected = torch.nn.functional.group_norm(shifted.transpose(1, 2), groups, weight.float(), bias.float(), 1e-5)
    if splits:
        parts = x.double().tensor_split(splits, dim=1)
        sums = torch.stack([torch.stack([p.sum(1), p.square().sum(1)], dim=1) for p in parts], dim=1).float()
    else:
        sums = torch.stack([x.double().sum(1), x.double().square().sum(1)], dim=1).float()
    scale, shift = fused.group_affine(sums, weight, bias, groups, rows, 1e-5, offset=offset, channel_offset=channel_offset)
    out = (x.float() * scale[:, None] + shift[:, None]).transpose(1, 2)
    return ((out - expected).abs() / expected.abs().clamp(min=1)).max().item()


# A transformer stream's bias arithmetic. id: (channels, projection-in bias, output bias): 40 channels leave
# masked columns of the one block, 1280 fill two.
STREAM_BIAS_CASES = {
    "stream-biases-both": (40, True, True),
    "stream-biases-none": (1280, False, False),
}


def stream_biases_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Against float64 sums of the same biases, relative to the magnitude (at least 1)."""
    channels, with_in, with_out = STREAM_BIAS_CASES[case]
    g = torch.Generator().manual_seed(0)
    biases = [torch.randn(channels, generator=g).to(device, dtype) for _ in range(4)]
    in_bias, out_bias = (torch.randn(channels, generator=g).to(device, dtype) if on else None for on in (with_in, with_out))
    offsets, stream, norm = fused.stream_biases(biases, in_bias, out_bias, dtype)
    b = torch.stack([t.double() for t in biases])
    suffix = b.flip(0).cumsum(0).flip(0)
    want_stream = suffix[0] + (0 if in_bias is None else in_bias.double())
    assert offsets.dtype == torch.float32 and stream.dtype == dtype and (norm is None) == (out_bias is None)
    pairs = [(offsets, -suffix), (stream, want_stream)] + ([] if norm is None else [(norm, -out_bias.double())])
    return max(((got.double() - want).abs() / want.abs().clamp(min=1)).max().item() for got, want in pairs)


# An upsampling convolution's 3x3 kernel folded into its four phases' 2x2 kernels. id: (out, in channels,
# channels-last): 300 input channels leave a partial block; the plain layout reads the taps through other strides.
UPSAMPLE_WEIGHT_CASES = {
    "fold-partial-block": (7, 300, True),
    "fold-plain-layout": (5, 3, False),
}


def upsample_weight_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Against torch's fold in float64, relative to the magnitude (at least 1)."""
    outs, ins, channels_last = UPSAMPLE_WEIGHT_CASES[case]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(outs, ins, 3, 3, generator=g).to(device, dtype)
    weight = weight.contiguous(memory_format=torch.channels_last) if channels_last else weight
    expected = blocks.upsample_conv_weight(weight.double().cpu())  # on the CPU: torch's matmul, not the kernel
    out = fused.upsample_weight(weight)
    assert out.shape == (4 * outs, ins, 2, 2) and out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    return ((out.double().cpu() - expected).abs() / expected.abs().clamp(min=1)).max().item()


# Row softmax of float32 scores. id: (rows, columns, scale, spread): columns past one block (4096), a partial
# last block, and a row shorter than its block; scores of standard deviation `spread` before the scale.
SOFTMAX_CASES = {
    "softmax-one-block": (3, 1000, 0.125, 4.0),
    "softmax-rows-past-a-block": (2, 9000, 0.044, 30.0),
}


def softmax_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Error relative to the row's largest weight, against torch's float32 softmax."""
    rows, columns, scale, spread = SOFTMAX_CASES[case]
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(rows, columns, generator=g) * spread).to(device)
    expected = (scores * scale).softmax(dim=-1)
    out = fused.softmax_rows(scores, scale, dtype)
    assert out.shape == scores.shape and out.dtype == dtype
    return ((out.float() - expected).abs().amax(-1) / expected.amax(-1)).max().item()


# A small 3x3 convolution as one matmul of its unfolded windows (`blocks.conv` through `fused.unfold_3x3`, the
# kernels' gate held open on the CPU). id: (x's shape `n c h w`, output channels): 600 channels leave a partial
# second block of 512, 15 rows a partial block of 4, a 1x1 image only its centre tap.
UNFOLD_CASES = {
    "unfold-conv-5x8-frames": ((4, 24, 5, 8), 16),
    "unfold-conv-partial-channel-block": ((1, 600, 3, 4), 8),
    "unfold-conv-odd-rows": ((1, 7, 3, 5), 6),
    "unfold-conv-one-pixel": ((2, 5, 1, 1), 3),
}


def unfold_conv_max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Relative to the output's largest magnitude, against a float64 convolution."""
    shape, out_channels = UNFOLD_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(shape[1], out_channels, 3, padding=1)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * shape[1] ** -0.5)
    conv = conv.to(device, dtype).to(memory_format=torch.channels_last)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with mock.patch.object(fused, "eager_kernels_usable", lambda t: True), torch.no_grad():
        assert blocks._small_conv(conv, x)
        out = blocks.conv(conv, x)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    return ((out.double() - expected).abs().max() / expected.abs().max()).item()


# Each case's error function, in the order the cases run.
ERRORS = {
    case: error
    for cases, error in (
        (CASES, max_error), (NORM_CASES, norm_max_error), (GEGLU_CASES, geglu_max_error),
        (KEY_FRAME_CASES, key_frame_max_error), (SHORT_KEY_CASES, short_key_max_error),
        (BIAS_CASES, bias_max_error), (LAYER_NORM_CASES, layer_norm_max_error),
        (CONCAT_CASES, concat_max_error), (PHASES_CASES, phases_max_error), (GROUP_AFFINE_CASES, group_affine_max_error),
        (UPSAMPLE_WEIGHT_CASES, upsample_weight_max_error), (STREAM_BIAS_CASES, stream_biases_max_error),
        (SOFTMAX_CASES, softmax_max_error), (UNFOLD_CASES, unfold_conv_max_error),
    )
    for case in cases
}
ALL_CASES = list(ERRORS)


def case_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The error of whichever kernel `case` belongs to."""
    return ERRORS[case](case, device, dtype)


if __name__ == "__main__":
    for name in sys.argv[1:] or ALL_CASES:
        print(json.dumps({"case": name, "max_error": case_error(name)}), flush=True)
