import math

import numpy as np
import pytest
import torch

from lavie_core import samplers as K
from lavie_core import schedules as S
from lavie_core.guidance import DiscreteDenoiser

# ---------------------------------------------------------------------------
# Gaussian toy problem: data ~ N(mu, s^2) independently per element, with mu and s
# varying per channel, so the exact denoiser is E[x0 | x] = (s^2 x + sigma^2 mu) / (s^2 + sigma^2).
# ---------------------------------------------------------------------------

MU = torch.tensor([0.5, -1.0, 0.0])
STD = torch.tensor([1.0, 0.5, 2.0])
SHAPE = (2, 3, 4, 32, 32)  # [B, C, F, H, W]: 8192 samples per channel


def _channel(v: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).view(1, -1, *([1] * (ndim - 2)))


class GaussianDenoiser:
    def __init__(self) -> None:
        self.calls = 0
        self.sigma_dtypes: set[torch.dtype] = set()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        self.calls += 1
        self.sigma_dtypes.add(sigma.dtype)
        mu, s = _channel(MU, x.ndim, x.dtype), _channel(STD, x.ndim, x.dtype)
        sg2 = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) ** 2
        return (s**2 * x + sg2 * mu) / (s**2 + sg2)


def _start(sigmas: torch.Tensor, seed: int = 0, shape=SHAPE, dtype=torch.float32):
    """Exact sample of the noised marginal at sigmas[0], and the standard normal it came from."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    mu, s = _channel(MU, len(shape), dtype), _channel(STD, len(shape), dtype)
    return mu + (s**2 + float(sigmas[0]) ** 2).sqrt() * z, z


def _channel_stats(x: torch.Tensor):
    dims = [d for d in range(x.ndim) if d != 1]
    return x.mean(dim=dims), x.std(dim=dims)


DISTRIBUTION_CASES = [
    pytest.param("euler", "lavie_ddim", 50, id="euler-ddim50"),
    pytest.param("ddim", "lavie_ddim", 50, id="ddim-ddim50"),
    pytest.param("euler", "euler_discrete", 50, id="euler-euler50"),
    pytest.param("heun", "karras", 30, id="heun-karras30"),
    pytest.param("dpmpp_2m", "karras", 30, id="dpmpp_2m-karras30"),
    pytest.param("dpmpp_2m", "lavie_ddpm", 100, id="dpmpp_2m-ddpm100"),
    pytest.param("ddim", "lavie_respaced", 50, id="ddim-respaced50"),
    pytest.param("ddpm", "lavie_ddpm", 250, id="ddpm-ddpm250"),
    pytest.param("euler_ancestral", "lavie_ddpm", 250, id="euler_ancestral-ddpm250"),
]


@pytest.mark.parametrize("sampler, schedule, steps", DISTRIBUTION_CASES)
def test_sampler_recovers_gaussian_data_distribution(sampler, schedule, steps):
    sigmas = S.get_sigmas(schedule, steps)
    x, _ = _start(sigmas, seed=1)
    model = GaussianDenoiser()
    out = K.get_sampler(sampler)(model, x, sigmas, generator=torch.Generator().manual_seed(2))
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert torch.isfinite(out).all()
    mean, std = _channel_stats(out)
    torch.testing.assert_close((mean - MU) / STD, torch.zeros(3), atol=0.05, rtol=0)
    torch.testing.assert_close(std / STD, torch.ones(3), atol=0.06, rtol=0)


def test_wrong_denoiser_fails_the_distribution_check():
    """Guards the distribution check itself: a denoiser for N(0, 1) data must not pass it."""
    sigmas = S.get_sigmas("lavie_ddim", 50)
    x, _ = _start(sigmas, seed=1)

    def standard_normal_denoiser(x, sigma):
        sg2 = sigma.to(x.dtype).view(-1, 1, 1, 1, 1) ** 2
        return x / (1 + sg2)

    out = K.sample_euler(standard_normal_denoiser, x, sigmas)
    mean, std = _channel_stats(out)
    assert not torch.allclose(std / STD, torch.ones(3), atol=0.06)


@pytest.mark.parametrize(
    "sampler, steps, max_err",
    [
        pytest.param("euler", 40, 0.6, id="euler"),
        pytest.param("heun", 40, 0.08, id="heun"),
        pytest.param("dpmpp_2m", 40, 0.08, id="dpmpp_2m"),
    ],
)
def test_deterministic_samplers_follow_the_exact_ode_and_converge(sampler, steps, max_err):
    """For Gaussian data the probability-flow ODE is solvable: x - mu scales with sqrt(s^2 + sigma^2)."""
    fn = K.get_sampler(sampler)
    shape = (1, 3, 64, 64)
    mu, s = _channel(MU, 4, torch.float64), _channel(STD, 4, torch.float64)
    errors = []
    for n in (steps, 2 * steps):
        sigmas = S.get_sigmas("karras", n)
        x, z = _start(sigmas, shape=shape, dtype=torch.float64)
        exact = mu + z * (s**2 + float(sigmas[-1]) ** 2).sqrt()
        errors.append(float((fn(GaussianDenoiser(), x, sigmas) - exact).abs().max()))
    assert errors[0] < max_err
    order = math.log2(errors[0] / errors[1])
    expected_order = 1 if sampler == "euler" else 2
    assert order == pytest.approx(expected_order, abs=0.35)


# ---------------------------------------------------------------------------
# Equivalence with the official samplers, written in alpha form (VP space) the way
# diffusers 0.16 / guided-diffusion do it, driving a nonlinear toy network.
# ---------------------------------------------------------------------------


class ToyNet:
    """A network ``net(x_vp, t) -> eps or v`` that depends nonlinearly on x and t."""

    def __init__(self) -> None:
        self.timesteps: list[float] = []

    def __call__(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x_vp.shape[0],)
        self.timesteps.append(float(t[0]))
        tt = t.to(x_vp.dtype).view(-1, *([1] * (x_vp.ndim - 1)))
        return torch.tanh(0.7 * x_vp) * (1 + tt / 1000) + 0.05 * torch.cos(tt / 100 + x_vp)


def _x0_eps(out, x_vp, a, prediction):
    if prediction == "epsilon":
        return (x_vp - math.sqrt(1 - a) * out) / math.sqrt(a), out
    return math.sqrt(a) * x_vp - math.sqrt(1 - a) * out, math.sqrt(a) * out + math.sqrt(1 - a) * x_vp


def ref_diffusers_ddim(net, x_vp, steps, ac, prediction, eta, generator):
    """diffusers 0.16 DDIMScheduler.step, set_alpha_to_one=False, steps_offset=1."""
    for t in S.ddim_timesteps(steps).tolist():
        prev_t = t - 1000 // steps
        a, a_prev = ac[t], (ac[prev_t] if prev_t >= 0 else ac[0])
        x0, eps = _x0_eps(net(x_vp, torch.full([x_vp.shape[0]], float(t), dtype=x_vp.dtype)), x_vp, a, prediction)
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        std = eta * math.sqrt(var)
        x_vp = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
        if eta > 0:
            x_vp = x_vp + std * torch.randn(x_vp.shape, generator=generator, dtype=x_vp.dtype)
    return x_vp


def ref_diffusers_ddpm(net, x_vp, steps, ac, prediction, eta, generator):
    """diffusers 0.16 DDPMScheduler.step, variance_type fixed_small, clip_sample False."""
    for t in S.ddpm_timesteps(steps).tolist():
        prev_t = t - 1000 // steps
        a, a_prev = ac[t], (ac[prev_t] if prev_t >= 0 else 1.0)
        beta = 1 - a / a_prev
        x0, _ = _x0_eps(net(x_vp, torch.full([x_vp.shape[0]], float(t), dtype=x_vp.dtype)), x_vp, a, prediction)
        mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x_vp
        if t > 0:
            var = max((1 - a_prev) / (1 - a) * beta, 1e-20)
            mean = mean + math.sqrt(var) * torch.randn(x_vp.shape, generator=generator, dtype=x_vp.dtype)
        x_vp = mean
    return x_vp


def ref_guided_diffusion_ddim(net, x_vp, steps, ac, prediction, eta, generator):
    """guided-diffusion ddim_sample_loop on the respaced schedule, eta 0, original timesteps to the model."""
    kept = S.respaced_timesteps(steps).tolist()
    respaced_ac = [ac[t] for t in kept]
    respaced_prev = [1.0] + respaced_ac[:-1]
    for i in reversed(range(len(kept))):
        a, a_prev = respaced_ac[i], respaced_prev[i]
        x0, _ = _x0_eps(net(x_vp, torch.full([x_vp.shape[0]], float(kept[i]), dtype=x_vp.dtype)), x_vp, a, prediction)
        eps = (x_vp / math.sqrt(a) - x0) / math.sqrt(1 / a - 1)
        x_vp = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x_vp


def ref_diffusers_euler(net, x_vp, steps, ac, prediction, eta, generator):
    """diffusers 0.16 EulerDiscreteScheduler (s_churn 0). Input: the unit-variance draw."""
    sigma_table = np.sqrt((1 - np.asarray(ac)) / np.asarray(ac))
    timesteps = np.linspace(0, 999, steps)[::-1]
    sigmas = np.append(np.interp(timesteps, np.arange(1000), sigma_table), 0.0)
    x = x_vp * sigmas.max()
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        eps = net(x / math.sqrt(sigma**2 + 1), torch.full([x.shape[0]], float(t), dtype=x.dtype))
        x0 = x - sigma * eps
        x = x + (x - x0) / sigma * (sigmas[i + 1] - sigma)
    return x


EQUIVALENCE_CASES = [
    pytest.param("euler", {}, "lavie_ddim", "epsilon", ref_diffusers_ddim, 0.0, "vp", id="euler=ddim-eps"),
    pytest.param("ddim", {}, "lavie_ddim", "v", ref_diffusers_ddim, 0.0, "vp", id="ddim=ddim-v(vsr)"),
    pytest.param("ddim", {"eta": 0.5}, "lavie_ddim", "epsilon", ref_diffusers_ddim, 0.5, "vp", id="ddim-eta0.5"),
    pytest.param("euler_ancestral", {}, "lavie_ddpm", "epsilon", ref_diffusers_ddpm, 1.0, "vp", id="euler_ancestral=ddpm"),
    pytest.param("ddpm", {}, "lavie_ddpm", "epsilon", ref_diffusers_ddpm, 1.0, "vp", id="ddpm=ddpm"),
    pytest.param("ddim", {}, "lavie_respaced", "epsilon", ref_guided_diffusion_ddim, 0.0, "vp", id="ddim=guided-diffusion-respaced"),
    pytest.param("euler", {}, "euler_discrete", "epsilon", ref_diffusers_euler, 0.0, "sigma", id="euler=diffusers-euler"),
]


@pytest.mark.parametrize("sampler, kwargs, schedule_name, prediction, reference, eta, noise_mode", EQUIVALENCE_CASES)
@pytest.mark.parametrize("steps", [50, 7], ids=["50steps", "7steps"])
def test_sampler_equals_official_update(sampler, kwargs, schedule_name, prediction, reference, eta, noise_mode, steps):
    spec = S.get_schedule_spec(schedule_name)
    schedule = spec.default_schedule
    assert spec.noise_mode == noise_mode
    ac = schedule.alphas_cumprod.tolist()
    unit = torch.randn((1, 2, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    ref_net = ToyNet()
    expected = reference(ref_net, unit.clone(), steps, ac, prediction, eta, torch.Generator().manual_seed(9))

    sigmas = S.get_sigmas(schedule_name, steps)
    ours_net = ToyNet()
    x = unit * S.initial_noise_scale(sigmas, noise_mode)
    out = K.get_sampler(sampler)(
        DiscreteDenoiser(ours_net, schedule, prediction),
        x,
        sigmas,
        generator=torch.Generator().manual_seed(9),
        **kwargs,
    )
    got = out * S.final_vp_scale(sigmas)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours_net.timesteps, ref_net.timesteps, rtol=0, atol=1e-9)


def test_ddim_grid_output_needs_final_vp_scale():
    """Without the final rescale the DDIM result is off by sqrt(1 + sigma(0)^2): the test above is sensitive to it."""
    sigmas = S.get_sigmas("lavie_ddim", 10)
    unit = torch.randn((1, 2, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    schedule = S.LAVIE_DIFFUSERS_SCHEDULE
    expected = ref_diffusers_ddim(ToyNet(), unit, 10, schedule.alphas_cumprod.tolist(), "epsilon", 0.0, None)
    out = K.sample_euler(DiscreteDenoiser(ToyNet(), schedule), unit * S.initial_noise_scale(sigmas, "vp"), sigmas)
    assert not torch.allclose(out, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(out * S.final_vp_scale(sigmas), expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# Randomness, callbacks, dtypes
# ---------------------------------------------------------------------------

STOCHASTIC = ["ddpm", "euler_ancestral"]
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp_2m"]


def _run(name, seed, steps=8):
    sigmas = S.get_sigmas("lavie_ddpm", steps)
    x, _ = _start(sigmas, seed=0, shape=(2, 3, 2, 4, 4))
    gen = torch.Generator().manual_seed(seed)
    return K.get_sampler(name)(GaussianDenoiser(), x, sigmas, generator=gen)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_seeding(name):
    assert torch.equal(_run(name, 123), _run(name, 123))
    assert not torch.allclose(_run(name, 123), _run(name, 124))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_ignores_generator(name):
    assert torch.equal(_run(name, 123), _run(name, 124))


def test_ddpm_draws_no_noise_for_the_step_into_zero():
    """diffusers adds no noise at t=0; our last step must not consume the generator either."""
    sigmas = S.get_sigmas("lavie_ddpm", 4)
    x, _ = _start(sigmas, shape=(1, 3, 2, 2))
    gen = torch.Generator().manual_seed(0)
    K.sample_ddpm(GaussianDenoiser(), x, sigmas, generator=gen)
    replay = torch.Generator().manual_seed(0)
    for _ in range(3):
        torch.randn(x.shape, generator=replay)
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=replay))


@pytest.mark.parametrize("name", sorted(K.SAMPLERS))
def test_callback_reports_every_step(name):
    sigmas = S.get_sigmas("karras", 6)
    x, _ = _start(sigmas, shape=(2, 3, 2, 2))
    seen = []
    out = K.get_sampler(name)(GaussianDenoiser(), x, sigmas, callback=seen.append, generator=torch.Generator().manual_seed(0))
    assert [d["i"] for d in seen] == list(range(6))
    assert [float(d["sigma"]) for d in seen] == sigmas[:-1].tolist()
    assert [float(d["sigma_next"]) for d in seen] == sigmas[1:].tolist()
    assert all(d["denoised"].shape == x.shape for d in seen)
    assert torch.equal(seen[-1]["x"], out)


@pytest.mark.parametrize("name", sorted(K.SAMPLERS))
def test_the_loop_never_reads_a_value_off_the_device(name):
    # On the meta device any read of a tensor's value raises, so this runs each sampler through the same
    # code paths as on a GPU, where such a read would make the host wait for every model call.
    sigmas = S.get_sigmas("lavie_ddpm", 5)
    x = torch.empty(1, 3, 2, 2, device="meta")
    seen = []

    def callback(info):
        seen.append((float(info["sigma"]), float(info["sigma_next"])))

    out = K.get_sampler(name)(lambda x, sigma: x * 0.5, x, sigmas, callback=callback, generator=torch.Generator())
    assert out.device.type == "meta"
    assert seen == list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(K.SAMPLERS))
def test_cuda_loop_queues_steps_without_waiting(name):
    # After the first model call nothing in the loop synchronises with the GPU (CPU generator included).
    sigmas = S.get_sigmas("lavie_ddpm", 4)
    x = torch.randn(1, 3, 2, 8, 8, device="cuda")
    calls = []

    def model(x, sigma):
        calls.append(sigma)
        torch.cuda.set_sync_debug_mode("error")
        return x * 0.5

    try:
        out = K.get_sampler(name)(model, x, sigmas, callback=lambda info: float(info["sigma"]),
                                  generator=torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(calls) >= 4 and torch.isfinite(out).all()


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("name", sorted(K.SAMPLERS))
def test_callback_exception_cancels_sampling(name):
    sigmas = S.get_sigmas("karras", 10)
    x, _ = _start(sigmas, shape=(1, 3, 2, 2))
    model = GaussianDenoiser()

    def cancel_at_step_2(info):
        if info["i"] == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        K.get_sampler(name)(model, x, sigmas, callback=cancel_at_step_2)
    assert model.calls <= 6  # at most 2 calls per step for 3 steps, nowhere near 10 steps


@pytest.mark.parametrize("name", sorted(K.SAMPLERS))
def test_extra_args_reach_the_model(name):
    sigmas = S.get_sigmas("karras", 3)
    x, _ = _start(sigmas, shape=(1, 3, 2, 2))
    received = []

    def model(x, sigma, *, context, flag):
        received.append((context, flag))
        return x * 0

    K.get_sampler(name)(model, x, sigmas, extra_args={"context": "ctx", "flag": 7})
    assert received and all(r == ("ctx", 7) for r in received)


@pytest.mark.parametrize(
    "x_dtype, sigma_dtype, expected_sigma_dtype",
    [
        pytest.param(torch.float32, torch.float64, torch.float64, id="f32-x-f64-sigmas"),
        pytest.param(torch.float32, torch.float32, torch.float32, id="f32-both"),
        pytest.param(torch.float64, torch.float32, torch.float64, id="f64-x"),
    ],
)
def test_dtypes(x_dtype, sigma_dtype, expected_sigma_dtype):
    sigmas = S.get_sigmas("lavie_ddpm", 5).to(sigma_dtype)
    x, _ = _start(sigmas, shape=(2, 3, 2, 2), dtype=x_dtype)
    model = GaussianDenoiser()
    for name in sorted(K.SAMPLERS):
        assert K.get_sampler(name)(model, x, sigmas, generator=torch.Generator().manual_seed(0)).dtype == x_dtype
    assert model.sigma_dtypes == {expected_sigma_dtype}


def test_ancestral_step_limits():
    assert K.ancestral_step(10.0, 0.0) == (0.0, 0.0)
    assert K.ancestral_step(10.0, 5.0, eta=0.0) == (5.0, 0.0)
    down, up = K.ancestral_step(10.0, 5.0, eta=1.0)
    assert up == pytest.approx(5.0 * math.sqrt(1 - 0.25))
    assert down**2 + up**2 == pytest.approx(25.0)


def test_registry_names():
    assert set(K.SAMPLERS) == {"ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"}


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda: K.get_sampler("dpm_fast"), r"unknown sampler 'dpm_fast'; valid samplers: ddim, ddpm, dpmpp_2m, euler", id="unknown-sampler"),
        pytest.param(lambda: K.sample_euler(GaussianDenoiser(), torch.zeros(1, 3, 2), torch.tensor([1.0])), "at least 2 entries", id="one-sigma"),
        pytest.param(lambda: K.sample_euler(GaussianDenoiser(), torch.zeros(1, 3, 2), torch.ones(2, 2)), "1-D tensor", id="2d-sigmas"),
        pytest.param(lambda: K.sample_heun(GaussianDenoiser(), torch.zeros(1, 3, 2), torch.tensor([1.0, 2.0, 0.0])), "non-increasing", id="increasing-sigmas"),
        pytest.param(lambda: K.sample_dpmpp_2m(GaussianDenoiser(), torch.zeros(1, 3, 2), torch.tensor([1.0, -1.0])), "non-negative", id="negative-sigma"),
        pytest.param(lambda: K.sample_euler_ancestral(GaussianDenoiser(), torch.zeros(1, 3, 2), torch.tensor([1.0, 0.0]), eta=-1), "eta must be >= 0", id="negative-eta"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
