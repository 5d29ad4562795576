"""Fused CUDA kernels (Triton): temporal attention, and GroupNorm as two passes.

Temporal attention runs over a few frames for every pixel and head, `(b h w) f c`. As batched matmuls it is
a chain of small, memory-bound kernels (pixel grouping, head split, rotary on q and k, q k^T with 8x8
tiles, bias, softmax, p v, head merge, frame grouping), each reading and writing the whole activation.
The Triton kernel here reads q, k and v once, straight from the projections' `b f l (h d)` layout (the
spatial layers' `(b f) l c` viewed per frame), and writes the output in that layout, so the video never
changes layout around the temporal layer. Each program computes one pixel and a few neighbouring heads in
turn (their channels share cache lines): per head, scores and the weighted sum are two tensor-core dots of
`frames x head_dim` tiles (padded to 16), softmax in float32.

GroupNorm on a channels-last video is `channel_sums` (per-channel float32 sums and sums of squares, one
read) and `scale_shift` (normalisation and the SiLU that follows it, one read and one write);
`blocks.group_norm` turns the sums into the scale and shift, eagerly with `group_affine`, which also adds up
the sums kernel's per-program partial sums (a few programs per sample, instead of torch's reduction and its
dozen or so tiny launches).

Key-frame attention is flash attention where each frame's tokens attend to the tokens of a few chosen
frames of their clip (the interpolation model's sparse causal attention: frames 0 and i-1), read in place,
so the concatenated keys and values never exist. Heads that are not a power of two are split in two
power-of-two parts (40 = 32 + 16) rather than padded (cuDNN pads 40 to 64). Where its blocks tile every
frame's keys exactly, keys and values come through tensor descriptors (TMA on Hopper). Short-key attention
(text cross-attention: a clip's queries to a text's 77 tokens) holds all the keys at once, split the same
way (64 + 16), so its softmax takes one pass.

The feed-forward's GEGLU projection is one persistent matmul kernel with two accumulators, the value and the
gate half of the weight, that stores only `value * gelu(gate)`: the 2x-wide product never reaches memory.
Its tiles move through tensor descriptors (TMA on Hopper, plain loads elsewhere); a launch whose kernel
does not fit the GPU's shared memory falls back to smaller tiles (`_launch_fitting`).

Outside `torch.compile`, which fuses such passes itself, bandwidth-bound kernels replace torch's slower
ones: a convolution's bias (and the residual after it) added in place, LayerNorm (optionally of
`x + offset`), the channel concatenation of a skip connection, and, for an upsampling convolution, the
folding of its 3x3 weights into four output phases' 2x2 ones and the interleaving of those phases, and a
transformer stream's bias arithmetic (`stream_biases`; `eager_kernels_usable` says where).

The kernels that compiled calls use are torch custom ops, so `torch.compile` keeps each as one kernel; the
eager-only ones are launched directly. None has a backward: training and CPU inference take the torch
paths in `blocks`.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Hashable, Iterator, Sequence

import torch
from torch.utils import _python_dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; callers check `available()`
    triton = None
try:  # Triton >= 3.3; without it the feed-forward takes the torch path (`geglu_fits`)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

__all__ = [
    "available", "kernels_available", "kernels_usable", "is_cuda", "meta_as_cuda",
    "temporal_attention", "key_frame_attention", "short_key_attention", "channel_sums", "scale_shift", "geglu",
    "bias_add_", "channels_last_rows", "layer_norm", "concat_channels", "eager_kernels_usable", "bias_add_fits",
    "concat_channels_fits", "geglu_fits", "upsample_phases", "upsample_phases_fits", "upsample_weight", "group_affine",
    "stream_biases", "unfold_3x3",
    "MAX_FRAMES", "SHORT_KEYS_MAX", "compile_ahead",
]

log = logging.getLogger(__name__)

# A program holds `frames x head_dim` tiles of q, k, v and the scores in registers: up to 64 frames (the
# interpolation model's 61) it beats the regrouped matmuls and SDPA at every model width (`_temporal_warps`).
MAX_FRAMES = 64

# The most keys `short_key_attention` holds at once, in one or two power-of-two parts (a text's 77 tokens are
# 64 + 16).
SHORT_KEYS_MAX = 128


# torch.library.custom_op (torch >= 2.4) makes the kernel one opaque node for torch.compile.
_CUSTOM_OPS = hasattr(torch.library, "custom_op")


def _through_op() -> bool:
    """Whether a kernel goes through its torch.library op rather than launching directly: under torch.compile
    (one opaque node in its graph) and under a torch dispatch mode (FlopCounterMode counts the op). The op's
    dispatch costs the host more than the launch itself, and a call without CUDA graphs (`cuda_graph` off,
    the first calls of a stage) waits for the host: an eager base call's 93 ops took about 4 ms of its host
    time on an H200 (48.4-54.0 -> 44.1-48.1 ms)."""
    return torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None


_META_AS_CUDA: contextvars.ContextVar[bool | None] = contextvars.ContextVar("lavie_meta_as_cuda", default=None)


@contextlib.contextmanager
def meta_as_cuda(*, kernels: bool = True) -> Iterator[None]:
    """Within it, meta tensors take the CUDA paths, with or without this module's kernels (which then return
    shape-only outputs): a memory trace of a CUDA call (`lavie_core.memory`) on any machine. Local to the
    thread or task."""
    token = _META_AS_CUDA.set(kernels)
    try:
        yield
    finally:
        _META_AS_CUDA.reset(token)


def is_cuda(x: torch.Tensor) -> bool:
    """`x.is_cuda`, or a meta tensor inside `meta_as_cuda`."""
    return x.is_cuda or (x.is_meta and _META_AS_CUDA.get() is not None)


def kernels_available(device: torch.device | str) -> bool:
    """Whether this module's kernels run on `device`: an NVIDIA GPU, with Triton and torch >= 2.4 installed."""
    device = torch.device(device)
    return triton is not None and _CUSTOM_OPS and device.type == "cuda" and torch.version.hip is None


def kernels_usable(x: torch.Tensor) -> bool:
    """Whether this module's kernels can take x: `kernels_available` on its device, no gradient needed (the
    kernels have no backward)."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    simulated = _META_AS_CUDA.get() if x.is_meta else None
    if simulated is not None:
        return simulated and not needs_grad
    # ROCm: the kernels were measured and tested on NVIDIA only.
    return kernels_available(x.device) and not needs_grad


def eager_kernels_usable(x: torch.Tensor) -> bool:
    """`kernels_usable`, outside `torch.compile`: for the kernels that replace passes Inductor fuses itself."""
    return kernels_usable(x) and not torch.compiler.is_compiling()


def available(x: torch.Tensor, frames: int) -> bool:
    """Whether the fused temporal attention can serve this call (`kernels_usable`, few frames)."""
    return frames <= MAX_FRAMES and kernels_usable(x)


_COMPILING_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar("lavie_compiling_ahead", default=False)
# Keys of the calls whose kernels are compiled in this process (Triton keeps compiled kernels for its lifetime).
_COMPILED_AHEAD: set[Hashable] = set()


def _run(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`; inside `compile_ahead`, its compilation is queued instead (nothing runs)."""
    if _COMPILING_AHEAD.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def compile_ahead(fn: Callable[..., object], *args: object, key: Hashable | None = None, workers: int | None = None,
                  **kwargs: object) -> bool:
    """Compile the kernels that `fn(*args, **kwargs)` launches, on `workers` threads at once (default: one per
    CPU core, at most 16), before the call that needs them.

    Triton compiles a kernel the first time it launches with new constants, one after another: on an H200
    host whose Triton cache was empty, the 93 kernel variants the cascade then launched took 24.7-26.6 s; on
    16 threads, 4.9-5.4 s (Triton's MLIR passes hold Python's lock, so threads help less than processes
    would). Kernels take channel counts at run time, so the cascade now launches 48 (29, 9, 8 and 2 in the
    four compile-ahead calls of one cascade on a fresh machine). Here `fn` runs
    once with every kernel launch replaced by its compilation (cuBLAS and cuDNN work runs as usual, on
    outputs of no meaning), then waits for the compiles. Kernels in Triton's disk cache only load. A `key`
    seen before (a model and input signature) returns at once: compiled kernels stay for the life of the
    process. Returns whether anything ran; never raises, since the call itself launches and, if it must,
    compiles every kernel as it would without this.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if (triton is None or not hasattr(triton, "AsyncCompileMode") or not tensors
            or not kernels_usable(tensors[0]) or torch.compiler.is_compiling() or key in _COMPILED_AHEAD):
        return False
    if key is not None:
        if len(_COMPILED_AHEAD) >= 256:
            _COMPILED_AHEAD.clear()
        _COMPILED_AHEAD.add(key)
    workers = workers or min(16, os.cpu_count() or 1)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="lavie-compile") as pool:
        mode = triton.AsyncCompileMode(pool)
        try:
            mode.__enter__()
        except RuntimeError:  # the caller compiles asynchronously itself
            return False
        token = _COMPILING_AHEAD.set(True)
        try:
            with torch.no_grad():
                fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the call itself reports what is wrong
            log.info("LaVie: compiling kernels ahead stopped (%s: %s); they compile as they launch", type(e).__name__, e)
            return False
        finally:
            _COMPILING_AHEAD.reset(token)
            # A kernel that failed to compile is left out, so that leaving the mode cannot raise (and leave it
            # active): its launch compiles it again and reports the error.
            wait(mode.raw_futures)
            mode.raw_futures[:] = [f for f in mode.raw_futures if f.exception() is None]
            mode.__exit__(None, None, None)
        # Loading a kernel builds its launcher (a C module, compiled once per argument list) and loads its
        # binary on the GPU: in parallel too, on the tensors' device.
        kernels = [k.kernel for k in mode.future_kernels.values() if k.kernel is not None]
        wait([pool.submit(_load, k, tensors[0].device) for k in kernels])
    if kernels:
        log.info("LaVie: %d kernels compiled or loaded ahead in %.1f s", len(kernels), time.perf_counter() - start)
    return True


def _load(kernel, device: torch.device) -> None:
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        try:
            kernel.run  # noqa: B018 - the property loads the kernel
        except Exception:  # noqa: BLE001 - kept by the kernel, raised at its launch (too little shared memory)
            pass


if triton is not None:

    @triton.jit
    def _frame_tile(ptr, row_offset, frame, stride_f, channel, mask):
        # `rows x channels` of a strided block, zero where masked: a pixel's frames of one head, straight from
        # the `b f l c` layout (temporal attention), or a text's keys of one head (short-key attention).
        return tl.load(ptr + row_offset + frame[:, None] * stride_f + channel[None, :], mask=mask, other=0.0)

    @triton.jit
    def _rotate_pairs(x, cos, sin):
        # x: `h f d`, cos and sin: `f d/2`.
        even, odd = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
        cos, sin = cos[None, :, :], sin[None, :, :]
        return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), x.shape)

    @triton.jit(do_not_specialize=["tokens"])
    def _temporal_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, cos_ptr, sin_ptr, bias_ptr,
        tokens,
        stride_qb, stride_qf, stride_ql, stride_kb, stride_kf, stride_kl,
        stride_vb, stride_vf, stride_vl, stride_ob, stride_of, stride_ol, stride_bh, stride_bi, stride_bj,
        scale,
        FRAMES: tl.constexpr, FRAMES_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        ROTARY_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, BATCHED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program: one pixel of one clip (a row) and HEADS_PER_PROGRAM neighbouring heads, every frame.
        # BATCHED: the heads are the batch of `h f d` tiles and 3-D tensor-core dots, all loaded at once; else
        # one head after another, two small dots each (long clips, whose tiles would not fit in registers at once).
        row, head_block = tl.program_id(0), tl.program_id(1)
        # 64-bit offsets, since a video can pass 2^31 elements.
        clip, token = (row // tokens).to(tl.int64), (row % tokens).to(tl.int64)
        frame = tl.arange(0, FRAMES_PAD)
        d = tl.arange(0, HEAD_DIM_PAD)
        frame_ok = frame < FRAMES
        q_row, k_row = clip * stride_qb + token * stride_ql, clip * stride_kb + token * stride_kl
        v_row, o_row = clip * stride_vb + token * stride_vl, clip * stride_ob + token * stride_ol
        if ROTARY_DIM > 0:
            # Channel pairs (2i, 2i+1) share an angle: split each tile into its even and odd channels.
            pair = tl.arange(0, HEAD_DIM_PAD // 2)
            table = frame[:, None] * ROTARY_DIM + 2 * pair[None, :]
            table_mask = frame_ok[:, None] & (2 * pair < ROTARY_DIM)[None, :]
            cos = tl.load(cos_ptr + table, mask=table_mask, other=1.0)
            sin = tl.load(sin_ptr + table, mask=table_mask, other=0.0)
        if BATCHED:
            head = head_block * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
            channel = (head * HEAD_DIM)[:, None, None] + d[None, None, :]
            frames3 = frame[None, :, None]
            mask = frame_ok[None, :, None] & (d < HEAD_DIM)[None, None, :]
            q = tl.load(q_ptr + q_row + frames3 * stride_qf + channel, mask=mask, other=0.0)
            k = tl.load(k_ptr + k_row + frames3 * stride_kf + channel, mask=mask, other=0.0)
            v = tl.load(v_ptr + v_row + frames3 * stride_vf + channel, mask=mask, other=0.0)
            if ROTARY_DIM > 0:
                q = _rotate_pairs(q, cos, sin).to(v.dtype)
                k = _rotate_pairs(k, cos, sin).to(v.dtype)
            bias_entry = head[:, None, None] * stride_bh + frames3 * stride_bi + frame[None, None, :] * stride_bj
            keys_ok = frame_ok[None, None, :]
            out = _attend(q, tl.permute(k, (0, 2, 1)), v, bias_ptr + bias_entry, frame_ok[None, :, None] & keys_ok,
                          keys_ok, scale, HAS_BIAS, PRECISION)
            tl.store(out_ptr + o_row + frames3 * stride_of + channel, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            mask = frame_ok[:, None] & (d < HEAD_DIM)[None, :]
            for i in tl.static_range(HEADS_PER_PROGRAM):
                head = head_block * HEADS_PER_PROGRAM + i
                channel = head * HEAD_DIM + d
                q = _frame_tile(q_ptr, q_row, frame, stride_qf, channel, mask)
                k = _frame_tile(k_ptr, k_row, frame, stride_kf, channel, mask)
                v = _frame_tile(v_ptr, v_row, frame, stride_vf, channel, mask)
                if ROTARY_DIM > 0:
                    q = _rotate_pairs(q[None, :, :], cos, sin).reshape(FRAMES_PAD, HEAD_DIM_PAD).to(v.dtype)
                    k = _rotate_pairs(k[None, :, :], cos, sin).reshape(FRAMES_PAD, HEAD_DIM_PAD).to(v.dtype)
                bias_entry = head * stride_bh + frame[:, None] * stride_bi + frame[None, :] * stride_bj
                out = _attend(q, tl.trans(k), v, bias_ptr + bias_entry, frame_ok[:, None] & frame_ok[None, :],
                              frame_ok[None, :], scale, HAS_BIAS, PRECISION)
                out_ptrs = out_ptr + o_row + frame[:, None] * stride_of + channel[None, :]
                tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _attend(q, k_t, v, bias_ptrs, bias_mask, key_ok, scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        # softmax(q k^T * scale + bias) v over the last two dimensions, masked keys left out. Scores and softmax
        # in float32; the weights meet v in its dtype, as in flash attention. The bias is read through its
        # strides in its dtype: the relative position embedding's lookup, as it comes.
        scores = tl.dot(q, k_t, input_precision=PRECISION) * scale
        if HAS_BIAS:
            scores += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
        scores = tl.where(key_ok, scores, float("-inf"))
        weights = tl.exp(scores - tl.expand_dims(tl.max(scores, axis=-1), -1))
        out = tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        return out / tl.expand_dims(tl.sum(weights, axis=-1), -1)


    @triton.jit
    def _key_tile(desc, rows, channels, ok, first_row, first_channel, TMA: tl.constexpr):
        # BLOCK_N rows of one head's channels (or of a part of them): a tensor descriptor's tile, or masked loads.
        if TMA:
            tile = desc.load([first_row, first_channel])
        else:
            tile = tl.load(rows + channels[None, :], mask=ok, other=0.0)
        return tile

    @triton.jit
    def _key_frame_attention_kernel(
        q_ptr, k_ptr, v_ptr, k0_desc, k1_desc, v0_desc, v1_desc, out_ptr, key_frames_ptr, frames, tokens,
        stride_qn, stride_ql, stride_kn, stride_kl, stride_vn, stride_vl, stride_on, stride_ol,
        scale_log2,
        KEY_TOKENS: tl.constexpr, LOOP_END: tl.constexpr, KEYS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, ROW_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One program: BLOCK_M query tokens of one frame and head, online softmax over the key frames' tokens.
        # The head's channels are a D0 part and a masked D1 part (D1 = 0: none), so q k^T and p v are two dots
        # each instead of one of the padded width. The loop bound is a compile-time constant (the interpreter
        # needs one; a model has a few token counts) and spans at least two blocks: with a split head, Triton
        # 3.5-3.6 compiled a one-block loop into a kernel that read out of bounds on an H200. A block past
        # the keys is all masked and changes nothing.
        # With TMA, keys and values come through tensor descriptors over the `(n m) c` rows (TMA on Hopper),
        # only where the blocks tile each frame's tokens exactly (`_key_frame_launch`): nothing is masked. A
        # D1 tile past the head reads the next head's channels (or zeros past the last), which meet q's zero
        # padding in q k^T and only fill unused columns of p v.
        block, row_head = tl.program_id(0), tl.program_id(1)
        row = (row_head // HEADS).to(tl.int64)
        head = row_head % HEADS
        rm = block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < tokens
        d0 = tl.arange(0, D0)
        c0 = head * HEAD_DIM + d0
        d0_ok = d0 < HEAD_DIM
        q_rows = q_ptr + row * stride_qn + rm.to(tl.int64)[:, None] * stride_ql
        q0 = tl.load(q_rows + c0[None, :], mask=m_ok[:, None] & d0_ok[None, :], other=0.0)
        if D1 > 0:
            d1 = D0 + tl.arange(0, D1)
            c1 = head * HEAD_DIM + d1
            d1_ok = d1 < HEAD_DIM
            q1 = tl.load(q_rows + c1[None, :], mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
            acc1 = tl.zeros((BLOCK_M, D1), tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
        frame = row % frames
        # A frame whose keys are all one frame repeated (sparse causal attention's frames 0 and 1) attends to
        # that frame once: repeating every key scales each exponential and their sum alike.
        first = tl.load(key_frames_ptr + frame * KEYS)
        passes = 1
        for s in tl.static_range(1, KEYS):
            passes = tl.where(tl.load(key_frames_ptr + frame * KEYS + s) != first, KEYS, passes)
        for s in tl.static_range(KEYS):
            if s < passes:
                key_row = row - frame + tl.load(key_frames_ptr + frame * KEYS + s)
                k_frame = k_ptr + key_row * stride_kn
                v_frame = v_ptr + key_row * stride_vn
                token_row = (key_row * KEY_TOKENS).to(tl.int32)
                for start in range(0, LOOP_END, BLOCK_N):
                    rn = start + tl.arange(0, BLOCK_N)
                    n_ok = rn < KEY_TOKENS
                    k_rows = k_frame + rn[:, None] * stride_kl
                    v_rows = v_frame + rn[:, None] * stride_vl
                    k0 = _key_tile(k0_desc, k_rows, c0, n_ok[:, None] & d0_ok[None, :], token_row + start, head * HEAD_DIM, TMA)
                    scores = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
                    if D1 > 0:
                        k1 = _key_tile(k1_desc, k_rows, c1, n_ok[:, None] & d1_ok[None, :], token_row + start,
                                       head * HEAD_DIM + D0, TMA)
                        scores = tl.dot(q1, tl.trans(k1), scores, input_precision=PRECISION)
                    if not TMA:
                        scores = tl.where(n_ok[None, :], scores, float("-inf"))
                    # exp2 with the scale folded in: one multiply-add per score.
                    m_new = tl.maximum(m_i, tl.max(scores, 1) * scale_log2)
                    alpha = tl.math.exp2(m_i - m_new)
                    p = tl.math.exp2(scores * scale_log2 - m_new[:, None])
                    if not ROW_SUM:
                        l_i = l_i * alpha + tl.sum(p, 1)
                    p = p.to(out_ptr.dtype.element_ty)
                    v0 = _key_tile(v0_desc, v_rows, c0, n_ok[:, None] & d0_ok[None, :], token_row + start, head * HEAD_DIM, TMA)
                    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
                    if D1 > 0:
                        v1 = _key_tile(v1_desc, v_rows, c1, n_ok[:, None] & d1_ok[None, :], token_row + start,
                                       head * HEAD_DIM + D0, TMA)
                        if ROW_SUM:
                            # A column of ones in the padding makes the p v dot also sum each row of p: the
                            # softmax denominator comes from the tensor cores, not a reduction per block.
                            v1 = tl.where((d1 == HEAD_DIM)[None, :] & n_ok[:, None], 1.0, v1).to(p.dtype)
                        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
                    m_i = m_new
        if ROW_SUM:
            l_i = tl.sum(tl.where((d1 == HEAD_DIM)[None, :], acc1, 0.0), 1)
        inv = 1.0 / l_i
        o_rows = out_ptr + row * stride_on + rm.to(tl.int64)[:, None] * stride_ol
        dtype = out_ptr.dtype.element_ty
        tl.store(o_rows + c0[None, :], (acc0 * inv[:, None]).to(dtype), mask=m_ok[:, None] & d0_ok[None, :])
        if D1 > 0:
            tl.store(o_rows + c1[None, :], (acc1 * inv[:, None]).to(dtype), mask=m_ok[:, None] & d1_ok[None, :])


    @triton.jit(do_not_specialize=["tokens", "keys"])
    def _short_key_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tokens, keys,
        stride_qb, stride_ql, stride_kb, stride_kl, stride_vb, stride_vl, stride_ob, stride_ol, scale_log2,
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, N0: tl.constexpr,
        N1: tl.constexpr, BLOCK_M: tl.constexpr, ROUNDS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One program: one head of one sample, ROUNDS blocks of BLOCK_M query tokens in turn. All the keys fit
        # at once, so the softmax is exact in one pass (no running maximum to rescale by) and the key and value
        # tiles are loaded once for every round. The head's channels are a D0 part and a masked D1 part, and
        # the keys an N0 part and a masked N1 part (D1, N1 = 0: none; 77 text tokens are 64 + 16, heads of 40
        # 32 + 16), so each product is a few dots instead of one of the padded sizes. ROUNDS is at least 2:
        # with a split head and no loop, Triton 3.6 compiled this kernel into one that gave wrong results or
        # faulted on an H200 (as it did the key-frame kernel with a one-block loop).
        block, sample_head = tl.program_id(0), tl.program_id(1)
        sample = (sample_head // HEADS).to(tl.int64)
        head = sample_head % HEADS
        k_row, v_row = sample * stride_kb, sample * stride_vb
        d0 = tl.arange(0, D0)
        d0_ok = d0 < HEAD_DIM
        c0 = head * HEAD_DIM + d0
        d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
        d1_ok = d1 < HEAD_DIM
        c1 = head * HEAD_DIM + d1
        n0 = tl.arange(0, N0)
        n0_ok = n0 < keys
        n1 = N0 + tl.arange(0, N1 if N1 > 0 else 16)
        n1_ok = n1 < keys
        # Tiles named key/value, key part (0: N0 keys, 1: N1), channel part; unused ones stand in as k00.
        ok00 = n0_ok[:, None] & d0_ok[None, :]
        k00 = _frame_tile(k_ptr, k_row, n0, stride_kl, c0, ok00)
        v00 = _frame_tile(v_ptr, v_row, n0, stride_vl, c0, ok00)
        k01, v01, k10, v10, k11, v11 = k00, v00, k00, v00, k00, v00
        if D1 > 0:
            ok01 = n0_ok[:, None] & d1_ok[None, :]
            k01 = _frame_tile(k_ptr, k_row, n0, stride_kl, c1, ok01)
            v01 = _frame_tile(v_ptr, v_row, n0, stride_vl, c1, ok01)
        if N1 > 0:
            ok10 = n1_ok[:, None] & d0_ok[None, :]
            k10 = _frame_tile(k_ptr, k_row, n1, stride_kl, c0, ok10)
            v10 = _frame_tile(v_ptr, v_row, n1, stride_vl, c0, ok10)
            if D1 > 0:
                ok11 = n1_ok[:, None] & d1_ok[None, :]
                k11 = _frame_tile(k_ptr, k_row, n1, stride_kl, c1, ok11)
                v11 = _frame_tile(v_ptr, v_row, n1, stride_vl, c1, ok11)
        dtype = out_ptr.dtype.element_ty
        for i in range(ROUNDS):
            rm = (block * ROUNDS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = rm < tokens
            q_rows = q_ptr + sample * stride_qb + rm.to(tl.int64)[:, None] * stride_ql
            o_rows = out_ptr + sample * stride_ob + rm.to(tl.int64)[:, None] * stride_ol
            q0 = tl.load(q_rows + c0[None, :], mask=m_ok[:, None] & d0_ok[None, :], other=0.0)
            s0 = tl.dot(q0, tl.trans(k00), input_precision=PRECISION)
            if D1 > 0:
                q1 = tl.load(q_rows + c1[None, :], mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
                s0 = tl.dot(q1, tl.trans(k01), s0, input_precision=PRECISION)
            s0 = tl.where(n0_ok[None, :], s0, float("-inf"))
            top = tl.max(s0, 1)
            if N1 > 0:
                s1 = tl.dot(q0, tl.trans(k10), input_precision=PRECISION)
                if D1 > 0:
                    s1 = tl.dot(q1, tl.trans(k11), s1, input_precision=PRECISION)
                s1 = tl.where(n1_ok[None, :], s1, float("-inf"))
                top = tl.maximum(top, tl.max(s1, 1))
            # exp2 with the scale folded in: one multiply-add per score.
            top = top * scale_log2
            p = tl.math.exp2(s0 * scale_log2 - top[:, None])
            total = tl.sum(p, 1)
            p = p.to(dtype)
            acc0 = tl.dot(p, v00, input_precision=PRECISION)
            if D1 > 0:
                acc1 = tl.dot(p, v01, input_precision=PRECISION)
            if N1 > 0:
                p = tl.math.exp2(s1 * scale_log2 - top[:, None])
                total += tl.sum(p, 1)
                p = p.to(dtype)
                acc0 = tl.dot(p, v10, acc0, input_precision=PRECISION)
                if D1 > 0:
                    acc1 = tl.dot(p, v11, acc1, input_precision=PRECISION)
            inv = 1.0 / total
            tl.store(o_rows + c0[None, :], (acc0 * inv[:, None]).to(dtype), mask=m_ok[:, None] & d0_ok[None, :])
            if D1 > 0:
                tl.store(o_rows + c1[None, :], (acc1 * inv[:, None]).to(dtype), mask=m_ok[:, None] & d1_ok[None, :])

    @triton.jit
    def _row_sums(base, first, count, rows, channels, cols, col_ok, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Column sums and sums of squares of rows [first, first + count) of a `rows x channels` block.
        total = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        squares = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for r0 in range(0, count, BLOCK_R):
            r = first + r0 + tl.arange(0, BLOCK_R)
            mask = (r < rows)[:, None] & col_ok[None, :]
            v = tl.load(base + r.to(tl.int64)[:, None] * channels + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            total += v
            squares += v * v
        return tl.sum(total, 0), tl.sum(squares, 0)

    @triton.jit(do_not_specialize=["rows", "rows_per_program"])
    def _channel_sums_kernel(
        x_ptr, out_ptr, rows, channels, rows_per_program,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETER_ROWS: tl.constexpr,
    ):
        # Rows per program at run time, not a constant for each power of two: fewer variants to compile. The
        # interpreter takes only constant loop bounds: there they are INTERPRETER_ROWS (0 on GPUs).
        split, clip, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        base = x_ptr + clip.to(tl.int64) * rows * channels
        total, squares = _row_sums(
            base, split * rows_per_program, INTERPRETER_ROWS if INTERPRETER_ROWS else rows_per_program, rows, channels,
            cols, col_ok, BLOCK_R, BLOCK_C,
        )
        out = out_ptr + ((clip * tl.num_programs(0) + split) * 2) * channels + cols
        tl.store(out, total, mask=col_ok)
        tl.store(out + channels, squares, mask=col_ok)

    @triton.jit(do_not_specialize=["rows", "channels", "groups", "group", "splits"])
    def _group_affine_kernel(
        sums_ptr, offset_ptr, channel_offset_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, rows, eps, channels,
        groups, group, splits,
        GROUP_BLOCK: tl.constexpr, GROUP_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr, OFFSET: tl.constexpr,
        CHANNEL_OFFSET: tl.constexpr, INTERPRETER_SPLITS: tl.constexpr,
    ):
        # A program holds GROUP_BLOCK groups of one sample as `groups x channels per group`, so each group's
        # statistics are one row reduction. The sums arrive as `splits` partial sums (`_channel_sums_kernel`'s
        # programs along the rows), added up here SPLIT_BLOCK at a time (loads in flight together: one at a
        # time, the loop's latency made the kernels of a base call take 0.61 ms instead of 0.26 on an H200)
        # rather than by a kernel of their own. The interpreter takes only constant loop bounds: there the
        # count is INTERPRETER_SPLITS (0 on GPUs).
        sample = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUP_BLOCK + tl.arange(0, GROUP_BLOCK)
        j = tl.arange(0, GROUP_PAD)
        mask = (g < groups)[:, None] & (j < group)[None, :]
        cols = g[:, None] * group + j[None, :]
        total = tl.zeros((GROUP_BLOCK, GROUP_PAD), tl.float32)
        squares = tl.zeros((GROUP_BLOCK, GROUP_PAD), tl.float32)
        parts = sums_ptr + sample * splits * 2 * channels + cols[None, :, :]
        for s0 in range(0, INTERPRETER_SPLITS if INTERPRETER_SPLITS else splits, SPLIT_BLOCK):
            split = s0 + tl.arange(0, SPLIT_BLOCK)
            ok = (split < splits)[:, None, None] & mask[None, :, :]
            at = parts + (split * 2 * channels)[:, None, None]
            total += tl.sum(tl.load(at, mask=ok, other=0.0), 0)
            squares += tl.sum(tl.load(at + channels, mask=ok, other=0.0), 0)
        m = rows.to(tl.float32)
        if OFFSET or CHANNEL_OFFSET:
            t = tl.zeros((GROUP_BLOCK, GROUP_PAD), tl.float32)
            if OFFSET:
                t += tl.load(offset_ptr + sample * channels + cols, mask=mask, other=0.0).to(tl.float32)
            if CHANNEL_OFFSET:
                t += tl.load(channel_offset_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            squares += t * (2 * total + m * t)
            total += m * t
        n = m * group
        mean = tl.sum(total, 1) / n
        var = tl.maximum(tl.sum(squares, 1) / n - mean * mean, 0.0)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        scale = (1.0 / tl.sqrt(var + eps))[:, None] * weight
        shift = bias - mean[:, None] * scale
        if OFFSET or CHANNEL_OFFSET:
            shift += t * scale
        tl.store(scale_ptr + sample * channels + cols, scale, mask=mask)
        tl.store(shift_ptr + sample * channels + cols, shift, mask=mask)

    @triton.jit
    def _stream_biases_kernel(
        b0_ptr, b1_ptr, b2_ptr, b3_ptr, in_ptr, out_ptr, offsets_ptr, stream_ptr, norm_ptr, channels,
        HAS_IN: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Suffix sums of the four branch biases, in float32: branch k's norm takes off what is not yet due.
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = c < channels
        s3 = tl.load(b3_ptr + c, mask=ok, other=0.0).to(tl.float32)
        s2 = s3 + tl.load(b2_ptr + c, mask=ok, other=0.0).to(tl.float32)
        s1 = s2 + tl.load(b1_ptr + c, mask=ok, other=0.0).to(tl.float32)
        s0 = s1 + tl.load(b0_ptr + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(offsets_ptr + c, -s0, mask=ok)
        tl.store(offsets_ptr + channels + c, -s1, mask=ok)
        tl.store(offsets_ptr + 2 * channels + c, -s2, mask=ok)
        tl.store(offsets_ptr + 3 * channels + c, -s3, mask=ok)
        if HAS_IN:
            s0 += tl.load(in_ptr + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(stream_ptr + c, s0.to(stream_ptr.dtype.element_ty), mask=ok)
        if HAS_OUT:
            tl.store(norm_ptr + c, -tl.load(out_ptr + c, mask=ok, other=0.0).to(tl.float32), mask=ok)

    @triton.jit(do_not_specialize=["rows"])
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

    @triton.jit
    def _row_block(rows, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # A row-wise kernel's program (i, j): its rows and channels, the channels that exist, and the mask of
        # the elements that do. In the row-wise kernels channel counts are run-time values, so one compiled
        # kernel serves every model width: a count divisible by 16 (Triton specialises on that) still makes
        # each row 16-byte aligned and the loads wide. Row counts are not specialised on at all.
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        return r, cols, col_ok, (r < rows)[:, None] & col_ok[None, :]

    @triton.jit(do_not_specialize=["rows"])
    def _bias_add_kernel(
        x_ptr, bias_ptr, extra_ptr, residual_ptr, rows, channels,
        EXTRA: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        r, cols, col_ok, mask = _row_block(rows, channels, BLOCK_R, BLOCK_C)
        offsets = r.to(tl.int64)[:, None] * channels + cols[None, :]
        y = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if EXTRA:
            b += tl.load(extra_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y += b[None, :]
        if RESIDUAL:
            y += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offsets, y.to(x_ptr.dtype.element_ty), mask=mask)


    @triton.jit(do_not_specialize=["rows", "pixels", "b_samples"])
    def _concat_channels_kernel(
        a_ptr, b_ptr, out_ptr, rows, pixels, b_samples, ca, cb,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        r_ok = (r < rows)[:, None]
        in_a = (cols < ca)[None, :]
        in_b = ((cols >= ca) & (cols < ca + cb))[None, :]
        # b's samples repeat along the batch (`torch.cat([b] * n)`): row r reads sample (r // pixels) % b_samples.
        b_row = ((r // pixels) % b_samples).to(tl.int64) * pixels + r % pixels
        va = tl.load(a_ptr + r.to(tl.int64)[:, None] * ca + cols[None, :], mask=r_ok & in_a, other=0.0)
        vb = tl.load(b_ptr + b_row[:, None] * cb + (cols - ca)[None, :], mask=r_ok & in_b, other=0.0)
        out = out_ptr + r.to(tl.int64)[:, None] * (ca + cb) + cols[None, :]
        tl.store(out, tl.where(in_a, va, vb), mask=r_ok & (in_a | in_b))

    @triton.jit(do_not_specialize=["rows", "height", "width"])
    def _unfold_3x3_kernel(
        x_ptr, out_ptr, rows, height, width, channels, stride_n, stride_h, stride_w,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # One program: BLOCK_R output pixels' channels of one of the nine window taps, zeros past the image.
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        tap = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        pixels = height * width
        n, y, x = r // pixels, (r % pixels) // width, r % width
        y, x = y + tap // 3 - 1, x + tap % 3 - 1
        inside = (r < rows) & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        source = n.to(tl.int64) * stride_n + y.to(tl.int64) * stride_h + x.to(tl.int64) * stride_w
        c_ok = (c < channels)[None, :]
        v = tl.load(x_ptr + source[:, None] + c[None, :], mask=inside[:, None] & c_ok, other=0.0)
        out = out_ptr + r.to(tl.int64)[:, None] * (9 * channels) + tap * channels + c[None, :]
        tl.store(out, v, mask=(r < rows)[:, None] & c_ok)

    @triton.jit(do_not_specialize=["rows"])
    def _layer_norm_kernel(
        x_ptr, weight_ptr, bias_ptr, offset_ptr, out_ptr, rows, stride_x, eps, channels,
        OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < channels
        mask = (r < rows)[:, None] & col_ok[None, :]
        v = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if OFFSET:
            v += tl.load(offset_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mean = tl.sum(v, 1) / channels
        centred = tl.where(col_ok[None, :], v - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, 1) / channels + eps)
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * weight[None, :] + bias[None, :]
        tl.store(out_ptr + r.to(tl.int64)[:, None] * channels + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["columns"])
    def _softmax_rows_kernel(
        s_ptr, out_ptr, columns, scale_log2, BLOCK: tl.constexpr, INTERPRETER_COLUMNS: tl.constexpr,
    ):
        # One program per row, in two reads of the float32 scores: a running maximum and sum per lane (with the
        # scale folded into exp2), then the normalised weights in the output's dtype. Lanes start from a finite
        # floor rather than -inf, so a lane that never sees a score adds exp2(floor - max) = 0, not NaN. The
        # interpreter takes only constant loop bounds: there INTERPRETER_COLUMNS is the count (0 on GPUs).
        row = tl.program_id(0).to(tl.int64)
        scores, out = s_ptr + row * columns, out_ptr + row * columns
        lane = tl.arange(0, BLOCK)
        m = tl.full((BLOCK,), -1.0e30, tl.float32)
        total = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, INTERPRETER_COLUMNS if INTERPRETER_COLUMNS else columns, BLOCK):
            c = start + lane
            v = tl.load(scores + c, mask=c < columns, other=float("-inf")) * scale_log2
            m_new = tl.maximum(m, v)
            total = total * tl.math.exp2(m - m_new) + tl.math.exp2(v - m_new)
            m = m_new
        peak = tl.max(m, 0)
        inv = 1.0 / tl.sum(total * tl.math.exp2(m - peak), 0)
        for start in range(0, INTERPRETER_COLUMNS if INTERPRETER_COLUMNS else columns, BLOCK):
            c = start + lane
            v = tl.load(scores + c, mask=c < columns, other=float("-inf")) * scale_log2
            tl.store(out + c, (tl.math.exp2(v - peak) * inv).to(out_ptr.dtype.element_ty), mask=c < columns)

    @triton.jit(do_not_specialize=["rows", "height", "width"])
    def _upsample_phases_kernel(
        y_ptr, bias_ptr, out_ptr, rows, height, width, channels,
        BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # Output pixel (n, 2i + p, 2j + q) is phase 2p + q's channels of y at (n, i + p, j + q): each output
        # row of channels is one contiguous run of y's, so reads and writes both move whole rows.
        r, cols, col_ok, mask = _row_block(rows, channels, BLOCK_R, BLOCK_C)
        image, pixel = r // (4 * height * width), r % (4 * height * width)
        row, col = pixel // (2 * width), pixel % (2 * width)
        p, q = row % 2, col % 2
        source = ((image * (height + 1) + row // 2 + p) * (width + 1) + col // 2 + q).to(tl.int64)
        phase = (2 * p + q) * channels
        v = tl.load(y_ptr + source[:, None] * (4 * channels) + phase[:, None] + cols[None, :], mask=mask, other=0.0)
        if BIAS:
            v = v.to(tl.float32) + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + r.to(tl.int64)[:, None] * channels + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fold3(t0, t1, t2):
        # Which of a 3x3 kernel's taps along one axis meet each tap of a 2x2 phase kernel, index 2 * phase
        # + tap: phase 0 reads (i - 1, i, i), phase 1 (i, i, i + 1) (`blocks._phase_fold`).
        return t0, t1 + t2, t0 + t1, t2

    @triton.jit
    def _upsample_weight_kernel(
        w_ptr, out_ptr, outs, ins, stride_o, stride_i, stride_y, stride_x, BLOCK_I: tl.constexpr,
    ):
        # One output channel and BLOCK_I input channels: the nine taps in, the sixteen folded taps out
        # (`p q o a b i` order, the phase kernels channels-last), each a float32 sum rounded once.
        o = tl.program_id(0)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        ok = i < ins
        src = w_ptr + o.to(tl.int64) * stride_o + i * stride_i
        taps = ()
        for x in tl.static_range(3):
            column = ()
            for y in tl.static_range(3):
                column = column + (tl.load(src + y * stride_y + x * stride_x, mask=ok, other=0.0).to(tl.float32),)
            taps = taps + (_fold3(column[0], column[1], column[2]),)  # taps[x][2p + a]
        for k in tl.static_range(4):
            folded = _fold3(taps[0][k], taps[1][k], taps[2][k])  # folded[2q + b] of row fold k = 2p + a
            for m in tl.static_range(4):
                phase = (k // 2) * 2 + m // 2
                tap = (k % 2) * 2 + m % 2
                dst = out_ptr + ((phase * outs + o).to(tl.int64) * 4 + tap) * ins + i
                tl.store(dst, folded[m].to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _erf(z, FAST_RCP: tl.constexpr):
        # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 (far below a half-precision output's rounding): one
        # reciprocal and one exp2. libdevice's erf in the GEGLU epilogue, which the tensor cores wait for, cost
        # 15-25% of the kernel's time on an H200.
        a = tl.abs(z)
        d = 1.0 + 0.3275911 * a
        if FAST_RCP:
            t = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True, pack=1)
        else:  # Triton's interpreter runs no PTX
            t = 1.0 / d
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        r = 1.0 - poly * tl.math.exp2(-a * a * 1.4426950408889634)
        return tl.where(z < 0, -r, r)

    @triton.jit
    def _geglu_tile(
        tile, x_desc, w_desc, out_desc, b_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FAST_RCP: tl.constexpr,
    ):
        blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        if tile < blocks_m * blocks_n:
            # Tiles in groups of GROUP_M row blocks sweep the columns together, so x tiles stay in L2.
            in_group = GROUP_M * blocks_n
            first_m = (tile // in_group) * GROUP_M
            rows_in_group = tl.minimum(blocks_m - first_m, GROUP_M)
            om = (first_m + (tile % in_group) % rows_in_group) * BLOCK_M
            on = ((tile % in_group) // rows_in_group) * BLOCK_N
            acc_value = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for ok in range(0, K, BLOCK_K):
                x = x_desc.load([om, ok])
                acc_value = tl.dot(x, w_desc.load([on, ok]).T, acc_value)
                acc_gate = tl.dot(x, w_desc.load([N + on, ok]).T, acc_gate)
            rn = on + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            value = acc_value + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            gate = acc_gate + tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            out = value * (0.5 * gate * (1.0 + _erf(gate * 0.7071067811865476, FAST_RCP)))
            out_desc.store([om, on], out.to(out_desc.dtype))

    @triton.jit(do_not_specialize=["M", "K", "programs", "rounds"])
    def _geglu_kernel(
        x_desc, w_desc, out_desc, b_ptr, M, N, K, programs, rounds,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        INTERPRETER_ROUNDS: tl.constexpr, INTERPRETER_K: tl.constexpr,
    ):
        # Two accumulators per tile, the value half (weight rows n) and the gate half (rows N + n) of the
        # projection, so the `2N`-wide product never reaches memory: only `value * gelu(gate)` is stored.
        # Persistent programs, one per multiprocessor, take every `programs`-th tile in `rounds` rounds; tiles
        # are read and written through tensor descriptors (TMA on Hopper), which also clip the edge tiles. K
        # (the model width) and the counts of rows, programs and rounds are run-time values that Triton does
        # not specialise on, so the models' shapes share one compiled kernel. The interpreter takes only
        # constant loop bounds and runs no PTX: there INTERPRETER_ROUNDS and INTERPRETER_K are the counts (0
        # on GPUs).
        if INTERPRETER_ROUNDS:
            for i in range(0, INTERPRETER_ROUNDS):
                _geglu_tile(tl.program_id(0) + i * programs, x_desc, w_desc, out_desc, b_ptr, M, N,
                            INTERPRETER_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, False)
        else:
            for i in range(0, rounds):
                _geglu_tile(tl.program_id(0) + i * programs, x_desc, w_desc, out_desc, b_ptr, M, N,
                            K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, True)


# At or above this many elements `channel_sums` takes more programs of shorter steps (`_sum_launch`).
_SUM_LARGE_NUMEL = 2**27


def _sum_launch(clips: int, rows: int, channels: int, multiprocessors: int) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK_R, BLOCK_C, num_warps) of `channel_sums`: enough programs to keep every
    multiprocessor's loads in flight (a fixed 2048 rows per program left a base-model video's 40960 rows to
    200 programs on 132 multiprocessors, at a fifth of the bandwidth). Measured on an H200 over the three
    models' GroupNorm inputs: about four programs per multiprocessor of 64-row steps below
    `_SUM_LARGE_NUMEL` elements, eight of 32-row steps with 8 warps from there on (VSR's largest levels)."""
    block_c = min(64, triton.next_power_of_2(channels))
    large = clips * rows * channels >= _SUM_LARGE_NUMEL
    per_multiprocessor, block_r, warps = (8, 32, 8) if large else (4, 64, 4)
    wanted = max(1, per_multiprocessor * multiprocessors // (clips * triton.cdiv(channels, block_c)))
    return max(block_r, triton.next_power_of_2(triton.cdiv(rows, wanted))), block_r, block_c, warps


def _launch_channel_sums(x: torch.Tensor, partial: bool = False) -> torch.Tensor:
    x = x.contiguous()  # a view of a channels-last video already is
    clips, rows, channels = x.shape
    rows_per_program, block_r, block_c, warps = _sum_launch(clips, rows, channels, _multiprocessors(x.device))
    splits = triton.cdiv(rows, rows_per_program)
    # Per-split partial sums, added up by torch or `group_affine`: deterministic, unlike atomics.
    out = torch.empty((clips, splits, 2, channels), device=x.device, dtype=torch.float32)
    _run(_channel_sums_kernel, (splits, clips, triton.cdiv(channels, block_c)),
        x, out, rows, channels, rows_per_program,
        BLOCK_R=block_r, BLOCK_C=block_c, INTERPRETER_ROWS=0 if x.is_cuda else rows_per_program, num_warps=warps,
    )
    return out if partial else out.sum(1)


def _launch_group_affine(
    sums: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, rows: int, eps: float,
    offset: torch.Tensor | None, channel_offset: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    samples, splits, _, channels = sums.shape
    scale = torch.empty((samples, channels), device=sums.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    group = channels // groups
    group_pad = triton.next_power_of_2(group)
    # About 128 channels (whole groups) and 16 splits per step: 2048 values in flight on 4 warps.
    group_block = max(1, 128 // group_pad)
    _run(_group_affine_kernel, (samples, triton.cdiv(groups, group_block)),
        sums.contiguous(), scale if offset is None else offset.contiguous(),
        scale if channel_offset is None else channel_offset.contiguous(), weight.contiguous(), bias.contiguous(),
        scale, shift, rows, eps, channels, groups, group, splits,
        GROUP_BLOCK=group_block, GROUP_PAD=group_pad, SPLIT_BLOCK=16, OFFSET=offset is not None,
        CHANNEL_OFFSET=channel_offset is not None, INTERPRETER_SPLITS=0 if sums.is_cuda else splits, num_warps=4,
    )
    return scale, shift


def _launch_stream_biases(
    biases: Sequence[torch.Tensor], in_bias: torch.Tensor | None, out_bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    channels = biases[0].shape[0]
    device = biases[0].device
    offsets = torch.empty((4, channels), device=device, dtype=torch.float32)
    stream = torch.empty(channels, device=device, dtype=dtype)
    norm = torch.empty(channels, device=device, dtype=torch.float32) if out_bias is not None else None
    block = min(1024, triton.next_power_of_2(channels))
    _run(_stream_biases_kernel, (triton.cdiv(channels, block),),
        *(b.contiguous() for b in biases), offsets if in_bias is None else in_bias.contiguous(),
        offsets if out_bias is None else out_bias.contiguous(), offsets, stream, offsets if norm is None else norm,
        channels, HAS_IN=in_bias is not None, HAS_OUT=out_bias is not None, BLOCK=block, num_warps=4,
    )
    return offsets, stream, norm


def _row_tiles(channels: int, widest: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for the row-wise kernels: up to `widest` channels and 4096 elements per program."""
    block_c = min(widest, triton.next_power_of_2(channels))
    return max(1, 4096 // block_c), block_c


def _launch_scale_shift(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    # Input and output share one contiguous layout, so one set of offsets serves both.
    x = x.contiguous()
    clips, rows, channels = x.shape
    out = torch.empty_like(x) if out is None else out
    block_r, block_c = _row_tiles(channels, 128)
    _run(_scale_shift_kernel, (triton.cdiv(rows, block_r), clips, triton.cdiv(channels, block_c)),
        x, out, scale.float().contiguous(), shift.float().contiguous(), rows, channels,
        SILU=silu, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


def _launch_bias_add(
    x: torch.Tensor, bias: torch.Tensor, extra: torch.Tensor | None, residual: torch.Tensor | None
) -> None:
    rows, channels = x.shape
    block_r, block_c = _row_tiles(channels, 256)
    bias = bias.contiguous()
    _run(_bias_add_kernel, (triton.cdiv(rows, block_r), triton.cdiv(channels, block_c)),
        x, bias, bias if extra is None else extra.contiguous(), x if residual is None else residual, rows, channels,
        EXTRA=extra is not None, RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )


def _launch_concat_channels(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, b_samples: int, pixels: int) -> None:
    rows, ca = a.shape
    channels = ca + b.shape[1]
    block_r, block_c = _row_tiles(channels, 128)
    _run(_concat_channels_kernel, (triton.cdiv(rows, block_r), triton.cdiv(channels, block_c)),
        a, b, out, rows, pixels, b_samples, ca, b.shape[1], BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )


# Output pixels per `unfold_3x3` program (each one tap of them).
_UNFOLD_ROWS = 4


def _launch_unfold_3x3(x: torch.Tensor, out: torch.Tensor) -> None:
    n, c, h, w = x.shape
    rows = n * h * w
    block_c = min(512, triton.next_power_of_2(c))
    _run(_unfold_3x3_kernel, (triton.cdiv(rows, _UNFOLD_ROWS), 9, triton.cdiv(c, block_c)),
         x, out, rows, h, w, c, x.stride(0), x.stride(2), x.stride(3), BLOCK_R=_UNFOLD_ROWS, BLOCK_C=block_c)


def _launch_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, offset: torch.Tensor | None
) -> torch.Tensor:
    rows, channels = x.shape
    out = torch.empty((rows, channels), device=x.device, dtype=x.dtype)
    block_r, block_c, warps = _layer_norm_tiles(channels)
    _run(_layer_norm_kernel, (triton.cdiv(rows, block_r),),
        x, weight.contiguous(), bias.contiguous(), weight if offset is None else offset.contiguous(), out, rows,
        x.stride(0), eps, channels, OFFSET=offset is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out


def _launch_softmax_rows(scores: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    rows, columns = scores.shape
    out = torch.empty((rows, columns), device=scores.device, dtype=dtype)
    _run(_softmax_rows_kernel, (rows,), scores, out, columns, scale * 1.4426950408889634,
        BLOCK=min(4096, triton.next_power_of_2(columns)), INTERPRETER_COLUMNS=0 if scores.is_cuda else columns,
        num_warps=8,
    )
    return out


def _layer_norm_tiles(channels: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of `layer_norm`: whole rows, two per program from 512 channels on (padded),
    and a warp per 512. Fastest measured on an H200 (fp16, graph-replayed; 1-32 rows, 1-8 warps): 320
    channels 33.4 -> 29.6 us for 81,920 rows and 117.3 -> 101.7 us for 312,320, against 8 rows on 4 warps;
    640 and 1280 channels within 1-4% of that."""
    block_c = triton.next_power_of_2(channels)
    return max(2, 1024 // block_c), block_c, max(1, min(4, block_c // 512))


def _launch_upsample_phases(y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, height: int, width: int) -> None:
    rows, channels = out.shape
    block_r, block_c = _row_tiles(channels, 256)
    _run(_upsample_phases_kernel, (triton.cdiv(rows, block_r), triton.cdiv(channels, block_c)),
        y, out if bias is None else bias.contiguous(), out, rows, height, width, channels,
        BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where its channels are not adjacent (the kernels index rows by stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core dots round float32 inputs to tf32 unless told otherwise: exact for float32."""
    return "ieee" if dtype == torch.float32 else "tf32"


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, programs per multiprocessor), fastest first:
# 128 x 128 tiles of both halves measured fastest on an H200 at the interpolation and VSR models' feed-forward
# shapes. GPUs with less shared memory per block (consumer Ada and Blackwell: 99 KiB) take the next one that
# fits.
_GEGLU_CONFIGS = ((128, 128, 64, 8, 8, 3, 1), (128, 64, 64, 8, 4, 2, 1), (64, 64, 32, 8, 4, 2, 1))
# Smaller products (all of the base model's, m n k = 3.4e10, and the interpolation model's deepest level) run
# two programs of 128 x 64 tiles per multiprocessor, so that one's epilogue overlaps the other's products. On
# an H200 (CUDA graphs of 20 calls) they took 0.81-0.90x the time of the first configuration above at the
# four base shapes (0.333 -> 0.301 ms at level 0) and 0.91x at the interpolation's deepest, but 1.01-1.06x at
# the interpolation's three larger shapes (m n k = 1.3e11).
_GEGLU_SMALL_CONFIGS = ((128, 64, 64, 8, 4, 3, 2), *_GEGLU_CONFIGS)
_GEGLU_SMALL_MNK = 2**36
_FITTING: dict[tuple, int] = {}


def _geglu_configs(m: int, n: int, k: int) -> tuple[tuple[int, ...], ...]:
    """The configurations, fastest first, for an `m x k` input and an `n`-wide output."""
    return _GEGLU_SMALL_CONFIGS if m * n * k <= _GEGLU_SMALL_MNK else _GEGLU_CONFIGS


def _launch_fitting(key: tuple, configs: tuple[tuple[int, ...], ...], launch) -> torch.Tensor:
    """`launch(config)` with the first of `configs` (fastest first) that fits the GPU's shared memory and
    registers, remembered per `key` and list of configurations (Triton raises before anything runs, so a CUDA
    graph capture survives)."""
    remembered = (key, configs)
    for i in range(_FITTING.get(remembered, 0), len(configs)):
        try:
            out = launch(configs[i])
        except triton.runtime.errors.OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _FITTING[remembered] = i
        return out
    raise ValueError("no configuration to launch")


def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors, which launches size their programs by (GEGLU's persistent programs, the
    channel sums' splits); 2 under Triton's interpreter, so persistent programs walk several tiles there too."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _whole_rows(t: torch.Tensor) -> bool:
    """t's rows of channels are whole 16 bytes, as tensor descriptors read them."""
    return t.shape[-1] * t.element_size() % 16 == 0


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy, with the 16-byte aligned start and row stride that tensor descriptors need."""
    aligned = t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _launch_geglu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config: tuple[int, ...] | None = None
) -> torch.Tensor:
    rows, weight = _tma_operand(x.reshape(-1, x.shape[-1])), _tma_operand(weight)
    (m, k), n = rows.shape, weight.shape[0] // 2
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out.view(*x.shape[:-1], n)

    def launch(cfg: tuple[int, ...]) -> torch.Tensor:
        block_m, block_n, block_k, group_m, warps, stages, per_multiprocessor = cfg
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        programs = min(tiles, per_multiprocessor * _multiprocessors(x.device))
        rounds = triton.cdiv(tiles, programs)
        _run(_geglu_kernel, (programs,),
            TensorDescriptor.from_tensor(rows, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
            TensorDescriptor.from_tensor(out, [block_m, block_n]), bias.contiguous(), m, n, k, programs, rounds,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            INTERPRETER_ROUNDS=0 if x.is_cuda else rounds, INTERPRETER_K=0 if x.is_cuda else k,
            num_warps=warps, num_stages=stages,
        )
        return out

    configs = _geglu_configs(m, n, k) if config is None else (config,)
    return _launch_fitting(("geglu", x.device, k), configs, launch).view(*x.shape[:-1], n)


def _split_head_dim(head_dim: int) -> tuple[int, int]:
    """(D0, D1): a power of two of at least 16 and a second one (0: none) that together cover the head."""
    if head_dim <= 16:
        return 16, 0
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return d0, 0 if rest == 0 else max(16, triton.next_power_of_2(rest))


def _key_frame_config(head_dim: int, tma: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), the fastest measured on an H200 at the interpolation model's
    heads of 40, 80 and 160 channels (2560, 640 and 160 tokens a frame): of 40-60 with tensor descriptors, of
    nine with pointer loads."""
    if tma:
        if head_dim <= 64:
            return 128, 128, 4, 3
        return (64, 64, 4, 2) if head_dim <= 128 else (64, 32, 4, 2)
    if head_dim <= 64:
        return 128, 64, 8, 3
    return (128, 64, 4, 3) if head_dim <= 128 else (64, 32, 4, 3)


def _key_frame_launch(
    tokens: int, key_tokens: int, keys: int, heads: int, head_dim: int, dtype: torch.dtype, tma: bool
) -> tuple[dict, dict]:
    """The key-frame kernel's compile-time constants and its launch options (warps, stages) for one call;
    `tma` asks for tensor descriptors, which it gets where its blocks tile a frame's keys exactly (TMA: False
    otherwise)."""
    d0, d1 = _split_head_dim(head_dim)
    block_m, block_n, warps, stages = _key_frame_config(head_dim, tma)
    # Partial key blocks are masked, which only pointer loads do right: with descriptors, Triton 3.6 compiled
    # them into kernels that gave wrong results or faulted on an H200.
    tma = tma and key_tokens % block_n == 0 and key_tokens >= 2 * block_n
    if not tma:
        block_m, block_n, warps, stages = _key_frame_config(head_dim, False)
        block_n = min(block_n, max(16, triton.next_power_of_2(key_tokens)))
    block_m = min(block_m, max(16, triton.next_power_of_2(tokens)))
    constants = dict(
        KEY_TOKENS=key_tokens, LOOP_END=max(key_tokens, 2 * block_n), KEYS=keys, HEADS=heads, HEAD_DIM=head_dim,
        D0=d0, D1=d1, ROW_SUM=d0 + d1 > head_dim > d0, BLOCK_M=block_m, BLOCK_N=block_n, TMA=tma,
        PRECISION=_dot_precision(dtype),
    )
    return constants, dict(num_warps=warps, num_stages=stages)


def _launch_key_frame_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int, key_frames: torch.Tensor
) -> torch.Tensor:
    rows, tokens, channels = q.shape
    head_dim = channels // heads
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    # Descriptor coordinates are 32-bit.
    tma = TensorDescriptor is not None and _whole_rows(k) and k.shape[0] * k.shape[1] < 2**31
    constants, options = _key_frame_launch(tokens, k.shape[1], key_frames.shape[1], heads, head_dim, v.dtype, tma)
    descriptors = [None] * 4
    if constants["TMA"]:
        k_rows, v_rows = (_tma_operand(t.reshape(-1, channels)) for t in (k, v))
        # Without a D1 part its descriptors are never read: any valid block shape serves.
        widths = (constants["D0"], constants["D1"] or constants["D0"])
        descriptors = [TensorDescriptor.from_tensor(t, [constants["BLOCK_N"], w]) for t in (k_rows, v_rows) for w in widths]
    out = torch.empty(q.shape, device=q.device, dtype=v.dtype)
    _run(_key_frame_attention_kernel, (triton.cdiv(tokens, constants["BLOCK_M"]), rows * heads),
        q, k, v, *descriptors, out, key_frames.to(device=q.device, dtype=torch.int64).contiguous(), frames, tokens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        head_dim**-0.5 * 1.4426950408889634, **constants, **options,
    )
    return out


def _short_key_launch(tokens: int, keys: int, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """The short-key kernel's compile-time constants and launch options for `tokens` queries a sample.

    Blocks of 64 queries on four warps, four rounds a program (two below 2048 queries: more programs for
    the GPU's multiprocessors) and three pipeline stages from 8192 queries on heads of up to 128 channels:
    the fastest measured on an H200 over the three models' text attention (base, interpolation and VSR
    levels, 77 keys), of eighteen. Heads of 160 took 28% longer with three stages (base model, 2560 queries).
    """
    d0, d1 = _split_head_dim(head_dim)
    n0, n1 = _split_head_dim(keys)
    constants = dict(
        HEADS=heads, HEAD_DIM=head_dim, D0=d0, D1=d1, N0=n0, N1=n1, BLOCK_M=64, ROUNDS=4 if tokens >= 2048 else 2,
        PRECISION=_dot_precision(dtype),
    )
    return constants, dict(num_warps=4, num_stages=3 if tokens >= 8192 and head_dim <= 128 else 2)


def _launch_short_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    samples, tokens, channels = q.shape
    head_dim = channels // heads
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    constants, options = _short_key_launch(tokens, k.shape[1], heads, head_dim, v.dtype)
    out = torch.empty(q.shape, device=q.device, dtype=v.dtype)
    grid = (triton.cdiv(tokens, constants["BLOCK_M"] * constants["ROUNDS"]), samples * heads)
    _run(_short_key_attention_kernel, grid,
        q, k, v, out, tokens, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), head_dim**-0.5 * 1.4426950408889634, **constants, **options,
    )
    return out


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
    cos: torch.Tensor | None, sin: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    clips, frames, tokens, channels = q.shape
    head_dim = channels // heads
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    out = torch.empty(q.shape, device=q.device, dtype=v.dtype)
    rotary_dim = 0 if cos is None else cos.shape[1]
    constants, options = _temporal_launch(frames, head_dim, rotary_dim, bias is not None, v.dtype, heads)
    dummy = q.new_empty(0, dtype=torch.float32)
    _run(_temporal_attention_kernel, (clips * tokens, heads // constants["HEADS_PER_PROGRAM"]),
        q, k, v, out,
        dummy if cos is None else cos, dummy if sin is None else sin, dummy if bias is None else bias,
        tokens, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *(bias.stride() if bias is not None else (0, 0, 0)), head_dim**-0.5, **constants, **options,
    )
    return out


def _temporal_launch(
    frames: int, head_dim: int, rotary_dim: int, has_bias: bool, dtype: torch.dtype, heads: int = 1
) -> tuple[dict, dict]:
    """The temporal attention kernel's compile-time constants and its launch options (warps) for one call."""
    # Tensor-core dots need at least 16 rows, columns and depth: padding is masked, never read or written.
    frames_pad = max(16, triton.next_power_of_2(frames))
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    batched = frames_pad <= BATCHED_MAX_FRAMES
    if batched:
        per_program, warps = _temporal_batch(heads, frames_pad, head_dim_pad)
    else:
        per_program = math.gcd(heads, _temporal_heads_per_program(head_dim_pad))
        warps = _temporal_warps(frames_pad, head_dim_pad)
    constants = dict(
        FRAMES=frames, FRAMES_PAD=frames_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, ROTARY_DIM=rotary_dim,
        HAS_BIAS=has_bias, HEADS_PER_PROGRAM=per_program, BATCHED=batched, PRECISION=_dot_precision(dtype),
    )
    return constants, dict(num_warps=warps)


# Clips of up to this many frames (the base model's 16, the VSR's chunks of 8) take all of a program's heads at
# once, as the batch of 3-D dots; longer ones (the interpolation model's 61) one head after another.
BATCHED_MAX_FRAMES = 16
# Elements of one `h f d` tile (q, k or v) in a batched program, and its warps: measured fastest on an H200
# (fp16, CUDA graphs, 1 to 16 pixels of 1 to 8 heads a program) at the base and VSR models' widths. Heads of 40
# or 64 channels (padded to 64): 8 heads, 4 warps, base top level 118.8 -> 88.6 us and VSR 160x256 level 1240
# -> 916 us against one head after another; 80 or 128: 4 heads, 2 warps (58.4 -> 47.1 us, 150.9 -> 131.6);
# 160: 2 heads, 2 warps (44.4 -> 31.0 us). Longer clips, batched, ran slower (61 frames: 0.97x to 0.02x, spilling).
_TEMPORAL_BATCH_ELEMENTS = 8192


def _temporal_batch(heads: int, frames_pad: int, head_dim_pad: int) -> tuple[int, int]:
    """(heads per program, warps) for a batched temporal attention program: the heads a divisor of `heads`."""
    target = max(1, _TEMPORAL_BATCH_ELEMENTS // (frames_pad * head_dim_pad))
    per_program = math.gcd(heads, target)
    warps = 4 if head_dim_pad <= 64 else 2
    return per_program, max(1, warps * per_program // target)


def _temporal_heads_per_program(head_dim_pad: int) -> int:
    """How many neighbouring heads of a pixel one program takes in turn (the launch uses the largest divisor
    of the head count up to it), where clips are too long to batch them: their channels share cache lines,
    which one program then reads whole. Fastest measured on an H200 (fp16, CUDA graphs, 1, 2, 4 or 8 heads):
    heads of 40 or 64 channels, 4, 506 -> 328 us at the interpolation model's top level; 80-wide heads 2
    (interpolation 140 -> 125 us); 160-wide heads 1 (2 was 1.1-1.7x slower)."""
    if head_dim_pad <= 64:
        return 4
    return 2 if head_dim_pad <= 128 else 1


def _temporal_warps(frames_pad: int, head_dim_pad: int) -> int:
    """Warps per program, one head after another: measured on an H200 at the three models' widths (heads of
    40 to 160 channels): one warp up to 32 frames, two for 160-wide heads (padded to 256: one warp spills
    registers, 1.3-1.4x slower), four at 64 frames (one warp was up to 12x slower there)."""
    if frames_pad >= 64:
        return 4
    return 2 if head_dim_pad >= 256 else 1


# What each kernel allocates: its output. Custom ops' fake kernels for torch.compile, and the result on meta
# tensors (`meta_as_cuda`).
def _attention_shape(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, device=q.device, dtype=v.dtype)


def _channel_sums_shape(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], 2, x.shape[2]), dtype=torch.float32)


def _scale_shift_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _geglu_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


if _CUSTOM_OPS:

    @torch.library.custom_op("lavie::temporal_attention", mutates_args=())
    def _temporal_attention_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
        cos: torch.Tensor | None, sin: torch.Tensor | None, bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return _launch(q, k, v, heads, cos, sin, bias)

    @_temporal_attention_op.register_fake
    def _(q, k, v, heads, cos, sin, bias):
        return _attention_shape(q, v)


    @torch.library.custom_op("lavie::key_frame_attention", mutates_args=())
    def _key_frame_attention_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int, key_frames: torch.Tensor
    ) -> torch.Tensor:
        return _launch_key_frame_attention(q, k, v, heads, frames, key_frames)

    @_key_frame_attention_op.register_fake
    def _(q, k, v, heads, frames, key_frames):
        return _attention_shape(q, v)


    @torch.library.custom_op("lavie::short_key_attention", mutates_args=())
    def _short_key_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        return _launch_short_key_attention(q, k, v, heads)

    @_short_key_attention_op.register_fake
    def _(q, k, v, heads):
        return _attention_shape(q, v)

    @torch.library.custom_op("lavie::channel_sums", mutates_args=())
    def _channel_sums_op(x: torch.Tensor) -> torch.Tensor:
        return _launch_channel_sums(x)

    @_channel_sums_op.register_fake
    def _(x):
        return _channel_sums_shape(x)

    @torch.library.custom_op("lavie::scale_shift", mutates_args=())
    def _scale_shift_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
        return _launch_scale_shift(x, scale, shift, silu)

    @_scale_shift_op.register_fake
    def _(x, scale, shift, silu):
        return _scale_shift_shape(x)

    @torch.library.custom_op("lavie::geglu", mutates_args=())
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _launch_geglu(x, weight, bias)

    @_geglu_op.register_fake
    def _(x, weight, bias):
        return _geglu_shape(x, weight)

    # FLOPs for torch's FlopCounterMode (bench/speed.py counts a call's FLOPs with it), as SDPA's are counted:
    # two matmuls of `queries x keys x head_dim` per head.
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.lavie.key_frame_attention)
    def _(q_shape, k_shape, v_shape, heads, frames, key_frames_shape, *_, **__) -> int:
        rows, tokens, channels = q_shape
        return 4 * rows * tokens * key_frames_shape[1] * k_shape[1] * channels

    @register_flop_formula(torch.ops.lavie.short_key_attention)
    def _(q_shape, k_shape, *_, **__) -> int:
        samples, tokens, channels = q_shape
        return 4 * samples * tokens * k_shape[1] * channels

    @register_flop_formula(torch.ops.lavie.temporal_attention)
    def _(q_shape, *_, **__) -> int:
        frames, channels = q_shape[1], q_shape[-1]
        pixels = q_shape[0] * (q_shape[2] if len(q_shape) == 4 else 1)
        return 4 * pixels * frames * frames * channels


def _require_kernels(name: str) -> None:
    if triton is None or not _CUSTOM_OPS:
        raise RuntimeError(f"fused.{name} needs Triton and torch >= 2.4; check fused.kernels_usable() first")


def _check_rows(name: str, x: torch.Tensor, *per_channel: torch.Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} takes `b n c` rows, got {x.ndim} dimensions")
    for t in per_channel:
        if tuple(t.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"{name}: per-channel values must be shaped {(x.shape[0], x.shape[2])}, got {tuple(t.shape)}")
    if not x.is_meta:
        _require_kernels(name)


def channel_sums(x: torch.Tensor, *, partial: bool = False) -> torch.Tensor:
    """Per-channel sum and sum of squares over the rows of `b n c`, in float32: `b 2 c`.

    GroupNorm statistics from one read of a half-precision video, without a float32 copy; a group's
    statistics are then sums over its channels.

    partial: the kernel's per-program partial sums `b s 2 c` instead (their sum over s is the result), which
    `group_affine` adds up itself: the sum is then no kernel of its own. Outside `torch.compile` only.
    """
    _check_rows("channel_sums", x)
    if x.is_meta:
        # The result's shape, and the copy the kernel makes of rows not in memory order: a trace counts it.
        sums = _channel_sums_shape(x.contiguous())
        return sums.unsqueeze(1) if partial else sums
    if partial:
        return _launch_channel_sums(x, partial=True)
    return _channel_sums_op(x) if _through_op() else _launch_channel_sums(x)


def group_affine(
    sums: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, rows: int, eps: float,
    *, offset: torch.Tensor | None = None, channel_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm's float32 `b c` scale and shift from `channel_sums` of `rows` rows per sample (`b 2 c`, or
    its partial sums `b s 2 c`), in one kernel: `x * scale + shift` normalises x with its groups' statistics
    and applies weight and bias.

    offset: `b c`, and channel_offset: `c`, statistics of `x + offset + channel_offset` (the sums are of x),
    and a shift that applies to x. Torch's arithmetic for this is about fifteen kernels of a few
    microseconds each, per GroupNorm.
    """
    parts = sums if sums.ndim == 4 else sums.unsqueeze(1)
    if parts.ndim != 4 or parts.shape[2] != 2 or parts.shape[3] % groups:
        raise ValueError(
            f"group_affine takes `b 2 c` sums or `b s 2 c` partial sums with c a multiple of {groups} groups, "
            f"got {tuple(sums.shape)}"
        )
    samples, channels = parts.shape[0], parts.shape[3]
    for name, t, shape in (("weight", weight, (channels,)), ("bias", bias, (channels,)), ("offset", offset, (samples, channels)),
                           ("channel_offset", channel_offset, (channels,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"group_affine: {name} must be shaped {shape}, got {tuple(t.shape)}")
    if sums.is_meta:
        return tuple(torch.empty((samples, channels), device=sums.device, dtype=torch.float32) for _ in range(2))
    _require_kernels("group_affine")
    return _launch_group_affine(parts, weight, bias, groups, rows, eps, offset, channel_offset)


def stream_biases(
    biases: Sequence[torch.Tensor], in_bias: torch.Tensor | None, out_bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The bias arithmetic of a transformer block run as one residual stream (`blocks.SpatialTransformer`),
    in one kernel instead of about nine of torch's per transformer (casts, stack, cumsum, subtractions, sum,
    negation).

    biases: the four residual branches' output biases, `c` each, in the order they are added. Returns float32
    `4 c` offsets, row k being -(biases[k] + ... + biases[3]) (what branch k's norm takes off); the stream's
    starting bias `in_bias + sum(biases)` in `dtype`; and, given `out_bias`, float32 `-out_bias` (None
    otherwise). Sums in float32.
    """
    if len(biases) != 4:
        raise ValueError(f"stream_biases takes the 4 residual branches' biases, got {len(biases)}")
    channels = biases[0].shape[0]
    for t in (*biases, in_bias, out_bias):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"stream_biases: every bias must be shaped ({channels},), got {tuple(t.shape)}")
    if biases[0].is_meta:
        f32 = dict(device=biases[0].device, dtype=torch.float32)
        return (torch.empty(4, channels, **f32), torch.empty(channels, device=biases[0].device, dtype=dtype),
                None if out_bias is None else torch.empty(channels, **f32))
    _require_kernels("stream_biases")
    return _launch_stream_biases(biases, in_bias, out_bias, dtype)


def scale_shift(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, silu: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`x * scale + shift` per clip and channel (float32 `b c`), then SiLU if asked: GroupNorm's second pass.

    x: `b n c`; the result is `b n c`, contiguous, in x's dtype; the arithmetic is float32. `out`: x itself, to
    write the result over it (each element is read before it is written); outside `torch.compile` only,
    where a new tensor is returned instead.
    """
    _check_rows("scale_shift", x, scale, shift)
    if out is not None and (out is not x or not x.is_contiguous()):
        raise ValueError("scale_shift writes over x only: out must be x, contiguous")
    if x.is_meta:
        return x if out is not None else _scale_shift_shape(x.contiguous())
    if _through_op():
        return _scale_shift_op(x, scale, shift, silu)
    return _launch_scale_shift(x, scale, shift, silu, out)


def channels_last_rows(x: torch.Tensor) -> torch.Tensor | None:
    """`x` (`n c ...`, channels dim 1) as the rows `(n ...) c` it is stored as, a view; None where it is not
    stored channels-last and dense."""
    rows = x.movedim(1, -1)
    return rows.view(-1, x.shape[1]) if rows.is_contiguous() else None


def _same_rows(x: torch.Tensor, other: torch.Tensor | None) -> bool:
    return other is None or (other.shape == x.shape and channels_last_rows(other) is not None)


def bias_add_fits(x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether `bias_add_` takes x and residual: both channels-last and dense, of one shape."""
    return channels_last_rows(x) is not None and _same_rows(x, residual)


def bias_add_(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None, *, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """`x += bias` per channel (dim 1), then `+= residual`, in place, in one pass; returns x. `extra`: a
    second `c` bias added with the first (the next layer's, folded), at no cost.

    For a convolution's output, which cuDNN writes without its bias: torch then adds the bias to a
    channels-last tensor with its broadcasting kernel, at under a third of the card's bandwidth (H200). x and
    residual are `n c ...`, stored channels-last and dense (`channels_last_rows`); the sum is float32,
    rounded once.
    """
    rows = channels_last_rows(x)
    for name, t in (("bias", bias), ("extra bias", extra)):
        if rows is None or t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"bias_add_ takes a channels-last x and a ({x.shape[1]},) {name}, got {tuple(t.shape)}")
    if not _same_rows(x, residual):
        raise ValueError(f"bias_add_: the residual must be a channels-last {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not x.is_meta:
        _require_kernels("bias_add_")
        _launch_bias_add(rows, bias, extra, None if residual is None else channels_last_rows(residual))
    return x


def concat_channels_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `concat_channels` takes a and b."""
    return (
        channels_last_rows(a) is not None and channels_last_rows(b) is not None and a.shape[2:] == b.shape[2:]
        and a.shape[0] % b.shape[0] == 0 and a.dtype == b.dtype
    )


def concat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.cat([a, torch.cat([b] * n)], dim=1)` with n = a's batch / b's, written channels-last in one pass
    (a UNet's skip connection, whose batch the guidance halves may share).

    a: `B ca ...`, b: `Bb cb ...` with the same trailing sizes and B a multiple of Bb, both stored
    channels-last and dense. torch's concatenation of channels-last tensors along the channels copies each
    part with its strided kernel, and the repeated skip is a copy of its own.
    """
    if not concat_channels_fits(a, b):
        raise ValueError(
            f"concat_channels takes channels-last tensors of one dtype, trailing sizes and a batch that is a "
            f"multiple of the second's, got {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}"
        )
    rows_a, rows_b = channels_last_rows(a), channels_last_rows(b)
    rows = torch.empty((rows_a.shape[0], a.shape[1] + b.shape[1]), dtype=a.dtype, device=a.device)
    if not a.is_meta:
        _require_kernels("concat_channels")
        _launch_concat_channels(rows_a, rows_b, rows, b.shape[0], rows_a.shape[0] // a.shape[0])
    return rows.view(*a.movedim(1, -1).shape[:-1], -1).movedim(-1, 1)


def unfold_3x3(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 windows (zero padding 1) of a channels-last `n c h w` tensor as `(n h w) (3 3 c)` rows, taps in
    row-major order: with a 3x3 convolution's weight as `o (3 3 c)` rows, the convolution is one matmul."""
    if x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"unfold_3x3: takes a channels-last `n c h w` tensor, got shape {tuple(x.shape)}, strides {x.stride()}")
    n, c, h, w = x.shape
    out = torch.empty(n * h * w, 9 * c, device=x.device, dtype=x.dtype)
    if x.is_meta:
        return out
    _require_kernels("unfold_3x3")
    _launch_unfold_3x3(x, out)
    return out


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """LayerNorm over the last dimension with float32 statistics, one read and one write of x; the result is
    contiguous, in x's dtype.

    torch's kernel moves a half-precision video at 0.8-1.7 TB/s at the models' widths (320-1024 channels),
    this one at 3.0-4.1 on an H200 (`655360 x 512`: 1.11 -> 0.33 ms).

    offset: `c`, normalise `x + offset` (added in float32) without that sum being written.
    """
    c = x.shape[-1]
    if tuple(weight.shape) != (c,) or tuple(bias.shape) != (c,):
        raise ValueError(f"layer_norm: weight and bias must be shaped ({c},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if offset is not None and tuple(offset.shape) != (c,):
        raise ValueError(f"layer_norm: the offset must be shaped ({c},), got {tuple(offset.shape)}")
    rows = _unit_stride(x.reshape(-1, c))
    if x.is_meta:
        return torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _require_kernels("layer_norm")
    return _launch_layer_norm(rows, weight, bias, eps, offset).view(x.shape)


def softmax_rows(scores: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`softmax(scores * scale)` over each row of float32 `rows x columns` scores, written in `dtype`: two reads
    of the scores and one write, where torch's scale, softmax and cast take three passes that each read and
    write (`vae.product_attention`, whose rows hold a 320x512 latent's 163,840 scores)."""
    if scores.ndim != 2 or scores.dtype != torch.float32:
        raise ValueError(f"softmax_rows: takes float32 `rows x columns` scores, got {scores.dtype} {tuple(scores.shape)}")
    if scores.is_meta:
        return torch.empty(scores.shape, device=scores.device, dtype=dtype)
    _require_kernels("softmax_rows")
    return _launch_softmax_rows(scores.contiguous(), scale, dtype)


def upsample_phases_fits(y: torch.Tensor) -> bool:
    """Whether `upsample_phases` takes y: four phases' channels, stored channels-last and dense."""
    return y.ndim == 4 and y.shape[1] % 4 == 0 and channels_last_rows(y) is not None


def upsample_phases(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 2x upsampled image `n o 2h 2w` (channels-last) whose pixel (2i + p, 2j + q) is y's phase 2p + q at
    (i + p, j + q), plus `bias` (o,): `blocks.upsample_conv`'s output from its phase convolution
    `n 4o (h+1) (w+1)`.

    torch writes this interleaving through a strided view with its generic kernel, at about a fifth of an
    H200's bandwidth (VSR's largest, `8 x 512 x 320 x 512`: 3.5 ms); here every pixel is one contiguous
    run of channels read and written.
    """
    if not upsample_phases_fits(y):
        raise ValueError(f"upsample_phases takes a channels-last `n 4o h w` y, got {tuple(y.shape)}")
    n, o4, h1, w1 = y.shape
    o = o4 // 4
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"upsample_phases: the bias must be shaped ({o},), got {tuple(bias.shape)}")
    h, w = h1 - 1, w1 - 1
    out = torch.empty(n, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    if not y.is_meta:
        _require_kernels("upsample_phases")
        _launch_upsample_phases(channels_last_rows(y), bias, channels_last_rows(out), h, w)
    return out


def upsample_weight(weight: torch.Tensor) -> torch.Tensor:
    """`blocks.upsample_conv_weight` in one pass: a 3x3 kernel `o i 3 3` as the 2x2 kernels `(p q o) i 2 2` of
    the four output phases, channels-last, each folded tap a float32 sum rounded once.

    Folded at every call (a CUDA graph replays it, so weights patched in place are seen), torch's route, a
    matmul of nine-long rows and a copy into this layout, took 0.16 ms for a 1280-channel kernel on an H200;
    this takes 0.024.
    """
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"upsample_weight takes a 3x3 kernel `o i 3 3`, got {tuple(weight.shape)}")
    o, i = weight.shape[:2]
    out = torch.empty((4 * o, 2, 2, i), device=weight.device, dtype=weight.dtype).permute(0, 3, 1, 2)
    if not weight.is_meta and out.numel():
        _require_kernels("upsample_weight")
        block_i = min(256, triton.next_power_of_2(i))
        _run(_upsample_weight_kernel, (o, triton.cdiv(i, block_i)),
            weight, out, o, i, *weight.stride(), BLOCK_I=block_i, num_warps=4,
        )
    return out


def _descriptor_widths(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """k and n of a `2n k` weight are multiples of 8: the tensor descriptors' rows are whole 16 bytes."""
    return x.shape[-1] % 8 == 0 and weight.shape[0] % 16 == 0


def geglu_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `geglu` takes an input of x's width and a `2n k` weight (`_descriptor_widths`), with a Triton
    that has tensor descriptors (3.3 on)."""
    return TensorDescriptor is not None and _descriptor_widths(x, weight)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`value * gelu(gate)` where `value, gate = (x @ weight.T + bias).chunk(2, -1)`: a GEGLU projection as one
    kernel that never writes the `2n`-wide product (erf GELU to 1.5e-7, float32 accumulation and epilogue).

    x: `... k` in float16 or bfloat16; weight `2n k` and bias `2n` in x's dtype; the result is `... n`;
    k and n multiples of 8 (`geglu_fits`).
    """
    if weight.ndim != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"geglu: weight must be shaped (2n, {x.shape[-1]}), got {tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"geglu: bias must be shaped ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(
            f"geglu takes float16 or bfloat16 x, weight and bias of one dtype, got {x.dtype}, {weight.dtype}, {bias.dtype}"
        )
    if not _descriptor_widths(x, weight):
        raise ValueError(f"geglu: the width k and n (weight (2n, k)) must be multiples of 8, got {tuple(weight.shape)}")
    if x.is_meta:
        return _geglu_shape(x, weight)
    _require_kernels("geglu")
    if TensorDescriptor is None:
        raise RuntimeError("fused.geglu needs Triton >= 3.3 (tensor descriptors); check fused.geglu_fits() first")
    return (_geglu_op if _through_op() else _launch_geglu)(x, weight, bias)


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
    (interleaved pairs). `bias`: `h f f` added to the scores, of any float dtype and strides (read in place,
    summed in float32).
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
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"bias must be floating point, got {bias.dtype}")
    if q.is_meta:
        return _attention_shape(q, v)
    _require_kernels("temporal_attention")
    run = _temporal_attention_op if _through_op() else _launch
    if q.ndim == 3:
        return run(*(t.unsqueeze(2) for t in (q, k, v)), heads, cos, sin, bias).squeeze(2)
    return run(q, k, v, heads, cos, sin, bias)



def _check_attention_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, queries: str, keys: str, rows: str
) -> None:
    """q laid out as `queries` and k, v as `keys`, three dimensions each, of the same `rows` and channels, and
    channels that split into `heads`."""
    if q.ndim != 3 or k.shape != v.shape or k.ndim != 3 or (q.shape[0], q.shape[2]) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"q must be `{queries}` and k, v `{keys}` of the same {rows} and channels, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % heads:
        raise ValueError(f"{q.shape[2]} channels do not split into {heads} heads")


def short_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention, scale d^-0.5, of many queries to a few keys: `b n (h d)` queries, `b m (h d)` keys
    and values with m <= `SHORT_KEYS_MAX` (cross-attention to a text's 77 tokens). The output has q's shape.
    """
    _check_attention_shapes(q, k, v, heads, "b n c", "b m c", "samples")
    if not 0 < k.shape[1] <= SHORT_KEYS_MAX:
        raise ValueError(f"short_key_attention takes 1 to {SHORT_KEYS_MAX} keys, got {k.shape[1]}")
    if q.is_meta:
        return _attention_shape(q, v)
    _require_kernels("short_key_attention")
    return (_short_key_attention_op if _through_op() else _launch_short_key_attention)(q, k, v, heads)


def key_frame_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int, key_frames: torch.Tensor
) -> torch.Tensor:
    """Softmax attention, scale d^-0.5, of each frame's tokens to the tokens of chosen frames of its clip.

    q: `(b f) l (h d)`; k, v: `(b f) m (h d)`; key_frames: integers `f s`, the s frames that frame i attends
    to (their tokens in that order, as if concatenated: `s m` keys). The output has q's shape. Sparse causal
    attention is `key_frames[i] = (0, max(i - 1, 0))`.
    """
    _check_attention_shapes(q, k, v, heads, "(b f) l c", "(b f) m c", "rows")
    if q.shape[0] % frames:
        raise ValueError(f"{q.shape[0]} rows are not clips of {frames} frames")
    if key_frames.ndim != 2 or key_frames.shape[0] != frames or key_frames.dtype.is_floating_point:
        raise ValueError(f"key_frames must be integers shaped ({frames}, s), got {key_frames.dtype} {tuple(key_frames.shape)}")
    if q.is_meta:
        return _attention_shape(q, v)
    _require_kernels("key_frame_attention")
    run = _key_frame_attention_op if _through_op() else _launch_key_frame_attention
    return run(q, k, v, heads, frames, key_frames)
