"""Fused temporal attention for CUDA: rotary positions, relative bias, softmax and the weighted sum in one pass.

Temporal attention runs over a few frames for every pixel and head, `(b h w) f c`. As batched matmuls it is
a chain of small, memory-bound kernels (head split, rotary on q and k, q k^T with 8x8 tiles, bias, softmax,
p v, head merge), each reading and writing the whole activation. The Triton kernel here reads q, k and v
once, straight from the projections' `n f (h d)` layout, and writes the output in the layout `to_out` reads.

`temporal_attention` is registered as a torch custom op, so `torch.compile` keeps it as one kernel. It has
no backward: training and CPU inference use `blocks.short_sequence_attention`.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; callers check `available()`
    triton = None

__all__ = ["available", "temporal_attention", "MAX_FRAMES"]

# Query rows are held in registers as `rows x frames x head_dim`. At 61 frames (interpolation) the kernel
# was slower than the matmul path (211 against 194 ms per compiled call on an H200); at 8 and 16 it is faster.
MAX_FRAMES = 32


# torch.library.custom_op (torch >= 2.4) makes the kernel one opaque node for torch.compile.
_CUSTOM_OPS = hasattr(torch.library, "custom_op")


def available(x: torch.Tensor, frames: int) -> bool:
    """Whether the fused kernel can serve this call (NVIDIA GPU, Triton present, no gradient, few frames)."""
    return (
        triton is not None
        and _CUSTOM_OPS
        and x.is_cuda
        and torch.version.hip is None  # measured and tested on NVIDIA only
        and frames <= MAX_FRAMES
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


if triton is not None:

    @triton.jit
    def _rotate(x, partner, cos, sin, d, rotary_dim: tl.constexpr):
        # Interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); channels >= rotary_dim pass.
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        return tl.where(d < rotary_dim, x * cos + sign * partner * sin, x)

    @triton.jit
    def _temporal_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, cos_ptr, sin_ptr, bias_ptr,
        n_rows, stride_qn, stride_qf, stride_kn, stride_kf, stride_vn, stride_vf, stride_on, stride_of,
        scale,
        FRAMES: tl.constexpr, FRAMES_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
        ROTARY_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        head = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        frame = tl.arange(0, FRAMES_P2)
        d = tl.arange(0, HEAD_DIM_P2)
        row_ok = rows < n_rows
        d_ok = d < HEAD_DIM
        channel = head * HEAD_DIM + d
        partner = head * HEAD_DIM + (d ^ 1)

        # Queries of every frame: BLOCK_N x FRAMES x HEAD_DIM, rotated by their frame's angle, pre-scaled.
        q_mask = row_ok[:, None, None] & (frame < FRAMES)[None, :, None] & d_ok[None, None, :]
        q_base = q_ptr + rows[:, None, None] * stride_qn + frame[None, :, None] * stride_qf
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
            k_base = k_ptr + rows[:, None] * stride_kn + j * stride_kf
            k = tl.load(k_base + channel[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            if ROTARY_DIM > 0:
                k_partner = tl.load(k_base + partner[None, :], mask=kv_mask, other=0.0).to(tl.float32)
                cos_k = tl.load(cos_ptr + j * ROTARY_DIM + d, mask=d < ROTARY_DIM, other=1.0)[None, :]
                sin_k = tl.load(sin_ptr + j * ROTARY_DIM + d, mask=d < ROTARY_DIM, other=0.0)[None, :]
                k = _rotate(k, k_partner, cos_k, sin_k, d[None, :], ROTARY_DIM)
            v = tl.load(v_ptr + rows[:, None] * stride_vn + j * stride_vf + channel[None, :], mask=kv_mask, other=0.0)
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
        out_ptrs = out_ptr + rows[:, None, None] * stride_on + frame[None, :, None] * stride_of + channel[None, None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
    cos: torch.Tensor | None, sin: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    n, frames, channels = q.shape
    head_dim = channels // heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((n, frames, channels), device=q.device, dtype=v.dtype)
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
        n, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
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


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention across frames: q, k, v `n f (h d)` -> `n f (h d)`, scale d^-0.5.

    `rotary`: float32 `(cos, sin)` tables `f r` applied to the first r channels of every head of q and k
    (interleaved pairs). `bias`: float32 `h f f` added to the scores.
    """
    _, frames, channels = q.shape
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k and v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
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
    if triton is None or not _CUSTOM_OPS:
        raise RuntimeError("fused.temporal_attention needs Triton and torch >= 2.4; check fused.available() first")
    return _temporal_attention_op(q, k, v, heads, cos, sin, bias)
