"""The cascade stages with tiny random UNets: shapes, seeding, official parity, tiling, progress, errors."""
import math
from contextlib import contextmanager

import pytest
import torch

from lavie_core import pipeline as P
from lavie_core import schedules as S
from lavie_core.config import UNetConfig
from lavie_core.tiling import tile_spans
from test_unet import tiny_model

torch.set_num_threads(1)

DIM = 32  # cross-attention width of the tiny configs


@pytest.fixture(scope="module")
def base():
    return tiny_model("base")


@pytest.fixture(scope="module")
def interp():
    return tiny_model("interpolation")


@pytest.fixture(scope="module")
def vsr():
    return tiny_model("vsr")


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _text(seed, batch=1, tokens=77):
    return _randn(batch, tokens, DIM, seed=seed)


def _low_res(b=1, f=3, h=8, w=12, seed=11):
    return (torch.rand((b, 3, f, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1)


@contextmanager
def spy(model):
    """Record the inputs of every forward call of ``model``."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(
            {
                "x": args[0].detach().clone(),
                "t": torch.as_tensor(args[1]).detach().clone(),
                "context": args[2].detach().clone(),
                "noise_level": kwargs.get("noise_level"),
            }
        )

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


class Cancelled(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Hand-written official samplers in alpha (VP) form, for parity
# ---------------------------------------------------------------------------------------------


def official_t2v_ddim(unet, cond, uncond, latents, steps, scale):
    """diffusers 0.16 DDIM (eta 0, set_alpha_to_one False, steps_offset 1), CFG batch [uncond, cond]."""
    ac = S.LAVIE_DIFFUSERS_SCHEDULE.alphas_cumprod.tolist()
    ratio = 1000 // steps
    text = torch.cat([uncond.expand(latents.shape[0], -1, -1), cond.expand(latents.shape[0], -1, -1)])
    for t in [i * ratio + 1 for i in reversed(range(steps))]:
        out = unet(torch.cat([latents, latents]), torch.tensor([t] * 2 * latents.shape[0]), text)
        eps_u, eps_c = out.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        a = ac[t]
        a_prev = ac[t - ratio] if t - ratio >= 0 else ac[0]
        x0 = (latents - math.sqrt(1 - a) * eps) / math.sqrt(a)
        latents = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return latents


def official_interpolation_ddim(unet, key_latents, cond, uncond, x, steps, scale):
    """guided-diffusion DDIM on the respaced grid, copied conditioning, CFG batch [cond, uncond]."""
    copied = key_latents.repeat_interleave(4, dim=2)[:, :, 1:-2]  # repeat 4x, drop first and last two
    kept = S.respaced_timesteps(steps).tolist()
    ac = S.LAVIE_SCHEDULE.alphas_cumprod.tolist()
    respaced = [ac[t] for t in kept]
    prev = [1.0] + respaced[:-1]
    for i in reversed(range(len(kept))):
        inp = torch.cat([x, copied], dim=1)
        out = unet(torch.cat([inp, inp]), torch.tensor([kept[i]] * 2), torch.cat([cond, uncond]))
        eps_c, eps_u = out.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        a, a_prev = respaced[i], prev[i]
        x0 = math.sqrt(1 / a) * x - math.sqrt(1 / a - 1) * eps
        eps = (math.sqrt(1 / a) * x - x0) / math.sqrt(1 / a - 1)
        x = x0 * math.sqrt(a_prev) + math.sqrt(1 - a_prev) * eps
    return x


def official_vsr_ddim(unet, low_res_noisy, cond, uncond, latents, steps, scale, noise_level):
    """diffusers 0.16 DDIM with v-prediction on [latent, noisy low-res], CFG batch [uncond, cond]."""
    ac = S.LAVIE_DIFFUSERS_SCHEDULE.alphas_cumprod.tolist()
    ratio = 1000 // steps
    for t in [i * ratio + 1 for i in reversed(range(steps))]:
        inp = torch.cat([torch.cat([latents, latents]), torch.cat([low_res_noisy, low_res_noisy])], dim=1)
        v_u, v_c = unet(inp, torch.tensor([t, t]), torch.cat([uncond, cond]), noise_level=noise_level).chunk(2)
        v = v_u + scale * (v_c - v_u)
        a = ac[t]
        a_prev = ac[t - ratio] if t - ratio >= 0 else ac[0]
        x0 = math.sqrt(a) * latents - math.sqrt(1 - a) * v
        eps = math.sqrt(a) * v + math.sqrt(1 - a) * latents
        latents = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return latents


def diffusers_low_res_noise(low_res, noise, level):
    """diffusers DDPMScheduler(scaled_linear, 1e-4 .. 0.02).add_noise, float32."""
    betas = torch.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=torch.float32) ** 2
    a = torch.cumprod(1.0 - betas, dim=0)[level]
    return a**0.5 * low_res + (1 - a) ** 0.5 * noise


# ---------------------------------------------------------------------------------------------
# Official parity
# ---------------------------------------------------------------------------------------------


PRECISIONS = [torch.float64, torch.float32]
PRECISION_IDS = ["float64-unet", "float32-unet"]


def unet_in(kind, dtype):
    """A tiny UNet in ``dtype``; float64 isolates the algorithm from rounding."""
    return tiny_model(kind).to(dtype)


def assert_close_to_largest(got, expected, tol):
    """``max |got - expected| <= tol * max |expected|``.

    Random tiny eps-models predict x0 values up to ~|100| early in sampling (x0 = (x - sqrt(1-a)
    eps) / sqrt(a) amplifies rounding up to 157x at t=999), so elementwise tolerances on small
    entries measure float32 luck rather than the algorithm. A wrong timestep, grid, CFG order or
    parametrisation moves the result by O(1) of its scale.
    """
    assert got.shape == expected.shape
    err, scale = float((got - expected).abs().max()), float(expected.abs().max())
    assert err <= tol * scale, f"max error {err:.3g} exceeds {tol:g} x max |expected| {scale:.3g}"


@pytest.mark.parametrize("steps, batch", [(4, 1), (7, 2)], ids=["4steps", "7steps-batch2"])
@pytest.mark.parametrize("dtype", PRECISIONS, ids=PRECISION_IDS)
def test_text_to_video_ddim_equals_the_official_diffusers_loop(steps, batch, dtype):
    """The pipeline still draws float32 noise and returns float32 with a float64 UNet."""
    unet = unet_in("base", dtype)
    cond, uncond, seed = _text(1), _text(2), 123
    got = P.text_to_video(unet, cond, uncond, frames=3, height=16, width=24, steps=steps, cfg=7.5, sampler="ddim", seed=seed, batch=batch)
    noise = torch.randn((batch, 4, 3, 2, 3), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = official_t2v_ddim(unet, cond.to(dtype), uncond.to(dtype), noise.to(dtype), steps, 7.5).float()
    assert_close_to_largest(got, expected, 1e-6 if dtype == torch.float64 else 1e-5)


def test_parity_check_sees_a_wrong_cfg_order(base):
    """Guards the parity test: swapping cond and uncond must break it."""
    cond, uncond = _text(1), _text(2)
    got = P.text_to_video(base, cond, uncond, frames=2, height=16, width=16, steps=4, sampler="ddim", seed=5)
    noise = torch.randn((1, 4, 2, 2, 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        swapped = official_t2v_ddim(base, uncond, cond, noise, 4, 7.5)
    assert not torch.allclose(got, swapped, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", PRECISIONS, ids=PRECISION_IDS)
def test_interpolation_equals_the_official_guided_diffusion_loop(dtype):
    unet = unet_in("interpolation", dtype)
    cond, uncond, seed, steps = _text(3), _text(4), 9, 5
    keys = _randn(1, 4, 3, 2, 3, seed=8)
    got = P.interpolate(unet, keys, cond, uncond, steps=steps, seed=seed)
    noise = torch.randn((1, 4, 9, 2, 3), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = official_interpolation_ddim(unet, keys.to(dtype), cond.to(dtype), uncond.to(dtype), noise.to(dtype), steps, 4.0)
    assert_close_to_largest(got, expected.float(), 1e-6 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize(
    "chunk_frames, chunks",
    [(None, [(0, 5)]), (2, [(0, 2), (2, 4), (4, 5)])],
    ids=["whole-clip", "official-chunks-of-2"],
)
@pytest.mark.parametrize("dtype", PRECISIONS, ids=PRECISION_IDS)
def test_upscale_equals_the_official_diffusers_loop_per_chunk(chunk_frames, chunks, dtype):
    """Joint per-step chunks without overlap equal independent per-chunk DDIM runs from the same noise."""
    vsr = unet_in("vsr", dtype)
    cond, uncond, seed, steps, level = _text(5), _text(6), 10, 4, 50
    low_res = _low_res(f=5, h=6, w=10)
    got = P.upscale(vsr, low_res, cond, uncond, noise_level=level, steps=steps, seed=seed, chunk_frames=chunk_frames, chunk_overlap=0)
    g = torch.Generator().manual_seed(seed)
    lr_noise = torch.randn(low_res.shape, generator=g)
    latents = torch.randn((1, 4, 5, 6, 10), generator=g)
    noisy = diffusers_low_res_noise(low_res, lr_noise, level).to(dtype)
    cond, uncond, latents = cond.to(dtype), uncond.to(dtype), latents.to(dtype)
    with torch.no_grad():
        expected = torch.cat(
            [official_vsr_ddim(vsr, noisy[:, :, a:b], cond, uncond, latents[:, :, a:b], steps, 5.0, level) for a, b in chunks],
            dim=2,
        )
    assert_close_to_largest(got, expected.float(), 1e-6 if dtype == torch.float64 else 1e-5)


def test_low_res_noise_augmentation_uses_the_x4_scaled_linear_schedule():
    lr, noise = _low_res(), _randn(1, 3, 3, 8, 12, seed=3)
    torch.testing.assert_close(P.augment_low_res(lr, 50, noise), diffusers_low_res_noise(lr, noise, 50), rtol=0, atol=1e-7)
    abar = torch.cumprod(1 - P.X4_LOW_RES_BETAS.double(), 0)
    assert math.sqrt(abar[50]) == pytest.approx(0.99541, abs=1e-5)
    # A plain linear schedule would add about twice as much noise at level 50.
    linear = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert math.sqrt(linear[50]) == pytest.approx(0.985, abs=1e-3)
    assert torch.equal(P.augment_low_res(lr, 0, noise, betas=torch.full((10,), 0.5)), 0.5**0.5 * lr + 0.5**0.5 * noise)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, height, width, batch",
    [(1, 8, 8, 1), (3, 16, 24, 1), (5, 24, 16, 2), (2, 40, 8, 1)],
    ids=["1frame-8x8", "3frames-16x24", "5frames-24x16-batch2", "2frames-40x8"],
)
def test_text_to_video_shapes(base, frames, height, width, batch):
    out = P.text_to_video(base, _text(1, batch), _text(2), frames=frames, height=height, width=width, steps=2, sampler="ddim", batch=batch)
    assert out.shape == (batch, 4, frames, height // 8, width // 8)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "b, n, h, w, frame_window",
    [(1, 2, 2, 2, None), (1, 3, 3, 5, None), (2, 4, 2, 3, None), (1, 5, 3, 2, 6)],
    ids=["n2", "n3-3x5", "n4-batch2", "n5-window6"],
)
def test_interpolation_shapes(interp, b, n, h, w, frame_window):
    out = P.interpolate(interp, _randn(b, 4, n, h, w), _text(1), _text(2), steps=2, frame_window=frame_window, window_overlap=2)
    assert out.shape == (b, 4, 4 * n - 3, h, w)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "b, f, h, w, tile",
    [(1, 1, 8, 8, None), (1, 3, 6, 10, None), (2, 3, 8, 12, 6), (1, 3, 7, 9, (4, 6))],
    ids=["1frame", "3frames-6x10", "batch2-tiled", "odd-size-rect-tiles"],
)
def test_upscale_shapes(vsr, b, f, h, w, tile):
    out = P.upscale(vsr, _low_res(b, f, h, w), _text(1), _text(2), steps=2, tile=tile, tile_overlap=2, chunk_frames=2, chunk_overlap=1)
    assert out.shape == (b, 4, f, h, w)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Seeds and CFG modes
# ---------------------------------------------------------------------------------------------


def _run_stage(stage, models, seed, **kwargs):
    base, interp, vsr = models
    if stage == "text_to_video":
        return P.text_to_video(base, _text(1), _text(2), frames=2, height=16, width=16, steps=3, seed=seed, **kwargs)
    if stage == "interpolate":
        return P.interpolate(interp, _randn(kwargs.pop("batch", 1), 4, 2, 2, 3, seed=4), _text(1), _text(2), steps=3, seed=seed, **kwargs)
    return P.upscale(vsr, _low_res(kwargs.pop("batch", 1), 3, 6, 6), _text(1), _text(2), steps=3, seed=seed, tile=4, tile_overlap=2, **kwargs)


STAGES = ["text_to_video", "interpolate", "upscale"]


@pytest.mark.parametrize("stage", STAGES)
def test_same_seed_same_output_different_seed_differs(base, interp, vsr, stage):
    models = (base, interp, vsr)
    a, b, c = (_run_stage(stage, models, seed) for seed in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stage", STAGES)
def test_batch_items_get_different_noise(base, interp, vsr, stage):
    out = _run_stage(stage, (base, interp, vsr), 0, batch=2)
    assert out.shape[0] == 2
    assert not torch.allclose(out[0], out[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "dpmpp_2m"])
def test_text_to_video_cfg_batched_equals_split(base, sampler):
    kwargs = dict(frames=2, height=16, width=16, steps=3, sampler=sampler, seed=3, batch=2)
    batched = P.text_to_video(base, _text(1), _text(2), cfg_mode="batched", **kwargs)
    split = P.text_to_video(base, _text(1), _text(2), cfg_mode="split", **kwargs)
    assert_close_to_largest(split, batched, 1e-4)


@pytest.mark.parametrize("stage", ["interpolate", "upscale"])
def test_conditioned_stages_cfg_batched_equals_split(base, interp, vsr, stage):
    batched = _run_stage(stage, (base, interp, vsr), 2, cfg_mode="batched")
    split = _run_stage(stage, (base, interp, vsr), 2, cfg_mode="split")
    assert_close_to_largest(split, batched, 1e-4)


# ---------------------------------------------------------------------------------------------
# Default grids per sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, expected",
    [
        ("ddpm", [800.0, 600.0, 400.0, 200.0, 0.0]),
        ("ddim", [801.0, 601.0, 401.0, 201.0, 1.0]),
        ("euler", [999.0, 749.25, 499.5, 249.75, 0.0]),
    ],
)
def test_text_to_video_default_grids_are_the_official_ones(base, sampler, expected):
    with spy(base) as calls:
        P.text_to_video(base, _text(1), _text(2), frames=1, height=8, width=8, steps=5, sampler=sampler, cfg=1.0)
    got = [float(c["t"][0]) for c in calls]
    assert got == pytest.approx(expected, abs=1e-3)


def test_other_samplers_default_to_karras_over_the_lavie_range(base):
    assert P.default_schedule("dpmpp_2m") == "karras" and P.default_schedule("heun") == "karras"
    assert P.default_schedule("euler_ancestral") == "karras"
    with spy(base) as calls:
        P.text_to_video(base, _text(1), _text(2), frames=1, height=8, width=8, steps=6, sampler="dpmpp_2m", cfg=1.0)
    got = [float(c["t"][0]) for c in calls]
    assert got[0] == pytest.approx(999.0, abs=1e-3)
    assert got[-1] == pytest.approx(0.0, abs=1e-2)
    expected = S.LAVIE_DIFFUSERS_SCHEDULE.sigma_to_t(S.get_sigmas("karras", 6)[:-1]).tolist()
    assert got == pytest.approx(expected, abs=1e-3)


def test_interpolation_and_upscale_default_grids(interp, vsr):
    with spy(interp) as calls:
        P.interpolate(interp, _randn(1, 4, 2, 2, 2), _text(1), _text(2), steps=5, cfg=1.0)
    assert [float(c["t"][0]) for c in calls] == S.respaced_timesteps(5).flip(0).tolist()
    with spy(vsr) as calls:
        P.upscale(vsr, _low_res(f=1, h=4, w=4), _text(1), _text(2), steps=5, cfg=1.0, noise_level=70)
    assert [float(c["t"][0]) for c in calls] == [801.0, 601.0, 401.0, 201.0, 1.0]
    assert all(c["noise_level"] == 70 for c in calls)


# ---------------------------------------------------------------------------------------------
# Interpolation layout and conditioning
# ---------------------------------------------------------------------------------------------


def test_interpolation_layout_for_16_frames_is_the_official_pattern():
    official = torch.arange(16).repeat_interleave(4)[1:-2].tolist()  # repeat 4x, drop first and last two
    layout = P.interpolation_layout(16)
    assert len(layout) == 61
    assert layout == official
    assert layout[:3] == [0, 0, 0] and layout[-2:] == [15, 15]
    assert [layout.count(k) for k in range(16)] == [3] + [4] * 14 + [2]


def test_interpolation_layout_for_4_frames_written_out():
    assert P.interpolation_layout(4) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert P.interpolation_layout(2) == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16, 21])
def test_interpolation_layout_generalises(n):
    layout = P.interpolation_layout(n)
    assert len(layout) == 4 * n - 3
    assert layout == [math.floor((p + 1) / 4) for p in range(4 * n - 3)]
    assert all(layout[4 * k] == k for k in range(n))
    assert layout == sorted(layout) and set(layout) == set(range(n))


def test_interpolation_unet_sees_key_frame_k_at_position_4k_and_cond_first(interp):
    n = 4
    keys = _randn(1, 4, n, 2, 3, seed=2)
    cond, uncond = _text(1), _text(2)
    with spy(interp) as calls:
        P.interpolate(interp, keys, cond, uncond, steps=2)
    assert len(calls) == 2
    for call in calls:
        x = call["x"]
        # Batched CFG passes the video once and both texts; [noisy 4 | copied 4] channels.
        assert x.shape == (1, 8, 4 * n - 3, 2, 3)
        conditioning = x[:, 4:]
        for k in range(n):
            assert torch.equal(conditioning[0, :, 4 * k], keys[0, :, k])
        assert torch.equal(conditioning[0], keys[0, :, P.interpolation_layout(n)])
        assert call["context"].shape[0] == 2
        assert torch.equal(call["context"][0], cond[0]) and torch.equal(call["context"][1], uncond[0])
        assert not torch.equal(x[0, :4], conditioning[0])  # the noisy half comes first


def test_interpolation_frame_windows_crop_the_conditioning_with_the_latent(interp):
    n, window, overlap = 4, 6, 2
    keys = _randn(1, 4, n, 2, 2, seed=2)
    copied = keys[:, :, P.interpolation_layout(n)]
    spans = tile_spans(4 * n - 3, window, overlap)
    with spy(interp) as calls:
        out = P.interpolate(interp, keys, _text(1), _text(2), steps=2, frame_window=window, window_overlap=overlap)
    assert len(calls) == 2 * len(spans)
    for call, (a, b) in zip(calls, spans * 2):
        assert call["x"].shape[2] == b - a <= window
        assert torch.equal(call["x"][0, 4:], copied[0, :, a:b])
    full = P.interpolate(interp, keys, _text(1), _text(2), steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, full)


def test_interpolation_window_covering_everything_equals_no_window(interp):
    keys = _randn(1, 4, 3, 2, 2, seed=2)
    direct = P.interpolate(interp, keys, _text(1), _text(2), steps=3)
    for window in (9, 20):
        assert torch.equal(P.interpolate(interp, keys, _text(1), _text(2), steps=3, frame_window=window), direct)


# ---------------------------------------------------------------------------------------------
# Upscale tiling
# ---------------------------------------------------------------------------------------------


def test_upscale_one_tile_equals_no_tile_exactly(vsr):
    low_res = _low_res(f=3, h=8, w=12)
    kwargs = dict(steps=3, seed=4, chunk_frames=2, chunk_overlap=1)
    untiled = P.upscale(vsr, low_res, _text(1), _text(2), tile=None, **kwargs)
    for tile in (12, 40, (8, 12)):
        assert torch.equal(P.upscale(vsr, low_res, _text(1), _text(2), tile=tile, tile_overlap=4, **kwargs), untiled)


def test_upscale_chunks_covering_all_frames_equal_no_chunking(vsr):
    low_res = _low_res(f=3, h=6, w=6)
    unchunked = P.upscale(vsr, low_res, _text(1), _text(2), steps=3, chunk_frames=None)
    for chunk_frames in (3, 8):
        got = P.upscale(vsr, low_res, _text(1), _text(2), steps=3, chunk_frames=chunk_frames, chunk_overlap=2)
        assert torch.equal(got, unchunked)
    chunked = P.upscale(vsr, low_res, _text(1), _text(2), steps=3, chunk_frames=2, chunk_overlap=1)
    assert not torch.equal(chunked, unchunked)


def test_upscale_many_tiles_stay_close_to_one_tile(vsr):
    """End to end (4 DDIM steps, 24x24 latents, 2 frames) on a smooth low-res clip. A random tiny
    UNet amplifies differences along the trajectory, so this bounds them rather than asking for
    equality, and checks that blending beats hard tiles.

    Measured, |tiled - untiled| mean / max: blended (tile 12, overlap 6) 0.41 / 1.86, hard tiles
    (overlap 0) 0.57 / 3.56, against |untiled| mean 0.93, max 4.97.
    """
    f, h, w = 2, 24, 24
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    frame = torch.sin(3 * xx) * torch.cos(2 * yy)
    low_res = 0.8 * torch.stack([frame, frame.flip(-1), -frame])[None, :, None].expand(1, 3, f, h, w).contiguous()
    kwargs = dict(steps=4, seed=0, chunk_frames=None)
    untiled = P.upscale(vsr, low_res, _text(1), _text(2), **kwargs)
    blended = (P.upscale(vsr, low_res, _text(1), _text(2), tile=12, tile_overlap=6, **kwargs) - untiled).abs()
    hard = (P.upscale(vsr, low_res, _text(1), _text(2), tile=12, tile_overlap=0, **kwargs) - untiled).abs()
    assert torch.isfinite(blended).all()
    assert 0 < float(blended.mean()) < 0.6 * float(untiled.abs().mean())
    assert float(blended.max()) < 0.75 * float(hard.max())
    assert float(blended.mean()) < 0.85 * float(hard.mean())


# ---------------------------------------------------------------------------------------------
# Progress, callbacks, cancellation
# ---------------------------------------------------------------------------------------------


def _stage_call(stage, models, **kwargs):
    base, interp, vsr = models
    if stage == "text_to_video":
        return base, lambda: P.text_to_video(base, _text(1), _text(2), frames=2, height=8, width=16, **kwargs)
    if stage == "interpolation":
        return interp, lambda: P.interpolate(interp, _randn(1, 4, 2, 2, 2), _text(1), _text(2), **kwargs)
    return vsr, lambda: P.upscale(vsr, _low_res(f=3, h=6, w=6), _text(1), _text(2), tile=4, tile_overlap=2, chunk_frames=2, chunk_overlap=1, **kwargs)


PROGRESS_CASES = [
    pytest.param("text_to_video", dict(steps=3), 3, id="t2v-batched"),
    pytest.param("text_to_video", dict(steps=3, cfg_mode="split"), 6, id="t2v-split"),
    pytest.param("text_to_video", dict(steps=3, cfg_mode="split", cfg=1.0), 3, id="t2v-split-cfg1"),
    pytest.param("text_to_video", dict(steps=3, sampler="heun"), 5, id="t2v-heun"),
    pytest.param("interpolation", dict(steps=3, cfg_mode="split"), 6, id="interp-split"),
    pytest.param("interpolation", dict(steps=2, frame_window=3, window_overlap=1), 2 * 2, id="interp-windows"),
    pytest.param("upscale", dict(steps=2), 2 * 2 * 4, id="upscale-tiles-chunks"),
    pytest.param("upscale", dict(steps=2, cfg_mode="split"), 2 * 2 * 4 * 2, id="upscale-split"),
]


@pytest.mark.parametrize("stage, kwargs, total", PROGRESS_CASES)
def test_on_call_counts_every_unet_call_of_the_stage(base, interp, vsr, stage, kwargs, total):
    ticks = []
    model, run = _stage_call(stage, (base, interp, vsr), on_call=lambda d, t: ticks.append((d, t)), **kwargs)
    with spy(model) as calls:
        run()
    assert len(calls) == total
    assert ticks == [(i, total) for i in range(1, total + 1)]


@pytest.mark.parametrize("stage, kwargs, total", PROGRESS_CASES[:1] + PROGRESS_CASES[-2:])
def test_every_unet_call_first_compiles_its_kernels_ahead(base, interp, vsr, stage, kwargs, total, monkeypatch):
    asked = []
    monkeypatch.setattr(P.fused, "compile_ahead", lambda fn, *args, key, **static: asked.append((fn, args, key, static)))
    model, run = _stage_call(stage, (base, interp, vsr), **kwargs)
    with spy(model) as calls:
        run()
    assert len(asked) == len(calls) == total
    for (fn, args, key, static), call in zip(asked, calls):
        assert fn is model and key[:2] == (model.config, model.dtype)
        assert [tuple(a.shape) for a in args] == [tuple(call[k].shape) for k in ("x", "t", "context")]
        assert static == ({} if call["noise_level"] is None else {"noise_level": call["noise_level"]})
    # The key is the input signature: the calls of a stage's steps share it, tiles and chunks of other sizes not.
    shapes = {tuple(tuple(a.shape) for a in args) for _, args, _, _ in asked}
    assert len({key for _, _, key, _ in asked}) == len(shapes)


@pytest.mark.parametrize("stage", ["text_to_video", "interpolation", "upscale"])
def test_callback_reports_every_step(base, interp, vsr, stage):
    seen = []
    _, run = _stage_call(stage, (base, interp, vsr), steps=3, callback=seen.append)
    out = run()
    assert [info["step"] for info in seen] == [1, 2, 3]
    assert all(info["stage"] == stage and info["steps"] == 3 for info in seen)
    assert all(set(info) >= {"stage", "step", "steps", "denoised", "x", "sigma"} for info in seen)
    assert all(info["denoised"].shape == out.shape for info in seen)
    sigmas = [info["sigma"] for info in seen]
    assert sigmas == sorted(sigmas, reverse=True)


@pytest.mark.parametrize("stage", ["text_to_video", "interpolation", "upscale"])
@pytest.mark.parametrize("hook", ["callback", "on_call"])
def test_raising_from_a_hook_aborts_the_stage(base, interp, vsr, stage, hook):
    def cancel_callback(info):
        if info["step"] == 2:
            raise Cancelled

    def cancel_on_call(done, total):
        if done == 3:
            raise Cancelled

    kwargs = {"callback": cancel_callback} if hook == "callback" else {"on_call": cancel_on_call}
    model, run = _stage_call(stage, (base, interp, vsr), steps=10, **kwargs)
    with spy(model) as calls:
        with pytest.raises(Cancelled):
            run()
    per_step = 8 if stage == "upscale" else 1  # 2 x 2 tiles x 2 chunks
    assert len(calls) == (2 * per_step if hook == "callback" else 3)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _t2v(model, **kwargs):
    args = dict(frames=1, height=8, width=8, steps=1)
    args.update(kwargs)
    return lambda: P.text_to_video(model, _text(1), _text(2), **args)


BAD_T2V = [
    pytest.param(dict(frames=0), ValueError, r"frames must be >= 1, got 0", id="frames-0"),
    pytest.param(dict(height=321), ValueError, r"height 321 is not a multiple of 8", id="height-321"),
    pytest.param(dict(width=100), ValueError, r"width 100 is not a multiple of 8", id="width-100"),
    pytest.param(dict(width=0), ValueError, r"width must be positive, got 0", id="width-0"),
    pytest.param(dict(steps=0), ValueError, r"steps must be >= 1, got 0", id="steps-0"),
    pytest.param(dict(cfg=-1.0), ValueError, r"cfg must be >= 0, got -1.0", id="negative-cfg"),
    pytest.param(dict(batch=0), ValueError, r"batch must be >= 1, got 0", id="batch-0"),
    pytest.param(
        dict(sampler="dpm_fast"),
        ValueError,
        r"sampler must be one of ddim, ddpm, dpmpp_2m, euler, euler_ancestral, heun; got 'dpm_fast'",
        id="unknown-sampler",
    ),
    pytest.param(dict(schedule="cosine"), ValueError, r"schedule must be one of .*karras.*; got 'cosine'", id="unknown-schedule"),
    pytest.param(dict(cfg_mode="both"), ValueError, r"cfg_mode must be one of batched, split; got 'both'", id="unknown-cfg-mode"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_T2V)
def test_text_to_video_bad_arguments(base, kwargs, error, match):
    with pytest.raises(error, match=match):
        _t2v(base, **kwargs)()


@pytest.mark.parametrize("kind", ["interpolation", "vsr"])
def test_text_to_video_rejects_other_model_kinds(kind):
    with pytest.raises(ValueError, match=rf"text_to_video needs a 'base' UNet, got a '{kind}' UNet"):
        _t2v(tiny_model(kind))()


def test_bad_contexts(base):
    with pytest.raises(ValueError, match=r"context must be \[1 or B, tokens, 32\], got \[1, 77, 16\]"):
        P.text_to_video(base, torch.zeros(1, 77, 16), _text(2), frames=1, height=8, width=8, steps=1)
    with pytest.raises(ValueError, match=r"uncond_context has batch 3, expected 1 or 2"):
        P.text_to_video(base, _text(1), _text(2, batch=3), frames=1, height=8, width=8, steps=1, batch=2)


BAD_INTERPOLATION = [
    pytest.param(dict(latents=_randn(1, 4, 1, 2, 2)), ValueError, r"at least 2 frames \(n >= 2\), got n=1", id="n-1"),
    pytest.param(dict(latents=_randn(1, 3, 4, 2, 2)), ValueError, r"latents must be \[B, 4, n, h, w\], got \[1, 3, 4, 2, 2\]", id="3-channels"),
    pytest.param(dict(frame_window=0), ValueError, r"frame_window must be >= 1, got 0", id="window-0"),
    pytest.param(dict(frame_window=4, window_overlap=4), ValueError, r"window_overlap must be smaller than frame_window \(4\), got 4", id="overlap-eq-window"),
    pytest.param(dict(sampler="plms"), ValueError, r"sampler must be one of .*; got 'plms'", id="unknown-sampler"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INTERPOLATION)
def test_interpolation_bad_arguments(interp, kwargs, error, match):
    latents = kwargs.pop("latents", _randn(1, 4, 2, 2, 2))
    with pytest.raises(error, match=match):
        P.interpolate(interp, latents, _text(1), _text(2), steps=1, **kwargs)


def test_interpolation_layout_rejects_fewer_than_two_frames():
    with pytest.raises(ValueError, match=r"n must be >= 2, got 1"):
        P.interpolation_layout(1)


@pytest.mark.parametrize("kind", ["base", "vsr"])
def test_interpolation_rejects_other_model_kinds(kind):
    with pytest.raises(ValueError, match=rf"interpolate needs a 'interpolation' UNet, got a '{kind}' UNet"):
        P.interpolate(tiny_model(kind), _randn(1, 4, 2, 2, 2), _text(1), _text(2), steps=1)


BAD_UPSCALE = [
    pytest.param(dict(noise_level=351), ValueError, r"noise_level must be in 0..350, got 351", id="noise-level-351"),
    pytest.param(dict(noise_level=-1), ValueError, r"noise_level must be in 0..350, got -1", id="noise-level-negative"),
    pytest.param(dict(noise_level=50.0), TypeError, r"noise_level must be an int", id="noise-level-float"),
    pytest.param(dict(tile=8, tile_overlap=8), ValueError, r"tile_overlap must be smaller than tile \(8\), got 8", id="overlap-eq-tile"),
    pytest.param(dict(tile=(8, 4), tile_overlap=4), ValueError, r"tile_overlap must be smaller than tile \(4\), got 4", id="overlap-eq-tile-width"),
    pytest.param(dict(tile=0), ValueError, r"tile must be >= 1, got 0", id="tile-0"),
    pytest.param(dict(chunk_frames=0), ValueError, r"chunk_frames must be >= 1, got 0", id="chunk-0"),
    pytest.param(dict(chunk_frames=4, chunk_overlap=5), ValueError, r"chunk_overlap must be smaller than chunk_frames \(4\), got 5", id="chunk-overlap-too-big"),
    pytest.param(dict(tile_overlap=-1), ValueError, r"tile_overlap must be >= 0, got -1", id="negative-overlap"),
    pytest.param(dict(low_res=torch.zeros(1, 4, 2, 4, 4)), ValueError, r"low_res must be an RGB video \[B, 3, F, H, W\], got \[1, 4, 2, 4, 4\]", id="4-channels"),
    pytest.param(dict(low_res=torch.zeros(3, 4, 4)), ValueError, r"low_res must be an RGB video", id="4d-input"),
    pytest.param(dict(schedule="nope"), ValueError, r"schedule must be one of .*; got 'nope'", id="unknown-schedule"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_UPSCALE)
def test_upscale_bad_arguments(vsr, kwargs, error, match):
    low_res = kwargs.pop("low_res", _low_res(f=2, h=4, w=4))
    with pytest.raises(error, match=match):
        P.upscale(vsr, low_res, _text(1), _text(2), steps=1, **kwargs)


@pytest.mark.parametrize("kind", ["base", "interpolation"])
def test_upscale_rejects_other_model_kinds(kind):
    with pytest.raises(ValueError, match=rf"upscale needs a 'vsr' UNet, got a '{kind}' UNet"):
        P.upscale(tiny_model(kind), _low_res(f=2, h=4, w=4), _text(1), _text(2), steps=1)


def test_rejects_something_that_is_not_a_lavie_unet():
    with pytest.raises(TypeError, match=r"expected a LaVieUNet"):
        P.text_to_video(lambda *a: None, _text(1), _text(2), frames=1, height=8, width=8, steps=1)


# ---------------------------------------------------------------------------------------------
# Size check
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, multiple, match",
    [
        (321, 512, 8, r"height 321 is not a multiple of 8"),
        (320, 500, 8, r"width 500 is not a multiple of 8"),
        (360, 512, 64, r"height 360 is not a multiple of 64"),
        (-8, 512, 8, r"height must be positive, got -8"),
    ],
    ids=["height", "width", "multiple-64", "negative"],
)
def test_check_video_size(height, width, multiple, match):
    with pytest.raises(ValueError, match=match):
        P.check_video_size(height, width, multiple=multiple)


def test_check_video_size_accepts_good_sizes():
    P.check_video_size(320, 512)
    P.check_video_size(8, 8)
    P.check_video_size(1280, 2048, multiple=64)
