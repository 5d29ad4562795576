"""Windowed denoising: span layout, blend weights, exactness of the trivial tiling, locality."""
import math

import pytest
import torch

from lavie_core import schedules as S
from lavie_core.guidance import DiscreteDenoiser
from lavie_core.tiling import (
    EDGE_EPS,
    TiledDenoiser,
    axis_weights,
    blend_weights,
    plan_windows,
    tile_spans,
)
from test_unet import tiny_model

torch.set_num_threads(1)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Spans
# ---------------------------------------------------------------------------------------------

SPAN_CASES = [
    pytest.param(40, 24, 8, id="40-tile24-ov8"),
    pytest.param(10, 4, 1, id="10-tile4-ov1"),
    pytest.param(61, 16, 4, id="61-tile16-ov4"),
    pytest.param(61, 8, 2, id="61-tile8-ov2"),
    pytest.param(7, 3, 2, id="7-tile3-ov2"),
    pytest.param(100, 32, 31, id="100-tile32-ov31"),
    pytest.param(61, 8, 0, id="61-tile8-partition"),
    pytest.param(9, 4, 0, id="9-tile4-partition"),
    pytest.param(5, 5, 2, id="tile-equals-size"),
    pytest.param(5, 9, 3, id="tile-larger-than-size"),
    pytest.param(5, None, 0, id="tile-none"),
]


@pytest.mark.parametrize("size, tile, overlap", SPAN_CASES)
def test_spans_cover_every_position_in_order_and_end_flush(size, tile, overlap):
    spans = tile_spans(size, tile, overlap)
    covered = torch.zeros(size, dtype=torch.int64)
    for start, stop in spans:
        assert 0 <= start < stop <= size
        covered[start:stop] += 1
    assert bool((covered >= 1).all())
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert [s for s, _ in spans] == sorted({s for s, _ in spans})  # strictly increasing starts
    if tile is None or tile >= size:
        assert spans == [(0, size)]
    elif overlap == 0:
        assert bool((covered == 1).all())  # a partition
        assert all(stop - start == tile for start, stop in spans[:-1])
    else:
        assert all(stop - start == tile for start, stop in spans)
        for (_, prev_stop), (start, _) in zip(spans, spans[1:]):
            assert prev_stop - start >= overlap


def test_partition_reproduces_the_official_vsr_chunks():
    """61 frames in chunks of 8 without overlap: 7 x 8 + 5, as the official VSR pipeline cuts them."""
    assert tile_spans(61, 8, 0) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 48), (48, 56), (56, 61)]
    assert tile_spans(16, 8, 0) == [(0, 8), (8, 16)]


def test_overlapping_spans_are_evenly_strided_with_the_last_one_moved_back():
    assert tile_spans(40, 24, 8) == [(0, 24), (16, 40)]
    assert tile_spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert tile_spans(61, 16, 4) == [(0, 16), (12, 28), (24, 40), (36, 52), (45, 61)]


@pytest.mark.parametrize(
    "size, tile, overlap, error, match",
    [
        pytest.param(10, 0, 0, ValueError, r"tile must be >= 1, got 0", id="tile-0"),
        pytest.param(10, 4, 4, ValueError, r"overlap must be smaller than the tile \(4\), got 4", id="overlap-eq-tile"),
        pytest.param(10, 4, -1, ValueError, r"overlap must be >= 0, got -1", id="negative-overlap"),
        pytest.param(0, 4, 0, ValueError, r"size must be >= 1, got 0", id="empty-axis"),
        pytest.param(10, 2.5, 0, TypeError, r"tile must be an int", id="float-tile"),
    ],
)
def test_bad_span_arguments(size, tile, overlap, error, match):
    with pytest.raises(error, match=match):
        tile_spans(size, tile, overlap)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def test_blend_weights_ramp_only_at_inner_edges():
    size, overlap = 40, 8
    first, middle, last = (blend_weights(span, size, overlap) for span in [(0, 24), (8, 32), (16, 40)])
    # Outer border: full weight right up to the edge.
    assert bool((first[:-overlap] == 1).all()) and bool((last[overlap:] == 1).all())
    assert bool((middle[overlap:-overlap] == 1).all())
    # Inner edges: small but positive at the edge pixel, rising strictly to 1 over `overlap` pixels.
    for ramp in (first.flip(0)[:overlap], middle[:overlap], middle.flip(0)[:overlap], last[:overlap]):
        assert EDGE_EPS <= float(ramp[0]) < 0.05
        assert bool((ramp[1:] > ramp[:-1]).all())
        assert float(ramp[-1]) > 0.95


def test_opposing_ramps_over_exactly_the_overlap_sum_to_one_before_normalising():
    a = blend_weights((0, 24), 40, 8)[-8:]
    b = blend_weights((16, 40), 40, 8)[:8]
    torch.testing.assert_close(a + b, torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, tile, overlap", SPAN_CASES)
def test_normalised_axis_weights_sum_to_one_everywhere(size, tile, overlap):
    total = torch.zeros(size, dtype=torch.float64)
    for (start, stop), w in axis_weights(size, tile, overlap):
        assert bool((w > 0).all())
        total[start:stop] += w
    torch.testing.assert_close(total, torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "fhw, kwargs",
    [
        pytest.param((7, 20, 30), dict(tile=8, overlap=3, chunk_frames=3, chunk_overlap=1), id="3d-grid"),
        pytest.param((5, 9, 17), dict(tile=(4, 6), overlap=(1, 2), chunk_frames=2, chunk_overlap=0), id="rect-tiles"),
        pytest.param((4, 6, 6), dict(), id="single-window"),
    ],
)
def test_window_weights_sum_to_one_over_the_volume(fhw, kwargs):
    windows = plan_windows(*fhw, **kwargs)
    total = torch.zeros(fhw, dtype=torch.float64)
    hits = torch.zeros(fhw, dtype=torch.int64)
    for win in windows:
        total[win.index[2:]] += win.weight(dtype=torch.float64)
        hits[win.index[2:]] += 1
    torch.testing.assert_close(total, torch.ones(fhw, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((hits >= 1).all())


# ---------------------------------------------------------------------------------------------
# TiledDenoiser
# ---------------------------------------------------------------------------------------------


class ConvDenoiser:
    """A denoiser with a known, local receptive field: two 3-D convolutions on [x, concat].

    Spatial radius 2 + 2 = 4 pixels, temporal radius 1 + 1 = 2 frames.
    """

    RADIUS = 4
    FRAME_RADIUS = 2

    def __init__(self, cond_channels: int = 3):
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.randn(8, 4 + cond_channels, 3, 5, 5, generator=g) * 0.1
        self.w2 = torch.randn(4, 8, 3, 5, 5, generator=g) * 0.1
        self.calls = 0

    def __call__(self, x, sigma, *, concat=None, scale=1.0):
        self.calls += 1
        h = torch.cat([x, concat], 1) if concat is not None else x
        h = torch.tanh(torch.nn.functional.conv3d(h, self.w1, padding=(1, 2, 2)))
        return scale * torch.nn.functional.conv3d(h, self.w2, padding=(1, 2, 2)) + x / (1 + sigma.view(-1, 1, 1, 1, 1) ** 2)


def pointwise(x, sigma, *, concat=None):
    s = sigma.view(-1, 1, 1, 1, 1)
    out = torch.tanh(x) * 0.7 + x**2 / (1 + s**2)
    return out if concat is None else out + concat[:, :1] * 0.5


def test_single_window_is_exactly_the_bare_model():
    x, concat, sigma = _randn(2, 4, 5, 12, 16), _randn(2, 3, 5, 12, 16, seed=1), torch.tensor([3.0, 3.0])
    model = ConvDenoiser()
    direct = model(x, sigma, concat=concat)
    for tiled in (
        TiledDenoiser(model, conditioning={"concat": concat}),
        TiledDenoiser(model, tile=16, overlap=4, chunk_frames=5, chunk_overlap=2, conditioning={"concat": concat}),
        TiledDenoiser(model, tile=(12, 99), chunk_frames=100, conditioning=lambda w: {"concat": w.crop(concat)}),
    ):
        assert torch.equal(tiled(x, sigma), direct)


def test_single_window_with_the_real_vsr_unet_is_exact():
    unet = tiny_model("vsr")
    ctx = _randn(1, 77, 32, seed=4)
    net = lambda x, t, context, concat: unet(torch.cat([x, concat], 1), t, context, noise_level=20)  # noqa: E731
    denoiser = DiscreteDenoiser(net, S.LAVIE_DIFFUSERS_SCHEDULE, "v")
    x, lr = _randn(1, 4, 3, 8, 12), _randn(1, 3, 3, 8, 12, seed=1)
    sigma = S.LAVIE_DIFFUSERS_SCHEDULE.sigmas[[500]].float()
    direct = denoiser(x, sigma, context=ctx, concat=lr)
    tiled = TiledDenoiser(denoiser, tile=12, overlap=4, chunk_frames=3, conditioning={"concat": lr})
    assert torch.equal(tiled(x, sigma, context=ctx), direct)


TILINGS = [
    pytest.param(dict(tile=8, overlap=3), id="tiles-8-ov3"),
    pytest.param(dict(tile=(5, 7), overlap=(2, 0)), id="rect-tiles-ov2-0"),
    pytest.param(dict(chunk_frames=2, chunk_overlap=1), id="chunks-2-ov1"),
    pytest.param(dict(tile=6, overlap=2, chunk_frames=3, chunk_overlap=0), id="tiles-and-chunks"),
    pytest.param(dict(tile=4, overlap=0), id="hard-tiles"),
]


@pytest.mark.parametrize("kwargs", TILINGS)
def test_any_tiling_of_a_pointwise_denoiser_equals_the_direct_call(kwargs):
    x, concat, sigma = _randn(2, 4, 5, 13, 17), _randn(2, 3, 5, 13, 17, seed=1), torch.tensor([2.0, 0.5])
    direct = pointwise(x, sigma, concat=concat)
    tiled = TiledDenoiser(pointwise, conditioning={"concat": concat}, **kwargs)(x, sigma)
    torch.testing.assert_close(tiled, direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", TILINGS[:2])
def test_pointwise_check_fails_for_misaligned_conditioning(kwargs):
    """Guards the test above: conditioning cropped from the wrong place must break it."""
    x, concat, sigma = _randn(1, 4, 5, 13, 17), _randn(1, 3, 5, 13, 17, seed=1), torch.tensor([2.0])
    direct = pointwise(x, sigma, concat=concat)
    shifted = lambda w: {"concat": concat.roll(1, dims=-1)[w.index]}  # noqa: E731
    tiled = TiledDenoiser(pointwise, conditioning=shifted, **kwargs)(x, sigma)
    assert not torch.allclose(tiled, direct, rtol=1e-3, atol=1e-3)


def _distance_to_inner_edges(size: int, tile, overlap) -> torch.Tensor:
    """Per position, the distance to the nearest window edge lying strictly inside the axis."""
    edges = {e for span in tile_spans(size, tile, overlap) for e in span if 0 < e < size}
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    dist = torch.full((size,), math.inf, dtype=torch.float64)
    for e in edges:
        dist = torch.minimum(dist, (centres - e).abs())
    return dist


def test_local_denoiser_is_exact_beyond_its_receptive_field_and_differs_at_seams():
    f, h, w = 9, 40, 44
    x, concat, sigma = _randn(1, 4, f, h, w), _randn(1, 3, f, h, w, seed=1), torch.tensor([1.5])
    model = ConvDenoiser()
    direct = model(x, sigma, concat=concat)
    tiling = dict(tile=20, overlap=8, chunk_frames=6, chunk_overlap=3)
    tiled = TiledDenoiser(model, conditioning={"concat": concat}, **tiling)(x, sigma)
    diff = (tiled - direct).abs().amax(dim=(0, 1))  # f h w
    d_f = _distance_to_inner_edges(f, 6, 3)
    d_h = _distance_to_inner_edges(h, 20, 8)
    d_w = _distance_to_inner_edges(w, 20, 8)
    far = (d_f[:, None, None] > ConvDenoiser.FRAME_RADIUS) & (d_h[None, :, None] > ConvDenoiser.RADIUS) & (
        d_w[None, None, :] > ConvDenoiser.RADIUS
    )
    assert far.any() and (~far).any()
    assert float(diff[far].max()) < 1e-5
    assert float(diff[~far].max()) > 1e-3


def test_conditioning_dict_must_match_x():
    x = _randn(1, 4, 3, 8, 8)
    tiled = TiledDenoiser(pointwise, tile=4, overlap=1, conditioning={"concat": _randn(1, 3, 3, 8, 9)})
    with pytest.raises(ValueError, match=r"conditioning 'concat' must be \[B, C, 3, 8, 8\] like x, got \[1, 3, 3, 8, 9\]"):
        tiled(x, torch.tensor([1.0]))


def test_on_call_ticks_per_window_and_can_cancel():
    x, sigma = _randn(1, 4, 4, 10, 10), torch.tensor([1.0])
    ticks = []
    tiled = TiledDenoiser(pointwise, tile=6, overlap=2, chunk_frames=2, on_call=lambda d, t: ticks.append((d, t)))
    tiled(x, sigma)
    n = len(tile_spans(10, 6, 2)) ** 2 * 2
    assert ticks == [(i, n) for i in range(1, n + 1)]

    class Stop(Exception):
        pass

    model = ConvDenoiser(cond_channels=0)

    def stop_at_3(done, total):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        TiledDenoiser(model, tile=6, overlap=2, on_call=stop_at_3)(x, sigma)
    assert model.calls == 3


def test_extra_kwargs_reach_every_window_unchanged():
    x, sigma = _randn(1, 4, 2, 10, 10), torch.tensor([1.0])
    model = ConvDenoiser(cond_channels=0)
    direct = model(x, sigma, scale=3.0)
    tiled = TiledDenoiser(model, tile=10)(x, sigma, scale=3.0)
    assert torch.equal(tiled, direct)


def test_bad_tiling_parameters_fail_at_construction():
    with pytest.raises(ValueError, match=r"overlap must be smaller than the tile \(8\), got 8"):
        TiledDenoiser(pointwise, tile=8, overlap=8)
    with pytest.raises(ValueError, match=r"tile must be >= 1, got 0"):
        TiledDenoiser(pointwise, chunk_frames=0)
    with pytest.raises(TypeError, match=r"tile must be an int, a pair of ints or None"):
        TiledDenoiser(pointwise, tile=(4, 4, 4))
    with pytest.raises(ValueError, match=r"needs x shaped \[B, C, F, H, W\]"):
        TiledDenoiser(pointwise)(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------
# The real tiny VSR UNet: how far many tiles are from one tile
# ---------------------------------------------------------------------------------------------


def _smooth_low_res(frames: int, h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([torch.sin(3 * xx + 0.1 * f) * torch.cos(2 * yy) for f in range(frames)])
    return 0.8 * torch.stack([base, base.flip(-1), -base])[None]


@pytest.mark.parametrize("timestep", [981, 101])
def test_vsr_unet_blended_tiles_keep_seam_errors_down(timestep):
    """Many tiles vs one tile with the real (tiny, random) VSR UNet, one denoiser evaluation.

    The UNet is not local: GroupNorm statistics and the mid block's self-attention span the whole
    window, so even a tile's interior differs from the full-frame result. Hard tiles (no overlap)
    concentrate the error at the tile edges; blended tiles must not.

    Measured (64x64, 2 frames, tile 32), mean |diff| within 4 px of a seam / >= 12 px away:
      t=981  blended (overlap 8) 0.089 / 0.067   hard 0.308 / 0.071   max 0.69 vs 2.11
      t=501  blended             0.082 / 0.072   hard 0.296 / 0.069   max 0.63 vs 1.90
      t=101  blended             0.033 / 0.028   hard 0.097 / 0.028   max 0.32 vs 0.85
    against a mean |x0| of 0.44 / 0.47 / 0.77 and max |x0| of 2.9 / 3.1 / 4.2.
    """
    unet = tiny_model("vsr")
    f, h, w = 2, 64, 64
    lr = _smooth_low_res(f, h, w)
    ctx = _randn(1, 77, 32, seed=7)
    net = lambda x, t, context, concat: unet(torch.cat([x, concat], 1), t, context, noise_level=50)  # noqa: E731
    denoiser = DiscreteDenoiser(net, S.LAVIE_DIFFUSERS_SCHEDULE, "v")
    sigma = S.LAVIE_DIFFUSERS_SCHEDULE.sigmas[[timestep]].float()
    x = _randn(1, 4, f, h, w, seed=timestep) * float((1 + sigma**2).sqrt())
    direct = denoiser(x, sigma, context=ctx, concat=lr)

    def errors(overlap):
        tiled = TiledDenoiser(denoiser, tile=32, overlap=overlap, conditioning={"concat": lr})(x, sigma, context=ctx)
        diff = (tiled - direct).abs()
        per_pixel = diff.mean(dim=(0, 1, 2))  # h w
        d = _distance_to_inner_edges(h, 32, overlap)
        dist = torch.minimum(d[:, None], d[None, :])
        return float(per_pixel[dist < 4].mean()), float(per_pixel[dist >= 12].mean()), float(diff.max())

    near, far, worst = errors(8)
    hard_near, hard_far, hard_worst = errors(0)
    assert hard_near > 2.5 * hard_far  # the metric does see seams when there are some
    assert near < 1.6 * far
    assert near < 0.5 * hard_near and worst < 0.6 * hard_worst
    assert worst < float(direct.abs().max()) * 0.5
    assert far < 0.25 * float(direct.abs().mean())
