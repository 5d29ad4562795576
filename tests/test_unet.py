"""The three UNets at toy width: shapes, dtypes, the official key layout, and the temporal wiring."""
import json

import pytest
import torch
from einops import rearrange

from ckpt_factory import FIXTURES, random_state_dict_for
from lavie_core import LaVieUNet, UNetConfig, blocks
from lavie_core import unet as unet_module
from lavie_core.blocks import RelativePositionBias, RotaryEmbedding, TemporalAttention, sparse_causal_attention

KINDS = ["base", "interpolation", "vsr"]


def tiny_model(kind: str, seed: int = 0, **overrides) -> LaVieUNet:
    model = LaVieUNet(UNetConfig.tiny(kind, **overrides))
    model.load_state_dict(random_state_dict_for(model, seed))
    return model.eval().requires_grad_(False)


def inputs(model: LaVieUNet, b=1, f=5, h=8, w=12, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c.in_channels, f, h, w, generator=g)
    ctx = torch.randn(b, 7, c.cross_attention_dim, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    noise = torch.full((b,), 20) if c.num_noise_levels else None
    return x, t, ctx, noise


@pytest.mark.parametrize("kind", KINDS)
def test_released_layout_has_exactly_the_official_keys_and_shapes(kind):
    schema = json.loads((FIXTURES / "schemas" / f"{kind}.json").read_text())
    with torch.device("meta"):
        model = LaVieUNet(UNetConfig.preset(kind))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {e["key"]: e["shape"] for e in schema["keys"]}
    assert got == want
    assert len(got) == schema["num_keys"]


@pytest.mark.parametrize(
    "kind,b,f,h,w",
    [
        ("base", 1, 1, 8, 8),
        ("base", 2, 5, 8, 12),
        ("base", 1, 7, 10, 6),  # odd latent side: upsampling must follow the skip sizes
        ("interpolation", 1, 9, 8, 16),
        ("interpolation", 2, 3, 6, 10),
        ("vsr", 1, 4, 8, 8),
        ("vsr", 2, 3, 12, 10),
    ],
    ids=lambda v: str(v),
)
def test_output_shape(kind, b, f, h, w):
    model = tiny_model(kind)
    out = model(*inputs(model, b, f, h, w))
    assert out.shape == (b, 4, f, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
def test_half_precision_tracks_float32(kind, dtype, tol):
    model = tiny_model(kind)
    args = inputs(model, 1, 4, 8, 8)
    ref = model(*args)
    out = model.to(dtype)(*args)
    assert out.dtype == dtype
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < tol


@pytest.mark.parametrize("kind", ["base", "vsr"])
def test_temporal_layers_are_zero_initialised(kind):
    """A fresh model's temporal attention adds nothing, so frames are processed independently
    except through GroupNorm statistics and the VSR Conv3d layers."""
    model = LaVieUNet(UNetConfig.tiny(kind))
    attr = "attn_" + model.config.temporal_attr
    outs = [m for name, m in model.named_modules() if name.endswith(attr)]
    assert outs and all(torch.count_nonzero(m.to_out[0].weight) == 0 for m in outs)
    if kind == "vsr":
        shift = [m.shift_conv for m in model.modules() if hasattr(m, "shift_conv")]
        assert len(shift) == 2 * 2 + 1 and all(torch.count_nonzero(s.weight) == 0 for s in shift)


def test_base_frames_interact_through_temporal_attention():
    model = tiny_model("base")
    x, t, ctx, _ = inputs(model, 1, 4, 8, 8)
    out = model(x, t, ctx)
    x2 = x.clone()
    x2[:, :, 3] += 1.0
    out2 = model(x2, t, ctx)
    assert (out2[:, :, 0] - out[:, :, 0]).abs().max() > 1e-4


def test_sparse_causal_attention_looks_only_backwards():
    """Frame i attends to frames 0 and i-1 only: changing the last frame changes nothing before it,
    changing frame 2 changes frame 3, and frame 1 ignores frame 2."""
    attn = next(m.attn1 for m in tiny_model("interpolation").modules() if hasattr(m, "attn_temp"))
    h = torch.randn(4, 6, attn.to_q.in_features)
    ref = sparse_causal_attention(attn, h, 4)
    last = h.clone()
    last[3] += 1
    changed = sparse_causal_attention(attn, last, 4)
    assert torch.equal(ref[:3], changed[:3]) and not torch.allclose(ref[3], changed[3])
    mid = h.clone()
    mid[2] += 1
    changed = sparse_causal_attention(attn, mid, 4)
    assert not torch.allclose(changed[3], ref[3]) and torch.equal(changed[1], ref[1])


@pytest.mark.parametrize("module", ["attn1", "attn_temp"], ids=["spatial", "temporal"])
def test_self_attention_projects_q_k_v_in_one_matmul_with_the_current_weights(module):
    """One matmul gives what the three projections give, and a weight changed in place (as LoRA patches
    are) is used at the next call, not a concatenation cached before it."""
    attn = getattr(next(m for m in tiny_model("base").modules() if hasattr(m, "attn_temp")), module)
    x = torch.randn(3, 5, attn.to_q.in_features)
    for _ in range(2):
        one_matmul = attn.project(x)
        separate = (attn.to_q(x), attn.to_k(x), attn.to_v(x))
        for got, want in zip(one_matmul, separate):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            attn.to_k.weight.add_(torch.randn_like(attn.to_k.weight))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "inference"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 4, 1, 1), (3, 2, 5, 3)], ids=["4x6", "1x1", "5x3"])
def test_upsample_conv_equals_convolving_the_nearest_upsampled_image(shape, bias, layout, grad):
    n, c, h, w = shape
    conv = torch.nn.Conv2d(c, 5, 3, padding=1, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.set_grad_enabled(grad):
        want = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        got = blocks.upsample_conv(x, conv)
    assert got.requires_grad == grad
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # A 1x1 image is both layouts at once; it stays channels-last, as the UNet runs.
    assert got.is_contiguous(memory_format=torch.channels_last if h * w == 1 else layout)


# blocks.conv: module, input shape, stored channels-last. 1x1 convolutions of channels-last inputs run as
# matmuls; the rest, and other layouts, as convolutions.
CONV_CASES = [
    pytest.param(torch.nn.Conv2d(6, 5, 1), (2, 6, 4, 3), True, id="pointwise-matmul"),
    pytest.param(torch.nn.Conv2d(6, 5, 1), (2, 6, 4, 3), False, id="pointwise-default-layout"),
    pytest.param(torch.nn.Conv2d(6, 5, 1, stride=2), (2, 6, 4, 3), True, id="strided-pointwise"),
    pytest.param(torch.nn.Conv2d(6, 5, 3, padding=1), (2, 6, 4, 3), True, id="3x3"),
    pytest.param(torch.nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0)), (2, 6, 3, 4, 3), True, id="temporal-3d"),
    pytest.param(torch.nn.Conv3d(6, 5, 1), (2, 6, 3, 4, 3), True, id="pointwise-3d"),
]


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "alone"])
@pytest.mark.parametrize("bias,extra", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["bias", "no-bias", "bias-and-extra", "extra-only"])
@pytest.mark.parametrize("module,shape,channels_last", CONV_CASES)
def test_conv_is_the_module_plus_the_residual(module, shape, channels_last, bias, extra, with_residual):
    module = module.double()
    fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    extra_bias = torch.randn(module.out_channels, generator=g, dtype=torch.float64) if extra else None
    total = module.bias if bias else None
    if extra_bias is not None:
        total = extra_bias if total is None else total + extra_bias
    want = module._conv_forward(x, module.weight, total)
    residual = torch.randn(want.shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    with torch.no_grad():
        got = blocks.conv(module, x, residual=residual if with_residual else None, bias=bias, extra_bias=extra_bias)
    torch.testing.assert_close(got, want + residual if with_residual else want, rtol=0, atol=1e-12)
    # Never a layout change the plain path avoids: a sum keeps the residual's layout; alone, the result has at
    # least the convolution's (a CPU Conv3d returns the default layout, a matmul of rows channels-last).
    plain = residual if with_residual else want
    assert got.is_contiguous(memory_format=fmt) or not plain.is_contiguous(memory_format=fmt)


def test_resnet_block_folds_conv1_bias_into_the_norm():
    """conv1 runs without its bias, which norm2's offset carries: the block (given the SiLU of the time
    embedding, which the UNet computes once) equals the unfolded formula."""
    block = blocks.ResnetBlock(8, 12, 16, groups=4, eps=1e-6).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 3, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    temb = torch.randn(2, 16, dtype=torch.float64)
    frames = lambda t: rearrange(t, "b c f h w -> (b f) c h w")  # noqa: E731
    video = lambda t: rearrange(t, "(b f) c h w -> b c f h w", b=2)  # noqa: E731
    silu_norm = lambda t, norm: torch.nn.functional.silu(torch.nn.functional.group_norm(t, 4, norm.weight, norm.bias, 1e-6))  # noqa: E731
    with torch.no_grad():
        h = video(torch.nn.functional.conv2d(frames(silu_norm(x, block.norm1)), block.conv1.weight, block.conv1.bias, padding=1))
        h = h + block.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None, None]
        h = video(torch.nn.functional.conv2d(frames(silu_norm(h, block.norm2)), block.conv2.weight, block.conv2.bias, padding=1))
        skip = video(torch.nn.functional.conv2d(frames(x), block.conv_shortcut.weight, block.conv_shortcut.bias))
        torch.testing.assert_close(block(x, torch.nn.functional.silu(temb)), skip + h, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [(8, 12), (7, 11)], ids=["twice", "skip-sized"])
def test_unet_upsample_uses_the_current_weights_at_any_skip_size(size):
    """Both paths (phase convolutions at exactly twice the size, upsampling otherwise) equal the plain
    upsample-then-convolve, also after the weights change in place as LoRA patches change them."""
    up = blocks.Upsample(4).double()
    x = torch.randn(2, 4, 3, 4, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    for _ in range(2):
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        plain = torch.nn.functional.conv2d(
            torch.nn.functional.interpolate(frames, size=size, mode="nearest"), up.conv.weight, up.conv.bias, padding=1
        )
        got = up(x, size)
        torch.testing.assert_close(got, rearrange(plain, "(b f) c h w -> b c f h w", b=2), rtol=0, atol=1e-12)
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            up.conv.weight.add_(torch.randn_like(up.conv.weight))


def test_relative_position_buckets_match_t5_layout():
    rel = RelativePositionBias(heads=8, num_buckets=32, max_distance=32)
    b = rel.buckets(40, torch.device("cpu"))
    q = 20
    # keys in the past (k < q): 0..7 exact, log-spaced up to 15
    assert [int(b[q, q - d]) for d in range(8)] == list(range(8))
    assert int(b[q, 0]) == 8 + 5  # distance 20: 8 + floor(log(20/8) / log(4) * 8)
    assert int(b[39, 0]) == 15 and int(b[39, 7]) == 15  # distances >= 32 share the last bucket
    # keys in the future: 16 + d for d < 8, then log-spaced; bucket 16 (distance 0 forward) is never used
    assert [int(b[q, q + d]) for d in range(1, 8)] == [17, 18, 19, 20, 21, 22, 23]
    assert int(b[0, 8]) == 24 and int(b[0, 15]) == 27 and int(b[0, 16]) == 28 and int(b[0, 39]) == 31
    assert 16 not in b.unique().tolist()


def test_rotary_rotates_pairs_by_position_and_keeps_the_tail():
    rot = RotaryEmbedding(4)
    x = torch.zeros(1, 1, 3, 6)
    x[..., 0] = 1.0  # first pair (x0, x1) = (1, 0)
    x[..., 5] = 7.0  # beyond the rotary dims: untouched
    out = rot.rotate(x)
    for p in range(3):
        angle = p * rot.freqs[0]
        assert torch.allclose(out[0, 0, p, :2], torch.stack([angle.cos(), angle.sin()]), atol=1e-6)
    assert torch.equal(out[..., 5], x[..., 5])
    # rotation preserves norms and relative angles: q_i . k_j depends on i - j only
    q = torch.randn(1, 1, 1, 4).expand(1, 1, 5, 4)
    r = rot.rotate(q)
    dots = torch.einsum("d,nd->n", r[0, 0, 2], r[0, 0]).tolist()
    dots2 = torch.einsum("d,nd->n", r[0, 0, 3], r[0, 0]).tolist()
    assert dots[1] == pytest.approx(dots2[2], abs=1e-5) and dots[0] == pytest.approx(dots2[1], abs=1e-5)


def test_position_tables_are_computed_once_per_frame_count_without_gradients():
    rot, rel = RotaryEmbedding(4), RelativePositionBias(heads=2)
    cpu = torch.device("cpu")
    with torch.no_grad():
        cos, sin = rot.table(5, cpu)
        buckets = rel.buckets(5, cpu)
        assert rot.table(5, cpu)[0] is cos and rel.buckets(5, cpu) is buckets
        assert rot.table(6, cpu)[0].shape == (6, 4) and rel.buckets(6, cpu).shape == (6, 6)
        fresh_cos, fresh_sin = rot._table(5, cpu)
        assert torch.equal(cos, fresh_cos) and torch.equal(sin, fresh_sin)
        assert torch.equal(buckets, rel._buckets(5, cpu))
        rot.freqs.mul_(2)  # a buffer changed in place is read anew
        assert torch.equal(rot.table(5, cpu)[0], rot._table(5, cpu)[0])
        assert not torch.equal(rot.table(5, cpu)[0], cos)
        for frames in range(7, 30):
            rel.buckets(frames, cpu)
        assert len(rel._position_cache) == 8
    # Where a gradient may be recorded the tables are new tensors: one made under inference mode could not be
    # saved for backward.
    with torch.inference_mode():
        rot.table(3, cpu)
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    rot.rotate(q).sum().backward()
    assert rot.table(3, cpu)[0] is not rot.table(3, cpu)[0]
    assert q.grad is not None


def test_position_tables_of_a_model_loaded_under_inference_mode():
    # ComfyUI loads and runs models under inference mode, where buffers keep no version counter.
    with torch.inference_mode():
        rot = RotaryEmbedding(4)
        cos, _ = rot.table(5, torch.device("cpu"))
        assert rot.table(5, torch.device("cpu"))[0] is cos
    with torch.no_grad():
        assert torch.equal(rot.table(5, torch.device("cpu"))[0], cos)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [2, 3])
def test_several_contexts_per_sample_equal_the_repeated_batch(kind, groups):
    """x once with n contexts per sample gives what x repeated n times gives: the text-free prefix is shared."""
    model = tiny_model(kind)
    x, t, _, noise = inputs(model, 2, 3, 8, 8)
    ctx = torch.randn(groups * 2, 7, model.config.cross_attention_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        shared = model(x, t, ctx, noise)
        repeated = model(x.repeat(groups, 1, 1, 1, 1), t.repeat(groups), ctx, None if noise is None else noise.repeat(groups))
    assert shared.shape == repeated.shape == (groups * 2, 4, 3, 8, 8)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shared[:2], shared[2:4], atol=1e-3)  # the contexts still matter


def first_transformer(model: LaVieUNet) -> blocks.SpatialTransformer:
    return next(m for m in model.modules() if isinstance(m, blocks.SpatialTransformer))


@pytest.mark.parametrize(
    "kind,frame_attention_rows", [("base", "b f"), ("interpolation", "b f"), ("vsr", "n b f")],
    ids=["base-self-attention", "interpolation-sparse-causal", "vsr-text-attention"],
)
def test_first_transformer_runs_its_text_free_layers_once_per_video(kind, frame_attention_rows):
    """With two texts per video, the first transformer's norm and projection in, and a frame attention that
    does not read the text, see each video once; the text attention sees both conditionings."""
    model = tiny_model(kind)
    x, t, _, noise = inputs(model, 2, 3, 8, 8)
    ctx = torch.randn(4, 7, model.config.cross_attention_dim)
    transformer = first_transformer(model)
    block = transformer.transformer_blocks[0]
    rows = {}

    def record(name):
        def hook(module, args):
            rows.setdefault(name, args[0].shape[0])
        return hook

    for name, module in [("norm", transformer.norm), ("norm1", block.norm1), ("norm2", block.norm2)]:
        module.register_forward_pre_hook(record(name))
    with torch.no_grad():
        model(x, t, ctx, noise)
    b, n, f = 2, 2, 3
    assert rows == {"norm": b * f, "norm1": {"b f": b * f, "n b f": n * b * f}[frame_attention_rows], "norm2": n * b * f}


@pytest.mark.parametrize("kind", ["base", "interpolation"])
@pytest.mark.parametrize("texts", [1, 2], ids=["one-text", "two-texts"])
def test_transformer_takes_input_with_its_output_bias_added_and_overwrites_it(kind, texts):
    model = tiny_model(kind).use_channels_last()
    transformer = first_transformer(model)
    c = transformer.proj_out.weight.shape[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, 3, 4, 6, generator=g).contiguous(memory_format=torch.channels_last_3d)
    ctx = torch.randn(2 * texts, 7, model.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert transformer.folds_output_bias()
        want = transformer(x, ctx)
        biased = x + transformer.proj_out.bias.view(1, c, 1, 1, 1)
        got = transformer(biased, ctx, biased=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # One text: the output is written over the input; two: over the repeated residual, not the input.
    assert (got.data_ptr() == biased.data_ptr()) == (texts == 1)


def test_transformer_refuses_biased_input_where_it_cannot_fold_the_bias():
    model = tiny_model("vsr")
    transformer = first_transformer(model)  # a temporal resblock reads the input before the norm
    x = torch.randn(1, transformer.proj_out.weight.shape[0], 2, 4, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="biased input needs .*no temporal resblock"):
        transformer(x, torch.randn(1, 7, model.config.cross_attention_dim), biased=True)


def test_transformer_rejects_a_context_batch_that_is_not_a_multiple_of_the_videos():
    model = tiny_model("base")
    transformer = first_transformer(model)
    x = torch.randn(2, transformer.proj_out.weight.shape[0], 2, 4, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="context holds 3 samples, not a multiple of the video's 2"):
        transformer(x, torch.randn(3, 7, model.config.cross_attention_dim))


@pytest.mark.parametrize("kind", KINDS)
def test_resnet_output_bias_is_added_exactly(kind):
    model = tiny_model(kind)
    resnet = model.down_blocks[1].resnets[0]
    c_in, c_out = resnet.norm1.num_channels, resnet.conv2.out_channels
    x, temb = torch.randn(1, c_in, 2, 4, 4), torch.randn(1, resnet.time_emb_proj.in_features)
    extra = torch.randn(c_out)
    with torch.no_grad():
        torch.testing.assert_close(resnet(x, temb, out_bias=extra), resnet(x, temb) + extra.view(1, -1, 1, 1, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_large_upper_levels_run_one_sample_at_a_time_with_the_same_result(kind, monkeypatch):
    model = tiny_model(kind)
    x, t, ctx, noise = inputs(model, 2, 3, 8, 8)
    ctx = torch.cat([ctx, -ctx])  # guidance: two texts per video, four samples from the upper levels on
    batches = []
    model.conv_out.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    with torch.no_grad():
        whole = model(x, t, ctx, noise)
        monkeypatch.setattr(unet_module, "SPLIT_BATCH_MIN_NUMEL", 1)
        split = model(x, t, ctx, noise)
    assert batches == [4, 1, 1, 1, 1]
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_convolutions_see_channels_last_video_through_the_shared_prefix(kind, monkeypatch):
    """Widening the batch for several contexts must not drop the layout cuDNN's fast kernels need."""
    seen = []
    forward = blocks.FrameConv2d.forward

    def spy(self, x, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last_3d))
        return forward(self, x, **kwargs)

    monkeypatch.setattr(blocks.FrameConv2d, "forward", spy)
    model = tiny_model(kind).use_channels_last()
    x, t, _, noise = inputs(model, 1, 3, 8, 8)
    with torch.no_grad():
        model(x, t, torch.randn(2, 7, model.config.cross_attention_dim), noise)
    assert len(seen) > 10 and all(seen)


@pytest.mark.parametrize(
    "kind,kwargs,match",
    [
        ("base", dict(channels=3), r"expects x shaped \[B, 4, F, H, W\]"),
        ("vsr", dict(noise=None), "needs a noise_level"),
        ("vsr", dict(noise=351), r"noise_level must be in 0\.\.350"),
        ("base", dict(ctx_dim=16), r"context shaped \[B, tokens, 32\]"),
        ("base", dict(ctx_batch=3), r"batch of context \(3\) must equal the batch of x \(2\) or a multiple"),
    ],
    ids=["wrong-channels", "vsr-no-noise-level", "vsr-noise-level-too-high", "wrong-context-dim", "context-batch"],
)
def test_bad_inputs_are_named(kind, kwargs, match):
    model = tiny_model(kind)
    x, t, ctx, noise = inputs(model, 2, 2, 8, 8)
    if "ctx_batch" in kwargs:
        ctx = ctx[:1].expand(kwargs["ctx_batch"], -1, -1)
    if "channels" in kwargs:
        x = x[:, : kwargs["channels"]]
    if "ctx_dim" in kwargs:
        ctx = ctx[..., : kwargs["ctx_dim"]]
    if "noise" in kwargs:
        noise = kwargs["noise"]
    with pytest.raises(ValueError, match=match):
        model(x, t, ctx, noise)


def test_config_json_round_trip_and_validation():
    for kind in KINDS:
        for cfg in (UNetConfig.preset(kind), UNetConfig.tiny(kind)):
            assert UNetConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="kind must be one of"):
        UNetConfig(kind="upscaler", in_channels=4)
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig.tiny("base", attention_levels=(True,))
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_json('{"kind": "base", "in_channels": 4, "colour": 1}')


def test_image_frames_skip_temporal_attention():
    """Joint image-video training: appended still frames pass the temporal attention untouched and do
    not influence the video frames' temporal attention."""
    block = next(m for m in tiny_model("base").modules() if hasattr(m, "attn_temp"))
    x = torch.randn(4 * 2, 6, block.norm1.normalized_shape[0])  # (b f) l c with b=2, f=4
    out = block.temporal(x, frames=4, image_frames=2)
    frames = out.unflatten(0, (2, 4))
    assert torch.equal(frames[:, 2:], x.unflatten(0, (2, 4))[:, 2:])
    video_only = block.temporal(x.unflatten(0, (2, 4))[:, :2].flatten(0, 1), frames=2)
    torch.testing.assert_close(frames[:, :2], video_only.unflatten(0, (2, 2)))
    assert not torch.allclose(block.temporal(x, frames=4)[2:4], x[2:4])
    model = tiny_model("base")
    args = inputs(model, 1, 4, 8, 8)
    assert model(*args, image_frames=1).shape == model(*args).shape


def _layer_norm_with_offset(x, weight, bias, eps, *, offset=None):
    """fused.layer_norm's arithmetic in torch (`x + offset` normalised), for the CPU."""
    shifted = x if offset is None else x + offset.to(x.dtype)
    return torch.nn.functional.layer_norm(shifted, (x.shape[-1],), weight, bias, eps)


def _stream_path_on_cpu(monkeypatch) -> list:
    """Make every transformer take its bias-folding stream path on the CPU, and record each time one does."""
    monkeypatch.setattr(blocks.LayerNorm, "fused_for", lambda self, x: True)
    monkeypatch.setattr(blocks.fused, "layer_norm", _layer_norm_with_offset)
    monkeypatch.setattr(blocks.TemporalAttention, "reads_video_tokens", lambda self, x, frames: True)
    calls = []
    folded = blocks.SpatialTransformer._blocks_folded
    monkeypatch.setattr(
        blocks.SpatialTransformer, "_blocks_folded", lambda self, *a: calls.append(type(self)) or folded(self, *a)
    )
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_transformer_stream_with_folded_biases_equals_the_residual_adds(kind, monkeypatch):
    """The stream path (branches added into the stream in place, biases added ahead by the projection in and
    taken off by each LayerNorm) computes the same UNet output."""
    model = tiny_model(kind)
    for name, p in model.named_parameters():  # the temporal output projections start at zero
        if "to_out" in name or name.endswith("net.2.bias"):
            torch.nn.init.normal_(p, std=0.3)
    args = inputs(model, 2, 5, 8, 12)
    with torch.no_grad():
        want = model(*args)
        calls = _stream_path_on_cpu(monkeypatch)
        got = model(*args)
    assert len(calls) == sum(isinstance(m, blocks.SpatialTransformer) for m in model.modules()) > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_residual_product_added_in_place_counts_the_flops_of_the_linear_layer():
    from torch.utils.flop_counter import FlopCounterMode

    linear = torch.nn.Linear(12, 8)
    x, a = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    with torch.no_grad(), FlopCounterMode(display=False) as in_place:
        got = blocks.add_product_(x.clone(), a, linear.weight)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        want = x + linear(a) - linear.bias
    assert in_place.get_total_flops() == plain.get_total_flops() == 2 * 10 * 12 * 8
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "grad,image_frames,norm_fused,expected",
    [
        pytest.param(False, 0, True, True, id="inference"),
        pytest.param(True, 0, True, False, id="grad-enabled"),
        pytest.param(False, 1, True, False, id="image-frames"),
        pytest.param(False, 0, False, False, id="torch-layer-norm"),
    ],
)
def test_biases_fold_only_without_gradients_on_layer_norm_kernels(monkeypatch, grad, image_frames, norm_fused, expected):
    block = next(m for m in tiny_model("base").modules() if isinstance(m, blocks.TransformerBlock))
    monkeypatch.setattr(blocks.LayerNorm, "fused_for", lambda self, x: norm_fused)
    monkeypatch.setattr(blocks.TemporalAttention, "reads_video_tokens", lambda self, x, frames: True)
    with torch.set_grad_enabled(grad):
        assert block.folds_biases(torch.zeros(8, 6, 32), 4, image_frames) is expected


@pytest.mark.parametrize("fold_from", [0, 2**62], ids=["folded", "added"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape", [(2, 64, 3, 5, 4), (3, 64, 6, 5)], ids=["video", "images"])
def test_group_norm_matches_torch_and_absorbs_an_offset(monkeypatch, shape, silu, fold_from):
    monkeypatch.setattr(blocks, "FOLD_OFFSET_MIN_NUMEL", fold_from)
    torch.manual_seed(0)
    norm = blocks.VideoGroupNorm(8, 64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(shape) * 2 + 0.5
    offset = torch.randn(shape[0], 64) * 3  # a time embedding, large against the activations' spread
    bias = torch.randn(64)  # a per-channel offset (a bias) on top of it, or alone
    act = torch.nn.functional.silu if silu else (lambda t: t)
    for t, c in ((None, None), (offset, None), (None, bias), (offset, bias)):
        full = x if t is None else x + t.view(*t.shape, *[1] * (x.ndim - 2))
        full = full if c is None else full + c.view(64, *[1] * (x.ndim - 2))
        expected = act(torch.nn.functional.group_norm(full, 8, norm.weight, norm.bias, 1e-6))
        torch.testing.assert_close(norm(x, silu=silu, offset=t, channel_offset=c), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "positions, max_heads",
    [
        pytest.param(True, None, id="rotary-and-bias-matmul"),
        pytest.param(False, None, id="plain-sdpa"),
        pytest.param(False, 4, id="plain-sdpa-in-pixel-groups"),
    ],
)
def test_temporal_attention_on_video_tokens_equals_pixel_grouped(monkeypatch, positions, max_heads):
    if max_heads is not None:
        monkeypatch.setattr(blocks, "SDPA_MAX_HEADS", max_heads)  # 2 heads: pixel groups of 2, 3 pixels
    torch.manual_seed(0)
    attn = TemporalAttention(16, 2, RotaryEmbedding(8) if positions else None, RelativePositionBias(2) if positions else None)
    torch.nn.init.normal_(attn.to_out[0].weight, std=0.2)
    video = torch.randn(2, 5, 3, 16)  # b f l c
    expected = rearrange(attn(rearrange(video, "b f l c -> (b l) f c")), "(b l) f c -> b f l c", l=3)
    torch.testing.assert_close(attn(video), expected)
    # Frames and pixels differ after attention, so a frame/pixel mix-up would show.
    assert not torch.allclose(expected[:, 1:], expected[:, :1].expand_as(expected[:, 1:]))
    assert not torch.allclose(expected[:, :, 1:], expected[:, :, :1].expand_as(expected[:, :, 1:]))


@pytest.mark.parametrize("kind", KINDS)
def test_the_unet_traces_as_one_graph(kind):
    # A graph break (a data-dependent check, a Python-side value read) splits torch.compile's graph and
    # costs fusion and a device sync per call; fullgraph=True turns any break into an error.
    model = tiny_model(kind)
    x, t, ctx, noise = inputs(model, 1, 3, 8, 8)
    ctx = torch.cat([ctx, -ctx])  # guidance: one video, two texts
    traced = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(traced(x, t, ctx, noise), model(x, t, ctx, noise))


def test_compiled_unet_compiles_once_per_shape(monkeypatch):
    import einops
    from torch._dynamo.utils import counters

    from lavie_core import compile_unet

    # A fresh process: einops has seen no tensor type yet (it records each new one in a dict that
    # torch.compile guards on; a type first seen inside the traced call would make the next call recompile).
    monkeypatch.setattr(einops._backends, "_type2backend", {})
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("vsr")
    x, t, ctx, noise = inputs(model, 1, 3, 8, 8)
    compiled = compile_unet(model, backend="eager")
    with torch.no_grad():
        for step in range(3):
            compiled(x, t + step, torch.cat([ctx, -ctx]), noise)
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_unet_keeps_compiling_new_shapes_past_torchs_default_limit():
    from torch._dynamo.utils import counters

    from lavie_core import compile_unet
    from lavie_core.unet import RECOMPILE_LIMIT

    class Scale(torch.nn.Module):  # a fresh forward: the limit counts graphs per function
        def forward(self, x):
            return x * 2

    # torch's config module, not pytest's monkeypatch: undoing a monkeypatch hides the setting.
    with torch._dynamo.config.patch(recompile_limit=2):
        counters.clear()
        compiled = compile_unet(Scale(), backend="eager")
        shapes = [(n,) for n in range(1, 6)]
        for shape in shapes:
            compiled(torch.ones(shape))
        # At the limit of 2 the third shape would have run eagerly, uncompiled.
        assert counters["stats"]["unique_graphs"] == len(shapes)
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT


def test_compile_unet_wraps_the_same_module_without_compiling_yet():
    from lavie_core import compile_unet

    model = tiny_model("base")
    compiled = compile_unet(model)  # Inductor compiles on the first call only (minutes on CPU: not made here)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    assert compiled.config is model.config


def _random_resnet(c_in: int, c_out: int, seed: int = 0) -> blocks.ResnetBlock:
    torch.manual_seed(seed)
    resnet = blocks.ResnetBlock(c_in, c_out, temb_dim=8, groups=4, eps=1e-6)
    for p in resnet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return resnet.eval().requires_grad_(False)


@pytest.mark.parametrize("b", [1, 2], ids=["one-sample", "two-samples"])
@pytest.mark.parametrize(
    "c_out,overwrite", [(16, True), (24, False)], ids=["identity-skip-overwritten", "shortcut-product"]
)
def test_resnet_block_frame_by_frame_equals_the_whole_video(monkeypatch, b, c_out, overwrite):
    resnet = _random_resnet(16, c_out)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 16, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
    emb, extra = torch.randn(b, 8, generator=g), torch.randn(c_out, generator=g)
    frames = []
    conv2 = resnet.conv2.forward
    monkeypatch.setattr(resnet.conv2, "forward", lambda h, **kw: frames.append(h.shape[0] * h.shape[2]) or conv2(h, **kw))
    got_x = x.clone()
    with torch.no_grad():
        want = resnet(x.clone(), emb, out_bias=extra)
        monkeypatch.setattr(blocks, "RESNET_BY_FRAME_MIN_NUMEL", 0)
        frames.clear()
        got = resnet(got_x, emb, out_bias=extra, overwrite=overwrite)
    assert frames == [1] * (b * 3)
    assert (got.data_ptr() == got_x.data_ptr()) == overwrite  # the output took the input's memory
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "grad,shape,layout",
    [(True, (1, 16, 3, 4, 5), torch.channels_last_3d), (False, (1, 16, 3, 4, 5), torch.contiguous_format),
     (False, (1, 16, 1, 4, 5), torch.channels_last_3d)],
    ids=["needs-gradient", "not-channels-last", "one-frame"],
)
def test_resnet_block_runs_whole_where_frames_would_not_pay_or_are_not_allowed(monkeypatch, grad, shape, layout):
    resnet = _random_resnet(16, 16).requires_grad_(grad)
    monkeypatch.setattr(blocks, "RESNET_BY_FRAME_MIN_NUMEL", 0)
    x = torch.randn(shape).contiguous(memory_format=layout)
    assert not resnet._by_frame(x, overwrite=True)
    with torch.set_grad_enabled(grad):
        kept = x.clone()
        resnet(x, torch.randn(1, 8), overwrite=True)
    assert torch.equal(x, kept)
    assert not _random_resnet(16, 16)._by_frame(x.requires_grad_(False), overwrite=False)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_temporal_resblock_output_goes_over_its_input_only_without_gradients(grad):
    torch.manual_seed(0)
    block = blocks.TemporalConvBlock(16, None, groups=4)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 16, 4, 3, 5).contiguous(memory_format=torch.channels_last_3d)
    with torch.set_grad_enabled(grad):
        want = block(x.clone())
        got_x = x.clone()
        got = block(got_x, overwrite=True)
    assert (got.data_ptr() == got_x.data_ptr()) != grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rows,inner,limit,sizes",
    [(10, 4, 40, [10]), (10, 4, 39, [5, 5]), (10, 4, 12, [3, 3, 2, 2]), (7, 64, 1, [1] * 7)],
    ids=["fits-at-once", "just-over", "uneven", "row-by-row"],
)
def test_stream_pieces_are_contiguous_row_blocks_within_the_limit(monkeypatch, rows, inner, limit, sizes):
    monkeypatch.setattr(blocks, "FF_PIECE_ELEMENTS", limit)
    x = torch.randn(1, rows, 3)
    pieces = blocks.stream_pieces(x, inner)
    assert [p.shape[0] for p in pieces] == sizes
    assert all(p.is_contiguous() and p.shape[1] == 3 for p in pieces)
    assert torch.equal(torch.cat(pieces), x.reshape(-1, 3))
    assert pieces[0].data_ptr() == x.data_ptr()  # views of the stream: the feed-forward adds into it


@pytest.mark.parametrize("kind", KINDS)
def test_unet_with_memory_saving_pieces_everywhere_equals_the_whole_path(kind, monkeypatch):
    """Resnets frame by frame and feed-forwards in row pieces (as at the VSR's paper sizes) change no output."""
    model = tiny_model(kind).use_channels_last()
    for name, p in model.named_parameters():  # the temporal output projections start at zero
        if "to_out" in name or name.endswith("net.2.bias") or "shift_conv" in name:
            torch.nn.init.normal_(p, std=0.3)
    x, t, ctx, noise = inputs(model, 1, 4, 8, 12)
    args = (x, t, torch.cat([ctx, -ctx]), noise)
    _stream_path_on_cpu(monkeypatch)
    with torch.no_grad():
        want = model(*args)
        monkeypatch.setattr(blocks, "RESNET_BY_FRAME_MIN_NUMEL", 0)
        monkeypatch.setattr(blocks, "FF_PIECE_ELEMENTS", 2000)
        by_frame, by_piece = [], []
        frames = blocks.ResnetBlock._forward_by_frame
        pieces = blocks.stream_pieces
        monkeypatch.setattr(blocks.ResnetBlock, "_forward_by_frame", lambda *a: by_frame.append(1) or frames(*a))
        monkeypatch.setattr(blocks, "stream_pieces", lambda *a: by_piece.append(len(pieces(*a))) or pieces(*a))
        got = model(*args)
    assert by_frame and max(by_piece) > 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
