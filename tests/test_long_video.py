"""Long videos with the base UNet: recursive extension and sliding context windows, on a tiny model."""
import math

import pytest
import torch

from lavie_core.long_video import (
    ConditionedClipDenoiser,
    clip_plan,
    extend_video,
    segment_stats,
    sliding_window_video,
)
from lavie_core.pipeline import text_to_video
from test_unet import tiny_model

torch.set_num_threads(1)

FAST = dict(height=64, width=64, steps=2)


@pytest.fixture(scope="module")
def model():
    return tiny_model("base", seed=1)


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 7, 32, generator=g), torch.zeros(1, 7, 32)


def test_clip_plan_covers_the_video_once():
    assert clip_plan(64, 16, 4, 16) == [(16, 12), (28, 12), (40, 12), (52, 12)]
    assert clip_plan(30, 16, 4, 16) == [(16, 12), (28, 2)]
    assert clip_plan(16, 16, 4, 16) == []


def test_extension_to_64_frames_is_deterministic_and_starts_with_text_to_video(model, texts):
    ctx, unc = texts
    kwargs = dict(total_frames=64, cond_noise=100, uncond_guidance=0.1, seed=7, **FAST)
    ticks, steps_seen = [], []
    out = extend_video(model, ctx, unc, **kwargs, on_call=lambda d, t: ticks.append((d, t)),
                       callback=lambda info: steps_seen.append((info["clip"], info["step"], info["steps"])))
    assert out.shape == (1, 4, 64, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, extend_video(model, ctx, unc, **kwargs))
    first = text_to_video(model, ctx, unc, frames=16, seed=7, **FAST)
    assert torch.equal(out[:, :, :16], first)
    # A shorter run is a prefix of the longer one: clips and their seeds do not depend on the total.
    assert torch.equal(extend_video(model, ctx, unc, **{**kwargs, "total_frames": 30}), out[:, :, :30])
    # 5 clips x 2 steps; the first clip 1 guided call per step, extensions 2 (frame-free branch).
    assert ticks[-1] == (2 + 4 * 2 * 2, 2 + 4 * 2 * 2) and len(ticks) == ticks[-1][0]
    assert [s for _, s, _ in steps_seen] == list(range(1, 11)) and steps_seen[-1] == (4, 10, 10)
    different_seed = extend_video(model, ctx, unc, **{**kwargs, "seed": 8})
    assert not torch.allclose(different_seed, out)


def test_extension_keeps_given_frames_and_conditions_on_them(model, texts):
    ctx, unc = texts
    g = torch.Generator().manual_seed(3)
    initial = torch.randn(1, 4, 6, 8, 8, generator=g)
    out = extend_video(model, ctx, unc, total_frames=18, initial=initial, cond_frames=3, sampler="euler", **FAST)
    assert out.shape == (1, 4, 18, 8, 8) and torch.equal(out[:, :, :6], initial)
    other = initial.clone()
    other[:, :, -3:] += 1.0  # the conditioning frames
    changed = extend_video(model, ctx, unc, total_frames=18, initial=other, cond_frames=3, sampler="euler", **FAST)
    assert not torch.allclose(changed[:, :, 6:], out[:, :, 6:])
    early = initial.clone()
    early[:, :, 0] += 1.0  # outside the conditioning window: no influence
    same = extend_video(model, ctx, unc, total_frames=18, initial=early, cond_frames=3, sampler="euler", **FAST)
    assert torch.equal(same[:, :, 6:], out[:, :, 6:])


def test_conditioned_clip_denoiser_replaces_perturbs_and_guides():
    calls = []

    def fake(x, sigma, **kwargs):
        calls.append(x.clone())
        return 0.5 * x + x.shape[2]  # depends on the frame count, so the frame-free branch differs

    g = torch.Generator().manual_seed(0)
    known, eps = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    x = torch.randn(1, 4, 5, 3, 3, generator=g)
    sigma = torch.tensor([2.0])
    plain = ConditionedClipDenoiser(fake, known, eps)
    out = plain(x, sigma)
    torch.testing.assert_close(calls[0][:, :, :2], known + 2.0 * eps)
    assert torch.equal(calls[0][:, :, 2:], x[:, :, 2:]) and torch.equal(out[:, :, :2], known)
    calls.clear()
    guided = ConditionedClipDenoiser(fake, known, eps, sigma_cond=1.5, uncond_guidance=0.25)
    out = guided(x, sigma)
    torch.testing.assert_close(calls[0][:, :, :2], known + 2.5 * eps)  # sqrt(2^2 + 1.5^2)
    assert calls[1].shape[2] == 3 and torch.equal(calls[1], calls[0][:, :, 2:])
    with_frames, free = 0.5 * calls[0][:, :, 2:] + 5, 0.5 * calls[1] + 3
    torch.testing.assert_close(out[:, :, 2:], 1.25 * with_frames - 0.25 * free)


def test_sliding_windows_over_64_frames(model, texts):
    ctx, unc = texts
    ticks = []
    out = sliding_window_video(model, ctx, unc, frames=64, context_length=16, context_overlap=4, seed=5,
                               on_call=lambda d, t: ticks.append((d, t)), **FAST)
    assert out.shape == (1, 4, 64, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, sliding_window_video(model, ctx, unc, frames=64, seed=5, **FAST))
    windows = 5  # starts 0, 12, 24, 36 and 48, the last one flush with the end
    assert ticks[-1] == (2 * windows, 2 * windows)
    assert not torch.allclose(out, text_to_video(model, ctx, unc, frames=64, seed=5, **FAST))


@pytest.mark.parametrize("context_length", [20, 64])
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_window_covering_all_frames_equals_text_to_video_exactly(model, texts, context_length, sampler):
    ctx, unc = texts
    a = sliding_window_video(model, ctx, unc, frames=20, context_length=context_length, seed=11, sampler=sampler, **FAST)
    b = text_to_video(model, ctx, unc, frames=20, seed=11, sampler=sampler, **FAST)
    assert torch.equal(a, b)


def test_bad_arguments_are_named(model, texts):
    ctx, unc = texts
    with pytest.raises(ValueError, match=r"cond_frames \(16\) must be smaller than clip_frames \(16\)"):
        extend_video(model, ctx, unc, total_frames=32, cond_frames=16, **FAST)
    with pytest.raises(ValueError, match=r"context_overlap \(16\) must be smaller than context_length \(16\)"):
        sliding_window_video(model, ctx, unc, frames=32, context_overlap=16, **FAST)
    with pytest.raises(ValueError, match="cond_noise is a training timestep"):
        extend_video(model, ctx, unc, total_frames=32, cond_noise=1000, **FAST)
    with pytest.raises(ValueError, match="needs a 'base' UNet"):
        extend_video(tiny_model("interpolation"), ctx, unc, total_frames=32, **FAST)
    with pytest.raises(ValueError, match="fewer than cond_frames"):
        extend_video(model, ctx, unc, total_frames=32, initial=torch.zeros(1, 4, 2, 8, 8), **FAST)


def test_segment_stats_measure_seams_flicker_and_drift():
    f = 32
    t = torch.arange(f, dtype=torch.float32).view(1, 1, f, 1, 1)
    smooth = (0.01 * t).expand(1, 4, f, 4, 4).clone()
    rows = segment_stats(smooth, 16)
    assert [r["start"] for r in rows] == [0.0, 16.0]
    assert rows[0]["frame_diff"] == pytest.approx(0.01, abs=1e-6) and rows[1]["flicker"] == pytest.approx(0, abs=1e-6)
    assert rows[1]["mean_drift"] == pytest.approx(0.16, abs=1e-5) and rows[0]["mean_drift"] == 0
    seam = smooth.clone()
    seam[:, :, 16:] += 1.0
    assert segment_stats(seam, 16)[1]["frame_diff"] > 0.05 and not math.isnan(segment_stats(seam, 16)[1]["flicker"])
