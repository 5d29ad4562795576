import math

import pytest
import torch

from lavie_core import schedules as S
from lavie_core.guidance import CFGDenoiser, DiscreteDenoiser, cfg_denoiser
from lavie_core.samplers import sample_euler

SCHED = S.LAVIE_DIFFUSERS_SCHEDULE


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_discrete_denoiser_recovers_x0_from_the_true_network_output(prediction, dtype):
    """A network that returns the true eps (or v) must give back the true x0."""
    timesteps = torch.tensor([0, 500, 999])
    x0 = _randn(3, 4, 2, 5, 5, seed=1)
    eps = _randn(3, 4, 2, 5, 5, seed=2)
    a = SCHED.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    x_vp = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    sigma = SCHED.sigmas[timesteps]
    x = x0 + sigma.view(-1, 1, 1, 1, 1) * eps
    seen = {}

    def unet(inp, t):
        seen["x_vp"], seen["t"] = inp, t
        return target.to(inp.dtype)

    denoiser = DiscreteDenoiser(unet, SCHED, prediction)
    out = denoiser(x.to(dtype), sigma)
    assert out.dtype == dtype and seen["x_vp"].dtype == dtype and seen["t"].dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(seen["x_vp"].double(), x_vp, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(seen["t"].double(), timesteps.double(), rtol=0, atol=tol)
    # sigma at t=999 is 157: float32 x carries ~1e-5 absolute error into x0.
    torch.testing.assert_close(out.double(), x0, rtol=tol, atol=tol * 200)


def test_v_and_eps_formulas_differ():
    """eps and v wrappers of the same network output must disagree (the formulas are not aliased)."""
    x = _randn(2, 4, 3, 3)
    sigma = SCHED.sigmas[[100, 700]]
    net = lambda inp, t: torch.ones_like(inp)  # noqa: E731
    eps_out = DiscreteDenoiser(net, SCHED, "epsilon")(x, sigma)
    v_out = DiscreteDenoiser(net, SCHED, "v")(x, sigma)
    assert not torch.allclose(eps_out, v_out)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(v_out, x / (1 + s**2) - s / (1 + s**2).sqrt())


def test_quantize_rounds_timesteps_from_float32_sigmas():
    sigma = SCHED.sigmas[[981, 1]].float()
    seen = []
    net = lambda inp, t: (seen.append(t), torch.zeros_like(inp))[1]  # noqa: E731
    x = torch.zeros(2, 4, 2, 2)
    DiscreteDenoiser(net, SCHED)(x, sigma)
    DiscreteDenoiser(net, SCHED, quantize=True)(x, sigma)
    assert seen[1].tolist() == [981.0, 1.0]
    assert torch.allclose(seen[0], seen[1], atol=1e-2)


def test_euler_grid_timesteps_are_fractional_without_quantize():
    seen = []
    net = lambda inp, t: (seen.append(float(t[0])), torch.zeros_like(inp))[1]  # noqa: E731
    sigmas = S.get_sigmas("euler_discrete", 50)
    sample_euler(DiscreteDenoiser(net, SCHED), torch.zeros(1, 4, 2, 2, dtype=torch.float64), sigmas)
    expected = S.euler_timesteps(50).tolist()
    assert seen == pytest.approx(expected, abs=1e-9)
    assert seen[1] == pytest.approx(978.612244898, abs=1e-9)


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda: DiscreteDenoiser(lambda x, t: x, SCHED, "x0"), "unknown prediction 'x0'", id="bad-prediction"),
        pytest.param(lambda: DiscreteDenoiser(lambda x, t: x, SCHED)(torch.zeros(2, 3), torch.ones(3)), r"sigma must have shape \[B\] = \[2\]", id="sigma-batch"),
        pytest.param(lambda: DiscreteDenoiser(lambda x, t: x, SCHED)(torch.zeros(2, 3), torch.tensor(1.0)), r"sigma must have shape", id="sigma-0d"),
    ],
)
def test_discrete_denoiser_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------


class ContextModel:
    """x0 model whose output depends on a per-sample context, a shared tensor and a flag."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.contexts: list[torch.Tensor] = []

    def __call__(self, x, sigma, *, context, shared=None, flag=1.0):
        self.batches.append(x.shape[0])
        self.contexts.append(context)
        assert context.shape[0] == x.shape[0] == sigma.shape[0]
        c = context.mean(dim=(1, 2)).view(-1, *([1] * (x.ndim - 1)))
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        out = torch.tanh(x * c) / (1 + s) + flag * c
        if shared is not None:
            assert shared.shape[0] == x.shape[0]
            out = out + shared.view(-1, *([1] * (x.ndim - 1)))
        return out


def _cfg_inputs(batch=2):
    x = _randn(batch, 4, 3, 6, 6, seed=3)
    sigma = SCHED.sigmas[torch.tensor([300, 900][:batch])]
    cond = {"context": _randn(batch, 7, 8, seed=4)}
    uncond = {"context": _randn(1, 7, 8, seed=5)}  # a single negative-prompt embedding for the batch
    return x, sigma, cond, uncond


@pytest.mark.parametrize("scale", [0.0, 4.0, 7.5], ids=lambda s: f"scale{s}")
@pytest.mark.parametrize("uncond_first", [True, False], ids=["uncond-first", "cond-first"])
def test_batched_cfg_equals_two_calls_and_formula(scale, uncond_first):
    x, sigma, cond, uncond = _cfg_inputs()
    extra = {"shared": _randn(2, seed=6), "flag": 0.5}

    batched_model, split_model = ContextModel(), ContextModel()
    batched = cfg_denoiser(batched_model, cond, uncond, scale, uncond_first=uncond_first)(x, sigma, **extra)
    split = cfg_denoiser(split_model, cond, uncond, scale, batched=False)(x, sigma, **extra)

    assert batched_model.batches == [4] and split_model.batches == [2, 2]
    torch.testing.assert_close(batched, split, rtol=1e-12, atol=1e-12)

    plain = ContextModel()
    u = plain(x, sigma, context=uncond["context"].expand(2, -1, -1), **extra)
    c = plain(x, sigma, context=cond["context"], **extra)
    torch.testing.assert_close(batched, u + scale * (c - u), rtol=1e-12, atol=1e-12)

    halves = batched_model.contexts[0].split(2)
    first_is_uncond = torch.equal(halves[0], uncond["context"].expand(2, -1, -1))
    assert first_is_uncond == uncond_first


def test_scale_one_skips_the_uncond_call():
    x, sigma, cond, uncond = _cfg_inputs()
    model = ContextModel()
    out = cfg_denoiser(model, cond, uncond, 1.0)(x, sigma)
    assert model.batches == [2]
    assert torch.equal(model.contexts[0], cond["context"])
    torch.testing.assert_close(out, ContextModel()(x, sigma, **cond))


def test_guidance_actually_changes_the_output():
    x, sigma, cond, uncond = _cfg_inputs()
    low = cfg_denoiser(ContextModel(), cond, uncond, 1.0)(x, sigma)
    high = cfg_denoiser(ContextModel(), cond, uncond, 7.5)(x, sigma)
    assert not torch.allclose(low, high)


class AffineNet:
    """A VP network ``net(x_vp, t, context) -> eps or v`` that depends on its context."""

    def __call__(self, x_vp, t, *, context):
        c = context.mean(dim=(1, 2)).view(-1, *([1] * (x_vp.ndim - 1)))
        tt = t.to(x_vp.dtype).view(-1, *([1] * (x_vp.ndim - 1)))
        return torch.sin(x_vp + c) * (1 + tt / 1000) + c**2


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_cfg_on_x0_equals_cfg_on_network_output(prediction):
    """x0 is affine in eps/v with conditioning-independent coefficients, so guiding either is the same."""
    x, sigma, cond, uncond = _cfg_inputs()
    net = AffineNet()
    scale = 6.0
    guided = cfg_denoiser(DiscreteDenoiser(net, SCHED, prediction), cond, uncond, scale)(x, sigma)

    s = sigma.view(-1, 1, 1, 1, 1)
    x_vp = x / (1 + s**2).sqrt()
    t = SCHED.sigma_to_t(sigma)
    out_u = net(x_vp, t, context=uncond["context"].expand(2, -1, -1))
    out_c = net(x_vp, t, context=cond["context"])
    out = out_u + scale * (out_c - out_u)
    if prediction == "epsilon":
        expected = x - s * out
    else:
        a = 1 / (1 + s**2)
        expected = a.sqrt() * x_vp - (1 - a).sqrt() * out
    torch.testing.assert_close(guided, expected, rtol=1e-10, atol=1e-10)


def test_cfg_inside_a_sampler_batched_equals_split():
    _, _, cond, uncond = _cfg_inputs(batch=1)
    sigmas = S.get_sigmas("lavie_ddim", 10)
    x = _randn(1, 4, 3, 6, 6, seed=8) * S.initial_noise_scale(sigmas, "vp")
    denoiser = DiscreteDenoiser(AffineNet(), SCHED)
    a = sample_euler(cfg_denoiser(denoiser, cond, uncond, 7.5), x, sigmas)
    b = sample_euler(cfg_denoiser(denoiser, cond, uncond, 7.5, batched=False), x, sigmas)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_split_cfg_allows_different_non_tensor_conditioning():
    x, sigma, cond, uncond = _cfg_inputs()
    model = ContextModel()
    cfg = CFGDenoiser(model, {**cond, "flag": 1.0}, {**uncond, "flag": 0.0}, 3.0, batched=False)
    assert cfg(x, sigma).shape == x.shape
    with pytest.raises(ValueError, match="cannot merge conditioning 'flag'.*batched=False"):
        CFGDenoiser(ContextModel(), {**cond, "flag": 1.0}, {**uncond, "flag": 0.0}, 3.0)(x, sigma)


@pytest.mark.parametrize(
    "cond, uncond, match",
    [
        pytest.param({"context": _randn(2, 7, 8)}, {}, r"same keys, got \['context'\] and \[\]", id="missing-key"),
        pytest.param({"context": _randn(3, 7, 8)}, {"context": _randn(1, 7, 8)}, "'context' has batch 3, expected 1 or 2", id="bad-batch"),
        pytest.param({"context": torch.tensor(1.0)}, {"context": torch.tensor(0.0)}, "must have a batch dimension", id="0d-context"),
    ],
)
def test_batched_cfg_bad_conditioning(cond, uncond, match):
    x, sigma, _, _ = _cfg_inputs()
    with pytest.raises(ValueError, match=match):
        cfg_denoiser(ContextModel(), cond, uncond, 5.0)(x, sigma)


class TwoAnswers:
    """A network that answers every context for one x: `(n b) ...` outputs, like LaVieUNet's shared prefix."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, *, context, concat=None):
        self.seen.append(dict(x=x, t=t, context=context, concat=concat))
        n = context.shape[0] // x.shape[0]
        base = x + (0 if concat is None else concat)
        return base.repeat(n, *(1,) * (x.ndim - 1)) * context.view(-1, *(1,) * (x.ndim - 1))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("uncond_first", [True, False], ids=["uncond-first", "cond-first"])
def test_shared_input_cfg_equals_the_doubled_batch(prediction, uncond_first):
    net = TwoAnswers()
    denoiser = DiscreteDenoiser(net, SCHED, prediction)
    x, concat = _randn(2, 4, 3, 3, seed=1), _randn(2, 4, 3, 3, seed=2)
    sigma = SCHED.sigmas[[100, 700]]
    cond, uncond = {"context": torch.tensor([2.0, 3.0], dtype=torch.float64)}, {"context": torch.tensor([-1.0, 0.5], dtype=torch.float64)}
    kwargs = dict(batched=True, uncond_first=uncond_first)
    shared = CFGDenoiser(denoiser, cond, uncond, 5.0, shared_input=True, **kwargs)(x, sigma, concat=concat)
    seen = net.seen[-1]
    assert seen["x"].shape[0] == 2 and seen["concat"].shape[0] == 2 and seen["context"].shape[0] == 4
    doubled = CFGDenoiser(denoiser, cond, uncond, 5.0, **kwargs)(x, sigma, concat=concat)
    assert net.seen[-1]["x"].shape[0] == 4
    torch.testing.assert_close(shared, doubled, rtol=1e-12, atol=1e-12)


def test_network_batch_that_is_no_multiple_is_named():
    net = lambda inp, t: torch.zeros(3, *inp.shape[1:], dtype=inp.dtype)  # noqa: E731
    with pytest.raises(ValueError, match="network returned batch 3 for an input batch of 2"):
        DiscreteDenoiser(net, SCHED)(_randn(2, 4, 3, 3), SCHED.sigmas[[1, 2]])
