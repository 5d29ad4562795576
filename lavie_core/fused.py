"""Fused CUDA kernels (Triton): temporal attention, and GroupNorm as two passes.

Temporal attention runs over a few frames for every pixel and head, `(b h w) f c`. As batched matmuls it is
a chain of small, memory-bound kernels (pixel grouping, head split, rotary on q and k, q k^T with 8x8
tiles, bias, softmax, p v, head merge, frame grouping), each reading and writing the whole activation.
The Triton kernel here reads q, k and v once, straight from the projections' `b f l (h d)` layout (the
spatial layers' `(b f) l c` viewed per frame), and writes the output in that layout, so the video never
changes layout around the temporal layer.

GroupNorm on a channels-last video is `channel_sums` (per-channel float32 sums and sums of squares, one
read) and `scale_shift` (normalisation and the SiLU that follows it, one read and one write);
`blocks.group_norm` turns the sums into group statistics.

The kernels are torch custom ops, so `torch.compile` keeps each as one kernel. They have no backward:
training and CPU inference take the torch paths in `blocks`.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; callers check `available()`
    triton = None

__all__ = ["available", "kernels_usable", "temporal_attention", "channel_sums", "scale_shift", "MAX_FRAMES"]

# Query rows are held in registers as `rows x frames x head_dim`. At 61 frames (interpolation) the kernel
# was slower than the matmul path (211 against 194 ms per compiled call on an H200); at 8 and 16 it is faster.
MAX_FRAMES = 32


# torch.library.custom_op (torch >= 2.4) makes the kernel one opaque node for torch.compile.
_CUSTOM_OPS = hasattr(torch.library, "custom_op")


def kernels_usable(x: torch.Tensor) -> bool:
    """Whether this module's kernels can take x: NVIDIA GPU, Triton present, no gradient needed (no backward)."""
    return (
        triton is not None
        and _CUSTOM_OPS
        and x.is_cuda
        and torch.version.hip is None  # measured and tested on NVIDIA only
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def available(x: torch.Tensor, frames: int) -> bool:
    """Whether the fused temporal attention can serve this call (`kernels_usable`, few frames)."""
    return frames <= MAX_FRAMES and kernels_usable(x)


if triton is not None:

    @triton.jit
    def _rotate(x, partner, cos, sin, d, rotary_dim: tl.constexpr):
        # Interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); channels >= rotary_dim pass.
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        return tl.where(d < rotary_dim, x * cos + sign * partner * sin, x)

    @triton.jit
    def _temporal_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, cos_ptr, sin_ptr, bias_ptr,
        n_rows, tokens,
        stride_qb, stride_qf, stride_ql, stride_kb, stride_kf, stride_kl,
        stride_vb, stride_vf, stride_vl, stride_ob, stride_of, stride_ol,
        scale,
        FRAMES: tl.constexpr, FRAMES_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
        ROTARY_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        head = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # A row is one pixel of one clip, (b, l); 64-bit offsets, since a video can pass 2^31 elements.
        clip, token = (rows // tokens).to(tl.int64), (rows % tokens).to(tl.int64)
        q_row = clip * stride_qb + token * stride_ql
        k_row = clip * stride_kb + token * stride_kl
        v_row = clip * stride_vb + token * stride_vl
        o_row = clip * stride_ob + token * stride_ol
        frame = tl.arange(0, FRAMES_P2)
        d = tl.arange(0, HEAD_DIM_P2)
        row_ok = rows < n_rows
        d_ok = d < HEAD_DIM
        channel = head * HEAD_DIM + d
        partner = head * HEAD_DIM + (d ^ 1)

        # Queries of every frame: BLOCK_N x FRAMES x HEAD_DIM, rotated by their frame's angle, pre-scaled.
        q_mask = row_ok[:, None, None] & (frame < FRAMES)[None, :, None] & d_ok[None, None, :]
        q_base = q_ptr + q_row[:, None, None] + frame[None, :, None] * stride_qf
        q = tl.load(q_base + channel[None, None, :], mask=q_mask, other=0.0).to(tl.float32)
        if ROTARY_DIM > 0:
            q_partner = tl.load(q_base + partner[None, None, :], mask=q_mask, other=0.0).to(tl.float32)
            table = frame[:, None] * ROTARY_DIM + d[None, :]
            table_mask = (frame < FRAMES)[:, None] & (d < ROTARY_DIM)[None, :]
            cos_q = tl.load(cos_ptr + table, mask=table_mask, other=1.0)[None, :, :]
            sin_q = tl.load(sin_ptr + table, mask=table_mask, other=0.0)[None, :, :]
            q = _rotate(q, q_partner, cos_q, sin_q, d[None, None, :], ROTARY_DIM)
        q = q * scale

        # Online softmax over the key frames, one key frame at a time.
        row_max = tl.full((BLOCK_N, FRAMES_P2), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_N, FRAMES_P2), tl.float32)
        acc = tl.zeros((BLOCK_N, FRAMES_P2, HEAD_DIM_P2), tl.float32)
        kv_mask = row_ok[:, None] & d_ok[None, :]
        for j in range(FRAMES):
            k_base = k_ptr + k_row[:, None] + j * stride_kf
            k = tl.load(k_base + channel[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            if ROTARY_DIM > 0:
                k_partner = tl.load(k_base + partner[None, :], mask=kv_mask, other=0.0).to(tl.float32)
                cos_k = tl.load(cos_ptr + j * ROTARY_DIM + d, mask=d < ROTARY_DIM, other=1.0)[None, :]
                sin_k = tl.load(sin_ptr + j * ROTARY_DIM + d, mask=d < ROTARY_DIM, other=0.0)[None, :]
                k = _rotate(k, k_partner, cos_k, sin_k, d[None, :], ROTARY_DIM)
            v = tl.load(v_ptr + v_row[:, None] + j * stride_vf + channel[None, :], mask=kv_mask, other=0.0)
            score = tl.sum(q * k[:, None, :], axis=2)
            if HAS_BIAS:
                score += tl.load(bias_ptr + (head * FRAMES + frame) * FRAMES + j, mask=frame < FRAMES, other=0.0)[None, :]
            new_max = tl.maximum(row_max, score)
            correction = tl.exp(row_max - new_max)
            weight = tl.exp(score - new_max)
            row_sum = row_sum * correction + weight
            acc = acc * correction[:, :, None] + weight[:, :, None] * v.to(tl.float32)[:, None, :]
            row_max = new_max

        out = acc / row_sum[:, :, None]
        out_ptrs = out_ptr + o_row[:, None, None] + frame[None, :, None] * stride_of + channel[None, None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


    @triton.jit
    def _channel_sums_kernel(
        x_ptr, out_ptr, rows, channels,
        ROWS_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        split, clip, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        total = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        squares = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        base = x_ptr + clip.to(tl.int64) * rows * channels
        for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_R):
            r = split * ROWS_PER_PROGRAM + r0 + tl.arange(0, BLOCK_R)
            mask = (r < rows)[:, None] & col_ok[None, :]
            v = tl.load(base + r.to(tl.int64)[:, None] * channels + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            total += v
            squares += v * v
        out = out_ptr + ((clip * tl.num_programs(0) + split) * 2) * channels + cols
        tl.store(out, tl.sum(total, 0), mask=col_ok)
        tl.store(out + channels, tl.sum(squares, 0), mask=col_ok)

    @triton.jit
    def _scale_shift_kernel(
        x_ptr, out_ptr, scale_ptr, shift_ptr, rows, channels,
        SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rb, clip, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        mask = (r < rows)[:, None] & col_ok[None, :]
        offsets = (clip.to(tl.int64) * rows + r.to(tl.int64)[:, None]) * channels + cols[None, :]
        v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + clip * channels + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + clip * channels + cols, mask=col_ok, other=0.0)
        y = v * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


_SUM_ROWS_PER_PROGRAM = 2048


def _launch_channel_sums(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()  # a view of a channels-last video already is
    clips, rows, channels = x.shape
    splits = triton.cdiv(rows, _SUM_ROWS_PER_PROGRAM)
    # Per-split partial sums, added up by torch: deterministic, unlike atomics.
    partial = torch.empty((clips, splits, 2, channels), device=x.device, dtype=torch.float32)
    block_c = min(64, triton.next_power_of_2(channels))
    _channel_sums_kernel[(splits, clips, triton.cdiv(channels, block_c))](
        x, partial, rows, channels,
        ROWS_PER_PROGRAM=_SUM_ROWS_PER_PROGRAM, BLOCK_R=32, BLOCK_C=block_c, num_warps=4,
    )
    return partial.sum(1)


def _launch_scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
    # Input and output share one contiguous layout, so one set of offsets serves both.
    x = x.contiguous()
    clips, rows, channels = x.shape
    out = torch.empty_like(x)
    block_c = min(128, triton.next_power_of_2(channels))
    block_r = max(1, 4096 // block_c)
    _scale_shift_kernel[(triton.cdiv(rows, block_r), clips, triton.cdiv(channels, block_c))](
        x, out, scale.float().contiguous(), shift.float().contiguous(), rows, channels,
        SILU=silu, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
    cos: torch.Tensor | None, sin: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    clips, frames, tokens, channels = q.shape
    n = clips * tokens
    head_dim = channels // heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, device=q.device, dtype=v.dtype)
    frames_p2 = triton.next_power_of_2(frames)
    head_dim_p2 = triton.next_power_of_2(head_dim)
    # Keep the per-program register tile (rows x frames x head_dim, q and the accumulator) near 4K values.
    block_n = max(1, min(16, 4096 // (frames_p2 * head_dim_p2)))
    rotary_dim = 0 if cos is None else cos.shape[1]
    dummy = q.new_empty(0, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), heads)
    _temporal_attention_kernel[grid](
        q, k, v, out,
        dummy if cos is None else cos, dummy if sin is None else sin, dummy if bias is None else bias,
        n, tokens, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        head_dim**-0.5,
        FRAMES=frames, FRAMES_P2=frames_p2, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        ROTARY_DIM=rotary_dim, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        num_warps=4,
    )
    return out


if _CUSTOM_OPS:

    @torch.library.custom_op("lavie::temporal_attention", mutates_args=())
    def _temporal_attention_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
        cos: torch.Tensor | None, sin: torch.Tensor | None, bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return _launch(q, k, v, heads, cos, sin, bias)

    @_temporal_attention_op.register_fake
    def _(q, k, v, heads, cos, sin, bias):
        return torch.empty(q.shape, device=q.device, dtype=v.dtype)


    @torch.library.custom_op("lavie::channel_sums", mutates_args=())
    def _channel_sums_op(x: torch.Tensor) -> torch.Tensor:
        return _launch_channel_sums(x)

    @_channel_sums_op.register_fake
    def _(x):
        return x.new_empty((x.shape[0], 2, x.shape[2]), dtype=torch.float32)

    @torch.library.custom_op("lavie::scale_shift", mutates_args=())
    def _scale_shift_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
        return _launch_scale_shift(x, scale, shift, silu)

    @_scale_shift_op.register_fake
    def _(x, scale, shift, silu):
        return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _require_kernels(name: str) -> None:
    if triton is None or not _CUSTOM_OPS:
        raise RuntimeError(f"fused.{name} needs Triton and torch >= 2.4; check fused.kernels_usable() first")


def _check_rows(name: str, x: torch.Tensor, *per_channel: torch.Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} takes `b n c` rows, got {x.ndim} dimensions")
    for t in per_channel:
        if tuple(t.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"{name}: per-channel values must be shaped {(x.shape[0], x.shape[2])}, got {tuple(t.shape)}")
    _require_kernels(name)


def channel_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sum and sum of squares over the rows of `b n c`, in float32: `b 2 c`.

    GroupNorm statistics from one read of a half-precision video, without a float32 copy; a group's
    statistics are then sums over its channels.
    """
    _check_rows("channel_sums", x)
    return _channel_sums_op(x)


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, silu: bool = False) -> torch.Tensor:
    """`x * scale + shift` per clip and channel (float32 `b c`), then SiLU if asked: GroupNorm's second pass.

    x: `b n c`; the result is `b n c`, contiguous, in x's dtype; the arithmetic is float32.
    """
    _check_rows("scale_shift", x, scale, shift)
    return _scale_shift_op(x, scale, shift, silu)


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention across frames, scale d^-0.5: q, k, v `b f l (h d)` (every pixel l of every clip b
    attends over its frames f) or `n f (h d)` (rows n); the output has the input's shape.

    `rotary`: float32 `(cos, sin)` tables `f r` applied to the first r channels of every head of q and k
    (interleaved pairs). `bias`: float32 `h f f` added to the scores.
    """
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k and v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.ndim not in (3, 4):
        raise ValueError(f"q, k and v must be `n f c` or `b f l c`, got {q.ndim} dimensions")
    frames, channels = q.shape[1], q.shape[-1]
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} heads")
    if bias is not None and tuple(bias.shape) != (heads, frames, frames):
        raise ValueError(f"bias must be shaped {(heads, frames, frames)}, got {tuple(bias.shape)}")
    if rotary is not None:
        cos, sin = (t.float().contiguous() for t in rotary)
        if cos.shape[0] != frames or cos.shape[1] % 2 or cos.shape[1] > channels // heads:
            raise ValueError(f"rotary tables must be shaped ({frames}, even r <= {channels // heads}), got {tuple(cos.shape)}")
    else:
        cos = sin = None
    bias = None if bias is None else bias.float().contiguous()
    _require_kernels("temporal_attention")
    if q.ndim == 3:
        return _temporal_attention_op(*(t.unsqueeze(2) for t in (q, k, v)), heads, cos, sin, bias).squeeze(2)
    return _temporal_attention_op(q, k, v, heads, cos, sin, bias)
