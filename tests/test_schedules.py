import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lavie_core import schedules as S

# The official 50-step grids, written out (LAVIE_FACTS sections 2-4).
DDPM_50 = [
    980, 960, 940, 920, 900, 880, 860, 840, 820, 800, 780, 760, 740, 720, 700, 680, 660,
    640, 620, 600, 580, 560, 540, 520, 500, 480, 460, 440, 420, 400, 380, 360, 340, 320,
    300, 280, 260, 240, 220, 200, 180, 160, 140, 120, 100, 80, 60, 40, 20, 0,
]
DDIM_50 = [
    981, 961, 941, 921, 901, 881, 861, 841, 821, 801, 781, 761, 741, 721, 701, 681, 661,
    641, 621, 601, 581, 561, 541, 521, 501, 481, 461, 441, 421, 401, 381, 361, 341, 321,
    301, 281, 261, 241, 221, 201, 181, 161, 141, 121, 101, 81, 61, 41, 21, 1,
]
EULER_50 = [
    999.0, 978.612244898, 958.2244897959, 937.8367346939, 917.4489795918, 897.0612244898,
    876.6734693878, 856.2857142857, 835.8979591837, 815.5102040816, 795.1224489796,
    774.7346938776, 754.3469387755, 733.9591836735, 713.5714285714, 693.1836734694,
    672.7959183673, 652.4081632653, 632.0204081633, 611.6326530612, 591.2448979592,
    570.8571428571, 550.4693877551, 530.0816326531, 509.693877551, 489.306122449,
    468.9183673469, 448.5306122449, 428.1428571429, 407.7551020408, 387.3673469388,
    366.9795918367, 346.5918367347, 326.2040816327, 305.8163265306, 285.4285714286,
    265.0408163265, 244.6530612245, 224.2653061224, 203.8775510204, 183.4897959184,
    163.1020408163, 142.7142857143, 122.3265306122, 101.9387755102, 81.5510204082,
    61.1632653061, 40.7755102041, 20.387755102, 0.0,
]
RESPACED_50 = [
    0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224, 245, 265, 285, 306, 326, 347,
    367, 387, 408, 428, 449, 469, 489, 510, 530, 550, 571, 591, 612, 632, 652, 673, 693,
    714, 734, 754, 775, 795, 816, 836, 856, 877, 897, 917, 938, 958, 979, 999,
]

N = S.LAVIE_NUM_TRAIN_TIMESTEPS
FAST = settings(max_examples=60, deadline=None, database=None)


@pytest.mark.parametrize(
    "fn, expected",
    [
        pytest.param(S.ddpm_timesteps, DDPM_50, id="ddpm"),
        pytest.param(S.ddim_timesteps, DDIM_50, id="ddim"),
        pytest.param(S.respaced_timesteps, RESPACED_50, id="respaced"),
    ],
)
def test_integer_grids_equal_official_50_step_lists(fn, expected):
    got = fn(50)
    assert got.dtype == torch.int64
    assert got.tolist() == expected


def test_euler_grid_equals_official_50_step_list():
    got = S.euler_timesteps(50)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), EULER_50, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "steps, n, expected",
    [
        pytest.param(1, 1000, [0], id="one-step"),
        pytest.param(2, 1000, [0, 999], id="two-steps"),
        pytest.param(3, 1000, [0, 500, 999], id="tie-499.5-rounds-to-even"),
        pytest.param(5, 1000, [0, 250, 500, 749, 999], id="five-steps"),
        pytest.param(4, 10, [0, 3, 6, 9], id="small-n"),
    ],
)
def test_respaced_small_cases(steps, n, expected):
    assert S.respaced_timesteps(steps, n).tolist() == expected


@FAST
@given(steps=st.integers(min_value=1, max_value=N - 1))
def test_ddpm_and_ddim_grid_properties(steps):
    ratio = N // steps
    ddpm = S.ddpm_timesteps(steps)
    ddim = S.ddim_timesteps(steps)
    assert len(ddpm) == steps
    assert ddpm[-1] == 0 and ddpm[0] == (steps - 1) * ratio
    assert torch.all(ddpm[:-1] - ddpm[1:] == ratio)
    assert torch.equal(ddim, ddpm + 1)


@FAST
@given(steps=st.integers(min_value=2, max_value=N))
def test_euler_grid_properties(steps):
    grid = S.euler_timesteps(steps)
    assert len(grid) == steps
    assert grid[0] == N - 1 and grid[-1] == 0
    np.testing.assert_allclose(np.diff(grid.numpy()), -(N - 1) / (steps - 1), rtol=1e-9)


@FAST
@given(steps=st.integers(min_value=2, max_value=2000), n=st.integers(min_value=2, max_value=2000))
def test_respaced_grid_properties(steps, n):
    if steps > n:
        with pytest.raises(ValueError, match="steps must be <="):
            S.respaced_timesteps(steps, n)
        return
    grid = S.respaced_timesteps(steps, n)
    assert len(grid) == steps
    assert grid[0] == 0 and grid[-1] == n - 1
    assert torch.all(grid[1:] > grid[:-1])
    ideal = torch.arange(steps, dtype=torch.float64) * (n - 1) / (steps - 1)
    assert torch.all((grid - ideal).abs() <= 0.5 + 1e-9)


SCHEDULE_NAMES = ["lavie_ddpm", "lavie_ddim", "lavie_respaced", "euler_discrete", "karras"]


def test_schedule_registry_names():
    assert set(S.SCHEDULES) == set(SCHEDULE_NAMES)


@FAST
@given(name=st.sampled_from(SCHEDULE_NAMES), steps=st.integers(min_value=1, max_value=N - 1))
def test_sigma_grid_properties(name, steps):
    sigmas = S.get_sigmas(name, steps)
    spec = S.SCHEDULES[name]
    table = spec.default_schedule.sigmas
    assert sigmas.dtype == torch.float64
    assert sigmas.shape == (steps + 1,)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    if name == "lavie_ddim":
        assert sigmas[-1] == table[0] > 0
    else:
        assert sigmas[-1] == 0
    assert sigmas[0] <= table[-1] * (1 + 1e-12)
    assert sigmas[-2] >= table[0] * (1 - 1e-12)


@pytest.mark.parametrize(
    "name, first_t",
    [
        pytest.param("lavie_ddpm", 980, id="ddpm"),
        pytest.param("lavie_ddim", 981, id="ddim"),
        pytest.param("lavie_respaced", 999, id="respaced"),
        pytest.param("euler_discrete", 999, id="euler"),
    ],
)
def test_sigma_grid_starts_at_official_timestep(name, first_t):
    spec = S.SCHEDULES[name]
    assert S.get_sigmas(name, 50)[0] == spec.default_schedule.sigmas[first_t]


def test_euler_grid_matches_diffusers_interp_and_init_sigma():
    sched = S.LAVIE_DIFFUSERS_SCHEDULE
    diffusers_timesteps = np.linspace(0, N - 1, 50)[::-1]
    expected = np.interp(diffusers_timesteps, np.arange(N), sched.sigmas.numpy())
    sigmas = S.get_sigmas_euler(50)
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-12)
    # LAVIE_FACTS: "init_noise_sigma 157.4 with this beta schedule"
    assert S.initial_noise_scale(sigmas, "sigma") == pytest.approx(157.4, abs=0.05)


def test_ddim_final_sigma_is_alphas_cumprod_zero():
    sigmas = S.get_sigmas_ddim(50)
    a0 = float(S.LAVIE_DIFFUSERS_SCHEDULE.alphas_cumprod[0])
    assert a0 == pytest.approx(0.9999, rel=1e-6)
    assert float(sigmas[-1]) == pytest.approx(math.sqrt((1 - a0) / a0), rel=1e-12)
    assert S.final_vp_scale(sigmas) == pytest.approx(math.sqrt(a0), rel=1e-12)
    assert S.final_vp_scale(S.get_sigmas_ddpm(50)) == 1.0


def test_lavie_constants():
    assert S.LAVIE_BETAS.dtype == torch.float64
    assert S.LAVIE_BETAS.shape == (1000,)
    assert float(S.LAVIE_BETAS[0]) == pytest.approx(1e-4, rel=1e-12)
    assert float(S.LAVIE_BETAS[-1]) == pytest.approx(0.02, rel=1e-12)
    ac = S.alphas_cumprod_from_betas(S.LAVIE_BETAS)
    np.testing.assert_allclose(ac.numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-12)
    np.testing.assert_allclose(S.LAVIE_SCHEDULE.alphas_cumprod.numpy(), ac.numpy(), rtol=0)
    np.testing.assert_allclose(
        S.sigmas_from_alphas_cumprod(ac).numpy(), np.sqrt((1 - ac.numpy()) / ac.numpy()), rtol=1e-14
    )
    # diffusers rounds to float32: close to, but not equal to, the float64 schedule.
    diff = (S.LAVIE_DIFFUSERS_SCHEDULE.sigmas / S.LAVIE_SCHEDULE.sigmas - 1).abs().max()
    assert 1e-6 < float(diff) < 2e-4


@pytest.mark.parametrize(
    "n, sigma_min, sigma_max, rho",
    [
        pytest.param(1, 0.01, 157.4, 7.0, id="one-step"),
        pytest.param(10, 0.0292, 14.6146, 7.0, id="sd-range"),
        pytest.param(25, 0.01, 157.4, 3.0, id="lavie-range-rho3"),
    ],
)
def test_karras_endpoints_and_shape(n, sigma_min, sigma_max, rho):
    sigmas = S.get_sigmas_karras(n, sigma_min, sigma_max, rho)
    assert sigmas.shape == (n + 1,)
    assert sigmas[0] == pytest.approx(sigma_max, rel=1e-12)
    assert sigmas[-1] == 0
    if n > 1:
        assert sigmas[-2] == pytest.approx(sigma_min, rel=1e-12)
        spacing = np.diff(sigmas[:-1].numpy() ** (1 / rho))
        np.testing.assert_allclose(spacing, spacing[0], rtol=1e-9)
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_karras_registry_defaults_to_schedule_range():
    sigmas = S.get_sigmas("karras", 20)
    sched = S.LAVIE_DIFFUSERS_SCHEDULE
    assert sigmas[0] == pytest.approx(sched.sigma_max, rel=1e-12)
    assert sigmas[-2] == pytest.approx(sched.sigma_min, rel=1e-12)
    custom = S.get_sigmas("karras", 20, sigma_min=0.1, sigma_max=10.0)
    assert custom[0] == pytest.approx(10.0) and custom[-2] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "schedule", [S.LAVIE_SCHEDULE, S.LAVIE_DIFFUSERS_SCHEDULE], ids=["float64", "diffusers"]
)
def test_integer_timesteps_round_trip_exactly(schedule):
    t = torch.arange(schedule.num_timesteps, dtype=torch.float64)
    sigma = schedule.t_to_sigma(t)
    assert torch.equal(sigma, schedule.sigmas)
    assert torch.equal(schedule.sigma_to_t(sigma), t)


@FAST
@given(t=st.floats(min_value=0.0, max_value=999.0, allow_nan=False))
def test_float_timesteps_round_trip(t):
    sched = S.LAVIE_DIFFUSERS_SCHEDULE
    back = float(sched.sigma_to_t(sched.t_to_sigma(torch.tensor(t, dtype=torch.float64))))
    assert back == pytest.approx(t, abs=1e-9)


def test_t_to_sigma_is_numpy_interp_and_sigma_to_t_inverts_it():
    sched = S.LAVIE_SCHEDULE
    t = np.random.default_rng(0).uniform(0, 999, size=500)
    expected = np.interp(t, np.arange(1000), sched.sigmas.numpy())
    np.testing.assert_allclose(sched.t_to_sigma(torch.from_numpy(t)).numpy(), expected, rtol=1e-13)
    np.testing.assert_allclose(sched.sigma_to_t(torch.from_numpy(expected)).numpy(), t, atol=1e-9)


def test_sigma_to_t_clamps_out_of_range_and_keeps_float32():
    sched = S.LAVIE_SCHEDULE
    out = sched.sigma_to_t(torch.tensor([0.0, 1e6]))
    assert out.tolist() == [0.0, 999.0]
    t32 = sched.sigma_to_t(sched.sigmas[[981, 500]].float())
    assert t32.dtype == torch.float32
    np.testing.assert_allclose(t32.numpy(), [981, 500], atol=2e-3)


@pytest.mark.parametrize(
    "mode, expected",
    [
        pytest.param("vp", lambda s: math.sqrt(1 + s**2), id="vp"),
        pytest.param("sigma", lambda s: s, id="sigma"),
    ],
)
def test_initial_noise_scale(mode, expected):
    sigmas = S.get_sigmas_ddpm(50)
    assert S.initial_noise_scale(sigmas, mode) == pytest.approx(expected(float(sigmas[0])), rel=1e-12)


def test_schedule_noise_modes():
    assert {n: s.noise_mode for n, s in S.SCHEDULES.items()} == {
        "lavie_ddpm": "vp",
        "lavie_ddim": "vp",
        "lavie_respaced": "vp",
        "euler_discrete": "sigma",
        "karras": "sigma",
    }


@pytest.mark.parametrize(
    "call, exc, match",
    [
        pytest.param(lambda: S.ddpm_timesteps(0), ValueError, "steps must be >= 1", id="ddpm-zero-steps"),
        pytest.param(lambda: S.ddim_timesteps(-3), ValueError, "steps must be >= 1", id="ddim-negative"),
        pytest.param(lambda: S.euler_timesteps(1001), ValueError, "steps must be <= num_train_timesteps", id="too-many"),
        pytest.param(lambda: S.respaced_timesteps(2.5), TypeError, "steps must be an int", id="float-steps"),
        pytest.param(lambda: S.ddim_timesteps(1000), ValueError, "steps_offset=1 pushes", id="ddim-offset-overflow"),
        pytest.param(lambda: S.get_sigmas("nope", 10), ValueError, r"unknown schedule 'nope'; valid schedules: .*karras", id="unknown-schedule"),
        pytest.param(lambda: S.get_sigmas("lavie_ddpm", 0), ValueError, "steps must be >= 1", id="registry-zero-steps"),
        pytest.param(lambda: S.get_sigmas("lavie_ddpm", 10, rho=3.0), ValueError, r"does not accept \['rho'\]", id="bad-kwarg"),
        pytest.param(lambda: S.get_sigmas_karras(0, 0.1, 10.0), ValueError, "n must be >= 1", id="karras-zero"),
        pytest.param(lambda: S.get_sigmas_karras(5, 10.0, 0.1), ValueError, "sigma_min <= sigma_max", id="karras-swapped"),
        pytest.param(lambda: S.get_sigmas_karras(5, 0.1, 10.0, rho=0), ValueError, "rho must be > 0", id="karras-rho"),
        pytest.param(lambda: S.initial_noise_scale(torch.ones(3), "unit"), ValueError, "unknown noise mode 'unit'", id="noise-mode"),
        pytest.param(lambda: S.linear_betas(1000, 0.02, 1e-4), ValueError, "beta_start <= beta_end", id="betas-swapped"),
        pytest.param(lambda: S.DiscreteSchedule(torch.linspace(0.1, 0.9, 10)), ValueError, "strictly decreasing", id="ac-increasing"),
    ],
)
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
