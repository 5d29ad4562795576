"""The fused kernels (lavie_core/fused.py: temporal and key-frame attention, GroupNorm's two passes, GEGLU,
bias add, LayerNorm, channel concatenation) and the SDPA temporal path against the plain torch computations
they replace on CUDA.

On the CPU the Triton kernels run in Triton's interpreter, in a subprocess because the interpreter is
chosen when a kernel is defined.
"""
import collections
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from einops import rearrange

from fused_cases import (
    ALL_CASES, BIAS_CASES, GEGLU_CASES, GROUP_AFFINE_CASES, LAYER_NORM_CASES, NORM_CASES, SOFTMAX_CASES,
    STREAM_BIAS_CASES, UNFOLD_CASES, UPSAMPLE_WEIGHT_CASES, case_error,
)
from lavie_core import LaVieUNet, UNetConfig, blocks, fused

ROOT = Path(__file__).resolve().parents[1]
# The kernels serve half types without gradients; float32 and trainable weights take the torch paths.
HALF_TYPE_DISPATCH = [
    pytest.param(torch.float16, False, True, id="fp16"),
    pytest.param(torch.bfloat16, False, True, id="bf16"),
    pytest.param(torch.float32, False, False, id="fp32-torch-path"),
    pytest.param(torch.float16, True, False, id="trainable-torch-path"),
]
triton_missing = fused.triton is None
on_cuda = pytest.mark.skipif(triton_missing or not torch.cuda.is_available(), reason="needs CUDA and triton")


@pytest.fixture(scope="module")
def interpreted_errors():
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fused_cases.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["case"]: r["max_error"] for r in map(json.loads, run.stdout.splitlines())}


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize("case", ALL_CASES)
def test_interpreted_kernels_match_torch(interpreted_errors, case):
    # GEGLU takes half types only: its error is the output's rounding (half an fp16 step is 4.9e-4).
    assert interpreted_errors[case] < (1e-3 if case in GEGLU_CASES else 1e-5)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("case", ALL_CASES)
def test_cuda_kernels_match_torch(case):
    if case in GEGLU_CASES:  # relative to the magnitude, half types only
        assert case_error(case, "cuda", torch.float16) < 1e-3
        assert case_error(case, "cuda", torch.bfloat16) < 8e-3
        return
    assert case_error(case, "cuda") < 1e-5
    # The norms', the bias add's, the weight fold's and the small convolutions' errors are relative to the
    # magnitude; attention's is absolute on outputs of order 1.
    relative = any(
        case in cases
        for cases in (NORM_CASES, BIAS_CASES, LAYER_NORM_CASES, GROUP_AFFINE_CASES, UPSAMPLE_WEIGHT_CASES, STREAM_BIAS_CASES,
                      SOFTMAX_CASES, UNFOLD_CASES)
    )
    assert case_error(case, "cuda", torch.float16) < (1e-3 if relative else 2e-2)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("kind", ["base", "interpolation", "vsr"])
def test_unet_with_the_fused_kernels_equals_the_plain_path(kind, monkeypatch):
    # TF32 convolutions would turn the kernels' last-bit differences into 1e-4 ones.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = LaVieUNet(UNetConfig.tiny(kind)).cuda().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.config.in_channels, 6, 8, 8, generator=g).cuda()
    ctx = torch.randn(2, 7, model.config.cross_attention_dim, generator=g).cuda()
    noise = torch.tensor([20, 20]).cuda() if model.config.num_noise_levels else None
    with torch.no_grad():
        out = model(x, torch.tensor([500, 500]).cuda(), ctx, noise)
        monkeypatch.setattr(fused, "available", lambda *_: False)
        monkeypatch.setattr(fused, "kernels_usable", lambda *_: False)
        monkeypatch.setattr(blocks.TemporalAttention, "reads_video_tokens", lambda *_: False)
        ref = model(x, torch.tensor([500, 500]).cuda(), ctx, noise)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("kind", ["base", "interpolation", "vsr"])
def test_unet_frame_by_frame_and_in_row_pieces_equals_it_whole_on_the_kernels(kind, monkeypatch):
    """The memory-saving paths of paper-size VSR calls (resnets a frame at a time, feed-forwards in row pieces,
    norms written over their input), forced at toy size: the same output on the GPU path."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = LaVieUNet(UNetConfig.tiny(kind)).cuda().eval().use_channels_last()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.config.in_channels, 6, 16, 16, generator=g).cuda()
    ctx = torch.randn(2, 7, model.config.cross_attention_dim, generator=g).cuda()
    noise = 20 if model.config.num_noise_levels else None
    with torch.no_grad():
        want = model(x, 500, ctx, noise)
        monkeypatch.setattr(blocks, "RESNET_BY_FRAME_MIN_NUMEL", 0)
        monkeypatch.setattr(blocks, "FF_PIECE_ELEMENTS", 4096)
        by_frame = []
        frames = blocks.ResnetBlock._forward_by_frame
        monkeypatch.setattr(blocks.ResnetBlock, "_forward_by_frame", lambda *a: by_frame.append(1) or frames(*a))
        got = model(x, 500, ctx, noise)
    assert by_frame
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_scale_shift_over_its_input_equals_a_new_tensor(silu):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 300, 96, device="cuda", generator=g).half()
    scale, shift = torch.randn(2, 96, device="cuda", generator=g), torch.randn(2, 96, device="cuda", generator=g)
    want = fused.scale_shift(x, scale, shift, silu=silu)
    got = fused.scale_shift(x, scale, shift, silu=silu, out=x)
    assert got is x
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_heads", [None, 512], ids=["one-launch", "pixel-groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_sdpa_on_video_tokens_equals_pixel_grouped(monkeypatch, dtype, max_heads):
    # The interpolation model's 61-frame attention: SDPA's kernels read the spatial layout through strides.
    if max_heads is not None:
        monkeypatch.setattr(blocks, "SDPA_MAX_HEADS", max_heads)
    torch.manual_seed(0)
    attn = blocks.TemporalAttention(320, 8, None, None).cuda().to(dtype)
    torch.nn.init.normal_(attn.to_out[0].weight, std=0.05)
    video = torch.randn(2, 61, 200, 320, device="cuda", dtype=dtype)  # b f l c
    with torch.no_grad():
        out = attn(video)
        ref = rearrange(attn(rearrange(video, "b f l c -> (b l) f c")), "(b l) f c -> b f l c", l=200)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda: fused.channel_sums(torch.zeros(2, 3)), "takes `b n c` rows, got 2 dimensions", id="sums-rank"),
        pytest.param(lambda: fused.softmax_rows(torch.zeros(2, 3, dtype=torch.float16), 1.0, torch.float16),
                     r"takes float32 `rows x columns` scores, got torch.float16 \(2, 3\)", id="softmax-scores-dtype"),
        pytest.param(
            lambda: fused.scale_shift(torch.zeros(2, 5, 4), torch.zeros(2, 4), torch.zeros(4)),
            r"per-channel values must be shaped \(2, 4\), got \(4,\)", id="shift-shape",
        ),
        pytest.param(
            lambda: fused.scale_shift(torch.zeros(2, 5, 4), torch.zeros(2, 4), torch.zeros(2, 4), out=torch.zeros(2, 5, 4)),
            "scale_shift writes over x only: out must be x, contiguous", id="shift-out",
        ),
        pytest.param(
            lambda: fused.bias_add_(torch.zeros(2, 3, 4, 4), torch.zeros(3)),
            r"takes a channels-last x and a \(3,\) bias", id="bias-layout",
        ),
        pytest.param(
            lambda: fused.bias_add_(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last), torch.zeros(4)),
            r"a \(3,\) bias, got \(4,\)", id="bias-shape",
        ),
        pytest.param(
            lambda: fused.bias_add_(
                torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last), torch.zeros(3), torch.zeros(2, 3, 4, 4)
            ),
            r"residual must be a channels-last \(2, 3, 4, 4\)", id="bias-residual-layout",
        ),
        pytest.param(
            lambda: fused.concat_channels(
                torch.zeros(3, 4, 2, 2).to(memory_format=torch.channels_last),
                torch.zeros(2, 4, 2, 2).to(memory_format=torch.channels_last),
            ),
            r"a batch that is a multiple of the second's, got \(3, 4, 2, 2\) torch.float32 and \(2, 4, 2, 2\)",
            id="concat-batch",
        ),
        pytest.param(
            lambda: fused.concat_channels(torch.zeros(2, 4, 2, 3), torch.zeros(2, 4, 2, 3).to(memory_format=torch.channels_last)),
            "concat_channels takes channels-last tensors", id="concat-layout",
        ),
        pytest.param(
            lambda: fused.layer_norm(torch.zeros(2, 5, 8), torch.zeros(8), torch.zeros(5), 1e-5),
            r"weight and bias must be shaped \(8,\), got \(8,\), \(5,\)", id="layer-norm-bias-shape",
        ),
        pytest.param(
            lambda: fused.layer_norm(torch.zeros(2, 5, 8), torch.zeros(8), torch.zeros(8), 1e-5, offset=torch.zeros(2, 8)),
            r"the offset must be shaped \(8,\), got \(2, 8\)", id="layer-norm-offset-shape",
        ),
        pytest.param(
            lambda: fused.group_affine(torch.zeros(2, 2, 30), torch.zeros(30), torch.zeros(30), 4, 5, 1e-5),
            r"`b 2 c` sums or `b s 2 c` partial sums with c a multiple of 4 groups, got \(2, 2, 30\)",
            id="group-affine-groups",
        ),
        pytest.param(
            lambda: fused.group_affine(torch.zeros(2, 3, 1, 32), torch.zeros(32), torch.zeros(32), 4, 5, 1e-5),
            r"partial sums with c a multiple of 4 groups, got \(2, 3, 1, 32\)", id="group-affine-partial-shape",
        ),
        pytest.param(
            lambda: fused.group_affine(
                torch.zeros(2, 2, 32), torch.zeros(32), torch.zeros(32), 4, 5, 1e-5, channel_offset=torch.zeros(2, 32)
            ),
            r"channel_offset must be shaped \(32,\), got \(2, 32\)", id="group-affine-channel-offset",
        ),
        pytest.param(
            lambda: fused.stream_biases([torch.zeros(8)] * 3, None, None, torch.float16),
            "takes the 4 residual branches' biases, got 3", id="stream-biases-count",
        ),
        pytest.param(
            lambda: fused.stream_biases([torch.zeros(8)] * 4, torch.zeros(6), None, torch.float16),
            r"every bias must be shaped \(8,\), got \(6,\)", id="stream-biases-shape",
        ),
        pytest.param(
            lambda: fused.bias_add_(
                torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last), torch.zeros(3), extra=torch.zeros(2)
            ),
            r"a \(3,\) extra bias, got \(2,\)", id="bias-extra-shape",
        ),
        pytest.param(
            lambda: fused.upsample_weight(torch.zeros(4, 3, 2, 2)),
            r"takes a 3x3 kernel `o i 3 3`, got \(4, 3, 2, 2\)", id="upsample-weight-kernel-size",
        ),
        pytest.param(
            lambda: fused.group_affine(torch.zeros(2, 2, 32), torch.zeros(32), torch.zeros(30), 4, 5, 1e-5),
            r"bias must be shaped \(32,\), got \(30,\)", id="group-affine-bias",
        ),
        pytest.param(
            lambda: fused.group_affine(
                torch.zeros(2, 2, 32), torch.zeros(32), torch.zeros(32), 4, 5, 1e-5, offset=torch.zeros(32)
            ),
            r"offset must be shaped \(2, 32\), got \(32,\)", id="group-affine-offset",
        ),
        pytest.param(
            lambda: fused.upsample_phases(torch.zeros(2, 8, 3, 3), None),
            r"takes a channels-last `n 4o h w` y, got \(2, 8, 3, 3\)", id="phases-layout",
        ),
        pytest.param(
            lambda: fused.upsample_phases(torch.zeros(2, 6, 3, 3).to(memory_format=torch.channels_last), None),
            r"`n 4o h w` y, got \(2, 6, 3, 3\)", id="phases-not-four",
        ),
        pytest.param(
            lambda: fused.upsample_phases(torch.zeros(2, 8, 3, 3).to(memory_format=torch.channels_last), torch.zeros(8)),
            r"the bias must be shaped \(2,\), got \(8,\)", id="phases-bias-shape",
        ),
    ],
)
def test_bad_per_channel_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_kernel_is_used_only_where_it_can_run():
    x = torch.zeros(2, 8, 16)
    assert not fused.available(x, 8) and not fused.kernels_usable(x)  # CPU tensors take the plain path
    if torch.cuda.is_available() and not triton_missing:
        y = x.cuda()
        assert fused.available(y, 8) and not fused.available(y, fused.MAX_FRAMES + 1)
        with torch.enable_grad():
            assert not fused.available(y.requires_grad_(), 8)  # no backward: training takes the matmul path


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param(dict(heads=5), "48 channels do not split into 5 heads", id="heads"),
        pytest.param(dict(bias=torch.zeros(2, 4, 5)), r"bias must be shaped \(2, 4, 4\)", id="bias-shape"),
        pytest.param(dict(rotary=(torch.zeros(4, 30), torch.zeros(4, 30))), r"rotary tables must be shaped \(4, even r <= 24\)", id="rotary-too-wide"),
        pytest.param(dict(q=torch.zeros(3, 4, 48, 1, 1)), r"must be `n f c` or `b f l c`, got 5 dimensions", id="rank"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    q = kwargs.pop("q", torch.zeros(3, 4, 48))
    kwargs = {"heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        fused.temporal_attention(q, q, q, kwargs.pop("heads"), **kwargs)


@pytest.mark.parametrize(
    "shapes,key_frames,heads,match",
    [
        pytest.param(((6, 5, 16), (6, 7, 16), (6, 5, 16)), [[0]] * 3, 2, r"`\(b f\) l c` and k, v `\(b f\) m c`", id="k-v-differ"),
        pytest.param(((6, 5, 16), (4, 5, 16), (4, 5, 16)), [[0]] * 3, 2, "of the same rows and channels", id="rows-differ"),
        pytest.param(((6, 5, 16),) * 3, [[0]] * 3, 3, "16 channels do not split into 3 heads", id="heads"),
        pytest.param(((6, 5, 16),) * 3, [[0]] * 4, 2, "6 rows are not clips of 4 frames", id="frames"),
        pytest.param(((6, 5, 16),) * 3, [0, 1, 2], 2, r"integers shaped \(3, s\), got torch.int64 \(3,\)", id="table-rank"),
        pytest.param(((6, 5, 16),) * 3, [[0.0]] * 3, 2, "got torch.float32", id="table-float"),
    ],
)
def test_bad_key_frame_arguments_are_named(shapes, key_frames, heads, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fused.key_frame_attention(q, k, v, heads, len(key_frames), torch.tensor(key_frames))


@pytest.mark.parametrize("dtype,grad,expected", HALF_TYPE_DISPATCH)
def test_sparse_causal_dispatch(monkeypatch, dtype, grad, expected):
    # Which path sparse causal attention takes, with the kernel replaced by a recorder (runs without a GPU).
    attn = blocks.Attention(16, 2).to(dtype).requires_grad_(grad)
    x = torch.randn(2 * 4, 5, 16).to(dtype)  # (b f) l c, 4 frames; only the weights may need a gradient
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda t: not (torch.is_grad_enabled() and t.requires_grad))

    tables = []

    def record(q, k, v, heads, frames, key_frames):
        calls.append((heads, frames, key_frames.tolist()))
        tables.append(key_frames)
        return torch.zeros_like(q)

    monkeypatch.setattr(fused, "key_frame_attention", record)
    with torch.set_grad_enabled(grad):
        out = blocks.sparse_causal_attention(attn, x, 4)
        blocks.sparse_causal_attention(attn, x, 4)
    assert out.shape == x.shape
    assert calls == ([(2, 4, [[0, 0], [0, 0], [0, 1], [0, 2]])] * 2 if expected else [])
    # The table is made once per frame count: no kernels of its own in later calls.
    assert all(t is tables[0] for t in tables)


@pytest.mark.parametrize(
    "shapes,heads,match",
    [
        pytest.param(((2, 5, 16), (2, 7, 16), (2, 6, 16)), 2, r"`b n c` and k, v `b m c`", id="k-v-differ"),
        pytest.param(((2, 5, 16), (3, 7, 16), (3, 7, 16)), 2, "of the same samples and channels", id="samples-differ"),
        pytest.param(((2, 5, 16), (2, 7, 8), (2, 7, 8)), 2, r"got \(2, 5, 16\), \(2, 7, 8\)", id="channels-differ"),
        pytest.param(((2, 5, 16),) * 3, 3, "16 channels do not split into 3 heads", id="heads"),
        pytest.param(((2, 5, 16), (2, 129, 16), (2, 129, 16)), 2, "takes 1 to 128 keys, got 129", id="too-many-keys"),
        pytest.param(((2, 5, 16), (2, 0, 16), (2, 0, 16)), 2, "takes 1 to 128 keys, got 0", id="no-keys"),
    ],
)
def test_bad_short_key_arguments_are_named(shapes, heads, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fused.short_key_attention(q, k, v, heads)


@pytest.mark.parametrize(
    "dtype,grad,keys,expected",
    [*(pytest.param(dtype, grad, 77, expected, id=p.id) for p in HALF_TYPE_DISPATCH for dtype, grad, expected in [p.values]),
     pytest.param(torch.float16, False, 129, False, id="too-many-keys-torch-path")],
)
def test_text_attention_dispatch(monkeypatch, dtype, grad, keys, expected):
    # Which path text cross-attention takes, with the kernel replaced by a recorder (runs without a GPU).
    attn = blocks.Attention(16, 2, context_dim=12).to(dtype).requires_grad_(grad)
    x = torch.randn(2 * 3, 5, 16).to(dtype)  # (b f) l c, 3 frames
    context = torch.randn(2, keys, 12).to(dtype)
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda t: not (torch.is_grad_enabled() and t.requires_grad))

    def record(q, k, v, heads):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), heads))
        return torch.zeros_like(q)

    monkeypatch.setattr(fused, "short_key_attention", record)
    with torch.set_grad_enabled(grad):
        out = blocks.text_attention(attn, x, context, 3)
    assert out.shape == x.shape
    assert calls == ([((2, 15, 16), (2, keys, 16), (2, keys, 16), 2)] if expected else [])


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize(
    "tokens,keys,head_dim,expected",
    [
        pytest.param(2 * 16 * 2560 // 2, 77, 40, (32, 16, 64, 16, 4, 3), id="base-top-level"),
        pytest.param(16 * 160, 77, 160, (128, 32, 64, 16, 4, 2), id="base-third-level"),
        pytest.param(16 * 40, 77, 160, (128, 32, 64, 16, 2, 2), id="base-middle"),
        pytest.param(61 * 160, 77, 160, (128, 32, 64, 16, 4, 2), id="interpolation-third-level-two-stages"),
        pytest.param(8 * 40960, 77, 64, (64, 0, 64, 16, 4, 3), id="vsr-64-wide"),
        pytest.param(100, 16, 8, (16, 0, 16, 0, 2, 2), id="sixteen-keys-narrow-head"),
        pytest.param(100, 128, 24, (16, 16, 128, 0, 2, 2), id="128-keys"),
    ],
)
def test_short_key_launch_splits_heads_and_keys_and_loops_at_least_twice(tokens, keys, head_dim, expected):
    constants, options = fused._short_key_launch(tokens, keys, 8, head_dim, torch.float16)
    got = tuple(constants[k] for k in ("D0", "D1", "N0", "N1", "ROUNDS")) + (options["num_stages"],)
    assert got == expected
    assert constants["ROUNDS"] >= 2 and constants["N0"] + constants["N1"] >= keys
    assert constants["D0"] + constants["D1"] >= head_dim


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "dim,context_dim,tokens,frames",
    [(320, 768, 2560, 4), (640, 768, 640, 4), (1280, 768, 160, 16), (512, 1024, 1000, 3), (1024, 1024, 40, 2)],
    ids=["base-head-40", "base-head-80", "base-head-160", "vsr-head-64", "vsr-head-128-two-rounds"],
)
def test_cuda_text_attention_kernel_equals_sdpa(monkeypatch, dtype, dim, context_dim, tokens, frames):
    torch.manual_seed(0)
    attn = blocks.Attention(dim, 8, context_dim).cuda().to(dtype)
    x = torch.randn(2 * frames, tokens, dim, device="cuda", dtype=dtype)
    context = torch.randn(2, 77, context_dim, device="cuda", dtype=dtype)
    calls = []
    kernel = fused.short_key_attention
    monkeypatch.setattr(fused, "short_key_attention", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        out = blocks.text_attention(attn, x, context, frames)
        monkeypatch.setattr(fused, "kernels_usable", lambda *_: False)
        ref = blocks.text_attention(attn, x, context, frames)
    assert calls == [1]
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "dim,heads,tokens",
    [(320, 8, 40), (640, 8, 77), (1280, 8, 10), (320, 8, 256), (320, 8, 384), (640, 8, 128), (1280, 8, 64)],
    ids=["head-40", "head-80", "head-160", "head-40-tma", "head-40-tma-3-blocks", "head-80-tma", "head-160-tma"],
)
def test_cuda_sparse_causal_kernel_equals_gathered_sdpa(monkeypatch, dtype, dim, heads, tokens):
    torch.manual_seed(0)
    attn = blocks.Attention(dim, heads).cuda().to(dtype)
    x = torch.randn(2 * 5, tokens, dim, device="cuda", dtype=dtype)
    with torch.no_grad():
        out = blocks.sparse_causal_attention(attn, x, 5)
        monkeypatch.setattr(fused, "kernels_usable", lambda *_: False)
        ref = blocks.sparse_causal_attention(attn, x, 5)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize(
    "key_tokens,head_dim,descriptors,expected",
    [
        pytest.param(2560, 40, True, True, id="top-level-20-blocks"),
        pytest.param(256, 40, True, True, id="two-blocks"),
        pytest.param(128, 40, True, False, id="one-block-pointers"),
        pytest.param(2600, 40, True, False, id="partial-block-pointers"),
        pytest.param(640, 80, True, True, id="head-80"),
        pytest.param(160, 160, True, True, id="head-160"),
        pytest.param(2560, 40, False, False, id="no-descriptors-pointers"),
    ],
)
def test_key_frame_kernel_reads_through_descriptors_only_where_blocks_tile_the_keys(
    key_tokens, head_dim, descriptors, expected
):
    constants, _ = fused._key_frame_launch(key_tokens, key_tokens, 2, 8, head_dim, torch.float16, descriptors)
    assert constants["TMA"] == expected
    if expected:
        assert key_tokens % constants["BLOCK_N"] == 0 and constants["LOOP_END"] == key_tokens
    else:
        assert constants["LOOP_END"] >= 2 * constants["BLOCK_N"]


@pytest.mark.parametrize(
    "shapes,dtypes,match",
    [
        pytest.param(((4, 8), (9, 8), (9,)), None, r"weight must be shaped \(2n, 8\), got \(9, 8\)", id="weight-odd-rows"),
        pytest.param(((4, 8), (12, 6), (12,)), None, r"weight must be shaped \(2n, 8\), got \(12, 6\)", id="weight-width"),
        pytest.param(((4, 8), (12, 8), (6,)), None, r"bias must be shaped \(12,\), got \(6,\)", id="bias-shape"),
        pytest.param(((4, 12), (16, 12), (16,)), None, r"multiples of 8, got \(16, 12\)", id="width-12"),
        pytest.param(((4, 8), (8, 8), (8,)), None, r"multiples of 8, got \(8, 8\)", id="inner-4"),
        pytest.param(((4, 8), (12, 8), (12,)), (torch.float32,) * 3, "float16 or bfloat16 .* got torch.float32", id="float32"),
        pytest.param(
            ((4, 8), (12, 8), (12,)), (torch.float16, torch.bfloat16, torch.float16), "of one dtype", id="mixed-dtypes"
        ),
    ],
)
def test_bad_geglu_arguments_are_named(shapes, dtypes, match):
    dtypes = dtypes or (torch.float16,) * 3
    x, weight, bias = (torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes))
    with pytest.raises(ValueError, match=match):
        fused.geglu(x, weight, bias)


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_feed_forward_takes_the_geglu_kernel_for_half_types_only(dtype, monkeypatch):
    ff = blocks.FeedForward(64).cuda().to(dtype)
    x = torch.randn(2, 50, 64, device="cuda", dtype=dtype)
    calls = []
    launch = fused._launch_geglu
    monkeypatch.setattr(fused, "_launch_geglu", lambda *a: calls.append(1) or launch(*a))
    with torch.no_grad():
        out = ff(x)
    assert len(calls) == (dtype != torch.float32)
    with torch.enable_grad():
        ff(x).sum().backward()  # trainable weights: the torch path, which has a backward
    assert len(calls) == (dtype != torch.float32)
    monkeypatch.setattr(fused, "kernels_usable", lambda *_: False)
    with torch.no_grad():
        ref = ff(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype,grad,expected", HALF_TYPE_DISPATCH)
def test_geglu_dispatch(monkeypatch, dtype, grad, expected):
    # Which path GEGLU takes, with the kernel replaced by a recorder (runs without a GPU).
    geglu = blocks.GEGLU(8, 8).to(dtype)
    x = torch.randn(3, 8).to(dtype)
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda *_: True)
    monkeypatch.setattr(fused, "TensorDescriptor", object)
    monkeypatch.setattr(fused, "geglu", lambda x, w, b: calls.append((w, b)) or x.new_zeros(*x.shape[:-1], 8))
    with torch.set_grad_enabled(grad):
        out = geglu(x)
    assert len(calls) == expected and out.shape == (3, 8)
    if expected:
        assert calls[0][0] is geglu.proj.weight and calls[0][1] is geglu.proj.bias


@pytest.mark.parametrize(
    "dim,inner,descriptors,expected",
    [
        pytest.param(8, 8, True, True, id="widths-of-8"),
        pytest.param(12, 8, True, False, id="width-12-torch-path"),
        pytest.param(8, 4, True, False, id="inner-4-torch-path"),
        pytest.param(8, 8, False, False, id="triton-without-descriptors-torch-path"),
    ],
)
def test_geglu_kernel_takes_only_widths_its_descriptors_can(monkeypatch, dim, inner, descriptors, expected):
    geglu = blocks.GEGLU(dim, inner).half()
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda *_: True)
    monkeypatch.setattr(fused, "TensorDescriptor", object if descriptors else None)
    monkeypatch.setattr(fused, "geglu", lambda x, w, b: calls.append(1) or x.new_zeros(*x.shape[:-1], inner))
    with torch.no_grad():
        out = geglu(torch.randn(3, dim).half())
    assert len(calls) == expected and out.shape == (3, inner)


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


@pytest.mark.skipif(not fused._CUSTOM_OPS, reason="needs torch.library.custom_op")
@pytest.mark.parametrize("watcher,expected", [
    pytest.param(None, "launch", id="eager-launches-directly"),
    pytest.param("flops", "op", id="flop-counter-sees-the-op"),
    pytest.param("compiling", "op", id="torch-compile-sees-the-op"),
])
@pytest.mark.parametrize(
    "kernel", ["channel_sums", "scale_shift", "geglu", "temporal_attention", "key_frame_attention", "short_key_attention"]
)
def test_kernels_skip_their_op_unless_something_watches_ops(monkeypatch, watcher, expected, kernel):
    # The op's dispatch costs the host more than the launch; compile and FLOP counting need the op.
    x, scale = torch.zeros(2, 5, 8, dtype=torch.float16), torch.zeros(2, 8)
    op_name, launch_name, call = {
        "channel_sums": ("_channel_sums_op", "_launch_channel_sums", lambda: fused.channel_sums(x)),
        "scale_shift": ("_scale_shift_op", "_launch_scale_shift", lambda: fused.scale_shift(x, scale, scale)),
        "geglu": ("_geglu_op", "_launch_geglu", lambda: fused.geglu(x, torch.zeros(16, 8, dtype=x.dtype),
                                                                     torch.zeros(16, dtype=x.dtype))),
        "temporal_attention": ("_temporal_attention_op", "_launch", lambda: fused.temporal_attention(x, x, x, 2)),
        "key_frame_attention": ("_key_frame_attention_op", "_launch_key_frame_attention",
                                lambda: fused.key_frame_attention(x, x, x, 2, 1, torch.zeros(1, 1, dtype=torch.long))),
        "short_key_attention": ("_short_key_attention_op", "_launch_short_key_attention",
                                lambda: fused.short_key_attention(x, x, x, 2)),
    }[kernel]
    calls = []
    monkeypatch.setattr(fused, "_require_kernels", lambda *_: None)
    monkeypatch.setattr(fused, "TensorDescriptor", object)
    monkeypatch.setattr(fused, op_name, lambda *a: calls.append("op") or x)
    monkeypatch.setattr(fused, launch_name, lambda *a: calls.append("launch") or x)
    if watcher == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with _flop_counter() if watcher == "flops" else contextlib.nullcontext():
        call()
    assert calls == [expected]


@pytest.mark.skipif(not fused._CUSTOM_OPS, reason="needs torch.library.custom_op")
@pytest.mark.parametrize("keys", [1, 2, 3], ids=["one-key-frame", "sparse-causal", "three-key-frames"])
def test_attention_kernels_count_the_flops_of_the_sdpa_they_replace(keys):
    # bench/speed.py reports TFLOP/s from torch's FlopCounterMode, on meta tensors here.
    from torch.utils.flop_counter import FlopCounterMode

    rows, frames, tokens, key_tokens, heads, head_dim = 6, 3, 5, 7, 2, 8
    q = torch.zeros(rows, tokens, heads * head_dim, device="meta")
    k = torch.zeros(rows, key_tokens, heads * head_dim, device="meta")
    with FlopCounterMode(display=False) as kernel:
        torch.ops.lavie.key_frame_attention(q, k, k, heads, frames, torch.zeros(frames, keys, dtype=torch.long, device="meta"))
    gathered = torch.zeros(rows, heads, keys * key_tokens, head_dim, device="meta")
    with FlopCounterMode(display=False) as sdpa:
        torch.nn.functional.scaled_dot_product_attention(
            torch.zeros(rows, heads, tokens, head_dim, device="meta"), gathered, gathered
        )
    assert kernel.get_total_flops() == sdpa.get_total_flops() > 0

    video = torch.zeros(2, frames, tokens, heads * head_dim, device="meta")  # b f l c
    with FlopCounterMode(display=False) as kernel:
        torch.ops.lavie.temporal_attention(video, video, video, heads, None, None, None)
    per_pixel = torch.zeros(2 * tokens, heads, frames, head_dim, device="meta")
    with FlopCounterMode(display=False) as sdpa:
        torch.nn.functional.scaled_dot_product_attention(per_pixel, per_pixel, per_pixel)
    assert kernel.get_total_flops() == sdpa.get_total_flops() > 0

    with FlopCounterMode(display=False) as kernel:
        torch.ops.lavie.short_key_attention(q[:2], k[:2], k[:2], heads)
    with FlopCounterMode(display=False) as sdpa:
        torch.nn.functional.scaled_dot_product_attention(
            torch.zeros(2, heads, tokens, head_dim, device="meta"), *[torch.zeros(2, heads, key_tokens, head_dim, device="meta")] * 2
        )
    assert kernel.get_total_flops() == sdpa.get_total_flops() > 0


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("extra", [False, True], ids=["bias", "bias-and-extra"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_cuda_conv_adds_bias_and_residual_in_one_pass(monkeypatch, dtype, extra):
    # 1024 pixels: the product is a matmul of unfolded windows, which the reference's TF32 convolution would
    # differ from by 1e-3.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    calls = []
    bias_add = fused.bias_add_
    monkeypatch.setattr(fused, "bias_add_", lambda *args, **kwargs: calls.append(args[0].shape) or bias_add(*args, **kwargs))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 48, 3, padding=1).cuda().to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(4, 64, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(4, 48, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    extra_bias = torch.randn(48, device="cuda", dtype=dtype) if extra else None
    with torch.no_grad():
        got = blocks.conv(conv, x, residual=residual, extra_bias=extra_bias)
        want = conv(x).float() + residual.float()
        want = want if extra_bias is None else want + extra_bias.float().view(-1, 1, 1)
    assert calls == [(4, 48, 16, 16)] and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-2 if dtype == torch.float16 else 1e-4)


@pytest.mark.parametrize(
    "dtype,grad,expected",
    [
        pytest.param(torch.float16, False, True, id="fp16"),
        pytest.param(torch.bfloat16, False, True, id="bf16"),
        pytest.param(torch.float32, False, True, id="fp32"),
        pytest.param(torch.float16, True, False, id="trainable-torch-path"),
    ],
)
def test_layer_norm_dispatch(monkeypatch, dtype, grad, expected):
    """blocks.LayerNorm takes the kernel (float32 statistics, any dtype) wherever the kernels run and no
    gradient is needed, and never under torch.compile (which fuses LayerNorm with its neighbours)."""
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda *_: True)
    monkeypatch.setattr(fused, "layer_norm", lambda x, *_, **__: calls.append(x.shape) or x)
    norm = blocks.LayerNorm(8).to(dtype).requires_grad_(grad)
    x = torch.randn(3, 4, 8, dtype=dtype)
    with torch.no_grad() if not grad else torch.enable_grad():
        norm(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        norm(x)
    assert calls == ([(3, 4, 8)] if expected else [])


@pytest.mark.parametrize(
    "grad,compiling,layout,expected",
    [
        pytest.param(False, False, torch.channels_last, True, id="eager"),
        pytest.param(True, False, torch.channels_last, False, id="grad"),
        pytest.param(False, True, torch.channels_last, False, id="compiling"),
        pytest.param(False, False, torch.contiguous_format, False, id="nchw"),
    ],
)
def test_upsample_conv_interleaves_phases_with_the_kernel_eagerly(monkeypatch, grad, compiling, layout, expected):
    # Which path blocks.upsample_conv takes, with the kernel replaced by a recorder (runs without a GPU).
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda t: not (torch.is_grad_enabled() and t.requires_grad))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(fused, "upsample_phases", lambda y, bias: calls.append(tuple(y.shape)) or torch.zeros(2, 6, 6, 10))

    def fold(weight):
        calls.append("fold")
        return torch.zeros(24, 4, 2, 2).contiguous(memory_format=torch.channels_last)

    monkeypatch.setattr(fused, "upsample_weight", fold)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).requires_grad_(grad)
    x = torch.randn(2, 4, 3, 5).contiguous(memory_format=layout)
    with torch.set_grad_enabled(grad):
        blocks.upsample_conv(x, conv)
    # The weights fold in a kernel wherever no gradient needs them, whatever the video's layout.
    assert calls == (["fold"] * (not grad and not compiling) + [(2, 24, 4, 6)] * expected)


@pytest.mark.parametrize(
    "shape,layout",
    [((2, 8, 5, 8), torch.contiguous_format), ((2, 8, 5), None)],
    ids=["nchw", "three-dimensions"],
)
def test_unfold_3x3_takes_channels_last_images_only(shape, layout):
    x = torch.zeros(shape) if layout is None else torch.zeros(shape).contiguous(memory_format=layout)
    with pytest.raises(ValueError, match=r"unfold_3x3: takes a channels-last `n c h w` tensor, got shape \("):
        fused.unfold_3x3(x)


@pytest.mark.parametrize(
    "conv_args,shape,layout,grad,compiling,expected",
    [
        pytest.param(dict(kernel_size=3, padding=1), (32, 8, 5, 8), torch.channels_last, False, False, True, id="base-deepest-level"),
        pytest.param(dict(kernel_size=3, padding=1), (8, 8, 16, 16), torch.channels_last, False, False, True, id="2048-pixels"),
        pytest.param(dict(kernel_size=3, padding=1), (8, 8, 16, 17), torch.channels_last, False, False, False, id="past-2048-pixels"),
        pytest.param(dict(kernel_size=3, padding=1, stride=2), (32, 8, 6, 8), torch.channels_last, False, False, False, id="strided"),
        pytest.param(dict(kernel_size=1), (32, 8, 5, 8), torch.channels_last, False, False, False, id="pointwise"),
        pytest.param(dict(kernel_size=3, padding=1, padding_mode="reflect"), (32, 8, 5, 8), torch.channels_last, False, False, False,
                     id="reflect-padding"),
        pytest.param(dict(kernel_size=3, padding=1), (32, 8, 5, 8), torch.contiguous_format, False, False, False, id="nchw"),
        pytest.param(dict(kernel_size=3, padding=1), (32, 8, 5, 8), torch.channels_last, True, False, False, id="grad"),
        pytest.param(dict(kernel_size=3, padding=1), (32, 8, 5, 8), torch.channels_last, False, True, False, id="compiling"),
    ],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_small_convolutions_unfold_into_one_matmul_on_the_kernels(
    monkeypatch, conv_args, shape, layout, grad, compiling, expected, bias
):
    # Which path blocks.conv takes, with the unfolding kernel replaced by a recorder (runs without a GPU).
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda t: not (torch.is_grad_enabled() and t.requires_grad))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(fused, "bias_add_fits", lambda *_: False)

    def unfold(x):
        calls.append(tuple(x.shape))
        return torch.zeros(x.shape[0] * x.shape[2] * x.shape[3], 9 * x.shape[1])

    monkeypatch.setattr(fused, "unfold_3x3", unfold)
    conv = torch.nn.Conv2d(shape[1], 6, **conv_args).requires_grad_(grad).to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = blocks.conv(conv, x, bias=bias)
    assert calls == [shape] * expected
    assert out.shape == conv(x).shape


@pytest.mark.parametrize(
    "compiling,expected",
    [(False, ["partial sums", "affine", "scale_shift"]), (True, ["sums", "scale_shift"])], ids=["eager", "compiling"],
)
def test_group_norm_turns_sums_into_scale_and_shift_with_a_kernel_eagerly(monkeypatch, compiling, expected):
    """Eagerly the scale and shift come from `fused.group_affine`, which adds up the partial sums itself and
    folds both offsets in; under torch.compile from torch's arithmetic, which Inductor fuses. Kernels replaced
    by recorders (runs without a GPU)."""
    calls = []
    monkeypatch.setattr(fused, "kernels_usable", lambda t: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(blocks, "COMPILED_NORM_KERNEL_MIN_NUMEL", 0)

    def sums(rows, *, partial=False):
        calls.append("partial sums" if partial else "sums")
        return torch.ones(rows.shape[0], *[3] * partial, 2, rows.shape[2])

    def affine(sums, weight, bias, groups, rows, eps, *, offset=None, channel_offset=None):
        calls.append("affine")
        assert (groups, rows, offset is not None, channel_offset is not None) == (8, 3 * 4 * 5, True, True)
        return torch.ones(2, 64), torch.zeros(2, 64)

    monkeypatch.setattr(fused, "channel_sums", sums)
    monkeypatch.setattr(fused, "group_affine", affine)
    monkeypatch.setattr(fused, "scale_shift", lambda rows, *_, silu, out=None: calls.append("scale_shift") or rows)
    norm = blocks.VideoGroupNorm(8, 64)
    x = torch.randn(2, 64, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        norm(x, silu=True, offset=torch.randn(2, 64), channel_offset=torch.randn(64))
    assert calls == expected


@pytest.mark.gpu
@on_cuda
def test_cuda_layer_norm_equals_torch():
    torch.manual_seed(0)
    norm = blocks.LayerNorm(320).cuda().half()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 1000, 320, device="cuda", dtype=torch.half)
    with torch.no_grad():
        got = norm(x)
        want = torch.nn.functional.layer_norm(x.float(), (320,), norm.weight.float(), norm.bias.float(), norm.eps)
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=4e-3)


def _compile(kernel, signature: dict[str, str], constants: dict, options: dict, capability: int):
    """`kernel` compiled (not run) for an NVIDIA GPU of `capability`, as Triton would for a launch with these
    compile-time constants and options (num_warps, num_stages)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
    return fused.triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def _compile_geglu(config: tuple[int, ...], capability: int):
    block_m, block_n, block_k, group_m, warps, stages, _ = config
    signature = {
        "x_desc": f"tensordesc<fp16[{block_m}, {block_k}]>", "w_desc": f"tensordesc<fp16[{block_n}, {block_k}]>",
        "out_desc": f"tensordesc<fp16[{block_m}, {block_n}]>", "b_ptr": "*fp16",
        "M": "i32", "N": "i32", "K": "i32", "programs": "i32", "rounds": "i32",
    }
    constants = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
                 "INTERPRETER_ROUNDS": 0, "INTERPRETER_K": 0}
    return _compile(fused._geglu_kernel, signature, constants, {"num_warps": warps, "num_stages": stages}, capability)


def _compile_key_frame(head_dim: int, tokens: int, capability: int, tma: bool):
    """The key-frame kernel as its launcher configures it for fp16 sparse causal attention (two key frames of
    `tokens` tokens, 8 heads), with tensor descriptors or pointer loads."""
    constants, options = fused._key_frame_launch(tokens, tokens, 2, 8, head_dim, torch.float16, tma)
    assert constants["TMA"] == tma
    block_n, widths = constants["BLOCK_N"], (constants["D0"], constants["D1"] or constants["D0"])
    descriptors = [f"{t}{i}_desc" for t in "kv" for i in range(2)]
    signature = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), "*fp16")
    if tma:
        signature.update({name: f"tensordesc<fp16[{block_n}, {widths[int(name[1])]}]>" for name in descriptors})
    else:
        signature.update(dict.fromkeys(descriptors, "constexpr"))
        constants = {**constants, **dict.fromkeys(descriptors)}
    signature.update({"out_ptr": "*fp16", "key_frames_ptr": "*i64", "frames": "i32", "tokens": "i32"})
    signature.update(dict.fromkeys([f"stride_{t}{d}" for t in "qkvo" for d in "nl"], "i64"))
    signature["scale_log2"] = "fp32"
    return _compile(fused._key_frame_attention_kernel, signature, constants, options, capability)


def _compile_short_key(head_dim: int, tokens: int, capability: int):
    """The short-key kernel as its launcher configures it for fp16 text attention (77 keys, 8 heads)."""
    signature = {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), "*fp16"), "tokens": "i32", "keys": "i32"}
    signature.update(dict.fromkeys([f"stride_{t}{d}" for t in "qkvo" for d in "bl"], "i64"))
    signature["scale_log2"] = "fp32"
    return _compile(fused._short_key_attention_kernel, signature, *fused._short_key_launch(tokens, 77, 8, head_dim, torch.float16),
                    capability)


def _compile_temporal(frames: int, head_dim: int, capability: int, heads: int = 1, rotary_dim: int = 0):
    """The temporal attention kernel as its launcher configures it for fp16, with rotary positions on
    `rotary_dim` channels of each head and a relative bias where `rotary_dim`, as the base and VSR models call it."""
    signature = {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), "*fp16"),
                 **dict.fromkeys(("cos_ptr", "sin_ptr", "bias_ptr"), "*fp32"), "tokens": "i32"}
    signature.update(dict.fromkeys([f"stride_{t}{d}" for t in "qkvo" for d in "bfl"], "i64"))
    signature.update(dict.fromkeys([f"stride_b{d}" for d in "hij"], "i64"))
    signature["scale"] = "fp32"
    launch = fused._temporal_launch(frames, head_dim, rotary_dim, rotary_dim > 0, torch.float16, heads)
    return _compile(fused._temporal_attention_kernel, signature, *launch, capability)


# (compute capability, shared memory a block may use): the GPUs users run, compiled for on any machine (Triton
# ships its PTX assembler). On a GPU a launch whose kernel needs more raises before running, and the launcher
# takes the next configuration.
GPU_TARGETS = [
    pytest.param(86, 99 * 1024, id="sm86-rtx-30"),
    pytest.param(89, 99 * 1024, id="sm89-rtx-40"),
    pytest.param(80, 163 * 1024, id="sm80-a100"),
    pytest.param(90, 227 * 1024, id="sm90-h100-h200"),
]


@pytest.mark.parametrize(
    "rows,inner,width,small",
    [
        (2 * 16 * 2560, 1280, 320, True), (2 * 16 * 40, 5120, 1280, True), (2 * 61 * 40, 5120, 1280, True),
        (2 * 61 * 2560, 1280, 320, False), (2 * 61 * 160, 5120, 1280, False), (2 * 8 * 40960, 2048, 512, False),
    ],
    ids=["base-level-0", "base-middle", "interpolation-middle", "interpolation-level-0", "interpolation-level-2",
         "vsr-level-1"],
)
def test_geglu_picks_two_programs_per_multiprocessor_for_small_products(rows, inner, width, small):
    configs = fused._geglu_configs(rows, inner, width)
    assert configs == (fused._GEGLU_SMALL_CONFIGS if small else fused._GEGLU_CONFIGS)
    assert configs[0][-1] == (2 if small else 1)


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize(
    "channels,expected",
    [(320, (2, 512, 1)), (640, (2, 1024, 2)), (1280, (2, 2048, 4)), (40, (16, 64, 1)), (2560, (2, 4096, 4))],
    ids=["320", "640", "1280", "narrow-40", "wide-2560"],
)
def test_layer_norm_takes_whole_rows_two_per_program_and_a_warp_per_512_channels(channels, expected):
    assert fused._layer_norm_tiles(channels) == expected


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize(
    "frames,head_dim,heads,expected",
    [
        (16, 40, 8, (True, 8, 4)), (8, 64, 8, (True, 8, 4)), (16, 80, 8, (True, 4, 2)), (16, 160, 8, (True, 2, 2)),
        (8, 64, 6, (True, 2, 1)), (8, 64, 1, (True, 1, 1)), (61, 40, 8, (False, 4, 4)), (61, 80, 8, (False, 2, 4)),
        (61, 160, 8, (False, 1, 4)), (61, 40, 6, (False, 2, 4)), (24, 40, 8, (False, 4, 1)),
    ],
    ids=["base-top-level", "vsr-64-wide", "base-80-wide", "base-160-wide", "six-heads-divisor", "one-head",
         "interpolation-top-level", "interpolation-80-wide", "interpolation-160-wide", "long-six-heads", "24-frames"],
)
def test_temporal_attention_program_takes_neighbouring_heads(frames, head_dim, heads, expected):
    # Short clips batch their heads into one set of 3-D dots; long ones take them in turn.
    constants, options = fused._temporal_launch(frames, head_dim, 0, False, torch.float16, heads)
    assert (constants["BATCHED"], constants["HEADS_PER_PROGRAM"], options["num_warps"]) == expected
    assert heads % constants["HEADS_PER_PROGRAM"] == 0


@pytest.mark.skipif(triton_missing or fused.TensorDescriptor is None, reason="needs Triton >= 3.3")
@pytest.mark.parametrize("capability,shared", GPU_TARGETS)
def test_geglu_kernel_compiles_within_each_gpus_shared_memory(capability, shared):
    # One kernel serves every model width (K is a run-time value): a configuration fits every GPU, and on
    # Hopper the fastest one does.
    for configs in (fused._GEGLU_CONFIGS, fused._GEGLU_SMALL_CONFIGS):
        fitting = [c for c in configs if _compile_geglu(c, capability).metadata.shared <= shared]
        assert fitting, f"no GEGLU configuration fits sm{capability}'s {shared} bytes"
        if capability == 90:
            assert fitting[0] == configs[0]
            # Programs per multiprocessor is a promise of overlap only if that many fit its shared memory.
            assert configs[0][-1] * _compile_geglu(configs[0], capability).metadata.shared <= shared


@pytest.mark.skipif(triton_missing or fused.TensorDescriptor is None, reason="needs Triton >= 3.3")
@pytest.mark.parametrize("capability,shared", GPU_TARGETS)
def test_attention_kernels_compile_within_each_gpus_shared_memory(capability, shared):
    # These launch one configuration each, with no smaller one to fall back to: every GPU must take it. The
    # interpolation model's sparse causal attention at its three widths (heads of 40, 80 and 160 channels, 2560,
    # 640 and 160 tokens a frame), text attention at every model's widths, its temporal attention's largest
    # tiles (61 frames, heads of 160) and most heads per program (61 frames, 8 heads of 40, four per program),
    # and the batched programs of the base model's three widths and the VSR's.
    for head_dim, tokens in ((40, 2560), (80, 640), (160, 160)):
        for tma in (True, False):
            used = _compile_key_frame(head_dim, tokens, capability, tma).metadata.shared
            assert used <= shared, (
                f"key-frame attention, heads of {head_dim}, TMA {tma}: {used} bytes of shared memory on sm{capability}"
            )
    # Text attention's widths (the three models' heads of 40 to 160) with the most pipeline stages.
    for head_dim in (40, 64, 80, 128, 160):
        used = _compile_short_key(head_dim, 8192, capability).metadata.shared
        assert used <= shared, f"short-key attention, heads of {head_dim}: {used} bytes of shared memory on sm{capability}"
    for frames, head_dim, heads, rotary_dim in (
        (61, 160, 1, 0), (61, 40, 8, 0), (48, 40, 8, 32), (16, 40, 8, 32), (16, 80, 8, 32), (16, 160, 8, 32), (8, 64, 8, 32),
    ):
        used = _compile_temporal(frames, head_dim, capability, heads, rotary_dim).metadata.shared
        assert used <= shared, (
            f"temporal attention, {frames} frames, {heads} heads of {head_dim}: {used} bytes of shared memory on "
            f"sm{capability}"
        )


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
def test_launch_takes_the_first_configuration_that_fits_and_remembers_it(monkeypatch):
    monkeypatch.setattr(fused, "_FITTING", {})
    tried = []

    def launch(config):
        tried.append(config)
        if config[0] > 32:
            raise fused.triton.runtime.errors.OutOfResources(200_000, 101_376, "shared memory")
        return torch.zeros(config)

    configs = ((128, 2), (64, 2), (32, 2), (16, 2))
    assert fused._launch_fitting("key", configs, launch).shape == (32, 2)
    assert fused._launch_fitting("key", configs, launch).shape == (32, 2)
    assert tried == [(128, 2), (64, 2), (32, 2), (32, 2)]  # the second call starts at the one that fitted
    # An explicit list under the same key starts from its own first entry, not from the index remembered above.
    assert fused._launch_fitting("key", configs[3:], launch).shape == (16, 2)
    assert tried[-1] == (16, 2)
    with pytest.raises(fused.triton.runtime.errors.OutOfResources, match="shared memory"):
        fused._launch_fitting("other", configs[:2], launch)


# GroupNorm inputs of the three models on an H200 (132 multiprocessors): (clips, rows, channels).
SUM_SHAPES = [
    pytest.param(2, 16 * 40 * 64, 320, id="base-top"),
    pytest.param(2, 16 * 5 * 8, 1280, id="base-bottom"),
    pytest.param(2, 61 * 40 * 64, 640, id="interpolation-top-skip"),
    pytest.param(1, 8 * 320 * 512, 256, id="vsr-top"),
    pytest.param(3, 37, 40, id="tiny"),
]


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize("clips,rows,channels", SUM_SHAPES)
def test_channel_sums_spread_rows_over_every_multiprocessor(clips, rows, channels):
    rows_per_program, block_r, block_c, warps = fused._sum_launch(clips, rows, channels, 132)
    splits = -(-rows // rows_per_program)
    programs = splits * clips * -(-channels // block_c)
    per_multiprocessor = 8 if clips * rows * channels >= fused._SUM_LARGE_NUMEL else 4
    assert rows_per_program % block_r == 0 and splits * rows_per_program >= rows
    # Programs of whole steps: as many as asked for, or all there can be when rows run out first.
    assert programs <= per_multiprocessor * 132 or rows_per_program == block_r
    assert 2 * programs > per_multiprocessor * 132 or splits == 1


# ----------------------------------------------------------------------------- compiling ahead


class FakeKernel:
    """A Triton kernel as `fused._run` sees it: `kernel[grid](...)` launches; inside `compile_ahead`, `warmup`
    queues `compile(grid)` on the active AsyncCompileMode, as Triton's JIT functions do."""

    def __init__(self, compile):
        self.compile, self.launched, self.compiled = compile, [], []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(grid)

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime import _async_compile

        return _async_compile.active_mode.get().submit(grid, lambda: self.compile(grid), self.compiled.append)


class Compiled:
    """A compiled kernel whose `run` property (Triton's loading) notes the thread that loaded it."""

    def __init__(self, grid):
        self.grid, self.loaded_on = grid, None

    @property
    def run(self):
        self.loaded_on = threading.current_thread().name
        return None


@pytest.fixture
def usable(monkeypatch):
    monkeypatch.setattr(fused, "kernels_usable", lambda x: True)
    monkeypatch.setattr(fused, "_COMPILED_AHEAD", set())


def _launching(kernel, grids):
    def fn(x):
        for grid in grids:
            fused._run(kernel, grid, x, BLOCK=16)
        return x
    return fn


needs_async_compile = pytest.mark.skipif(triton_missing or not hasattr(fused.triton, "AsyncCompileMode"),
                                         reason="needs Triton's AsyncCompileMode (3.4+)")


@needs_async_compile
def test_compile_ahead_compiles_the_launches_at_once_without_running_them(usable):
    together = threading.Barrier(4, timeout=30)  # passes only if four compiles run at the same time

    def compile(grid):
        together.wait()
        return Compiled(grid)

    kernel = FakeKernel(compile)
    grids = [(1,), (2,), (3,), (4,)]
    assert fused.compile_ahead(_launching(kernel, grids), torch.zeros(1), workers=4)
    assert kernel.launched == []
    assert sorted(k.grid for k in kernel.compiled) == grids
    assert all(k.loaded_on.startswith("lavie-compile") for k in kernel.compiled)
    fused._run(kernel, (5,), torch.zeros(1))  # outside, launches run
    assert kernel.launched == [(5,)]


@needs_async_compile
def test_compile_ahead_leaves_failed_compiles_to_the_launch(usable):
    def compile(grid):
        if grid == (2,):
            raise RuntimeError("PassManager::run failed")
        return Compiled(grid)

    kernel = FakeKernel(compile)
    assert fused.compile_ahead(_launching(kernel, [(1,), (2,), (3,)]), torch.zeros(1), key="a")
    assert sorted(k.grid for k in kernel.compiled) == [(1,), (3,)]
    # No compile mode stays active: the next call compiles ahead again.
    assert fused.compile_ahead(_launching(kernel, [(4,)]), torch.zeros(1), key="b")
    assert (4,) in [k.grid for k in kernel.compiled]


@needs_async_compile
def test_compile_ahead_runs_once_per_key(usable):
    calls = []

    def fn(x, *, scale):
        calls.append(scale)
        return x

    for key, scale in [("base", 1), ("base", 2), ("vsr", 3)]:
        fused.compile_ahead(fn, torch.zeros(1), key=key, scale=scale)
    assert calls == [1, 3]


@needs_async_compile
def test_compile_ahead_survives_a_failing_call(usable, caplog):
    def fn(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with caplog.at_level(logging.INFO, logger="lavie_core.fused"):
        assert not fused.compile_ahead(fn, torch.zeros(1))
    assert "compiling kernels ahead stopped (OutOfMemoryError: CUDA out of memory)" in caplog.text
    kernel = FakeKernel(Compiled)
    assert fused.compile_ahead(_launching(kernel, [(1,)]), torch.zeros(1))
    assert [k.grid for k in kernel.compiled] == [(1,)]


def test_compile_ahead_leaves_calls_off_cuda_alone():
    calls = []
    assert not fused.compile_ahead(lambda x: calls.append(x), torch.zeros(1))
    assert calls == []


def _compiles(monkeypatch) -> list[tuple[str, str]]:
    """(kernel, thread) of each compilation or load of this module's kernels from now on, their in-process
    caches emptied (restored afterwards): whatever ran before in this process, every launch shows."""
    for kernel in vars(fused).values():
        if isinstance(kernel, fused.triton.runtime.JITFunction):
            monkeypatch.setattr(kernel, "device_caches", collections.defaultdict(kernel.create_binder))
    events = []

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        events.append((src.name, threading.current_thread().name))

    monkeypatch.setattr(fused.triton.knobs.compilation, "listener", listener)
    return events


@pytest.mark.gpu
@on_cuda
def test_cuda_model_widths_and_row_counts_share_one_compiled_kernel(monkeypatch):
    # Channel counts, GEGLU's width and row counts are run-time values: two widths (of the same tiles) at two
    # row counts (one not a multiple of 16) compile each kernel once, not once per model width.
    events = _compiles(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float16, generator=g)

    for channels, rows in [(320, 4096), (480, 1000)]:
        x, weight, bias = randn(rows, channels), randn(channels), randn(channels)
        fused.bias_add_(x, bias, randn(rows, channels))
        fused.layer_norm(x, weight, bias, 1e-5)
        fused.concat_channels(x, randn(rows, channels))
        fused.geglu(randn(1024, channels), randn(8 * channels, channels), randn(8 * channels))
        clips = x.view(2, rows // 2, channels)
        scale, shift = fused.group_affine(fused.channel_sums(clips), weight, bias, 32, rows // 2, 1e-5)
        fused.scale_shift(clips, scale, shift)
    torch.cuda.synchronize()
    names = ["_bias_add_kernel", "_layer_norm_kernel", "_concat_channels_kernel", "_geglu_kernel",
             "_channel_sums_kernel", "_group_affine_kernel", "_scale_shift_kernel"]
    assert collections.Counter(name for name, _ in events) == dict.fromkeys(names, 1)


@pytest.mark.gpu
@on_cuda
@needs_async_compile
def test_cuda_compile_ahead_leaves_nothing_to_compile_at_the_call(monkeypatch):
    # Each kernel the call launches must come through compile_ahead (from Triton's disk cache or compiled).
    events = _compiles(monkeypatch)
    model = LaVieUNet(UNetConfig.tiny("interpolation", block_out_channels=(48, 96), norm_groups=12)).eval()
    model = model.requires_grad_(False).to("cuda", torch.float16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.config.in_channels, 5, 8, 16, generator=g).to("cuda", torch.float16)
    t, ctx = torch.tensor([500, 500], device="cuda"), torch.randn(2, 7, 32, generator=g).to("cuda", torch.float16)
    with torch.no_grad():
        assert fused.compile_ahead(model, x, t, ctx)
        ahead = list(events)
        events.clear()
        out = model(x, t, ctx)
        torch.cuda.synchronize()
    names = {name for name, _ in ahead}
    assert {"_key_frame_attention_kernel", "_temporal_attention_kernel", "_short_key_attention_kernel",
            "_channel_sums_kernel", "_group_affine_kernel", "_scale_shift_kernel"} <= names
    assert all(thread.startswith("lavie-compile") for _, thread in ahead)
    assert events == []
    assert torch.isfinite(out).all()
