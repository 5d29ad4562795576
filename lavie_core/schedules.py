"""Noise schedules, official LaVie timestep grids and sampler sigma grids.

Everything here lives in "sigma space": a noisy sample is ``x = x0 + sigma * eps``.
The variance-preserving latent used by DDPM-style code is ``x_vp = x / sqrt(1 + sigma^2)``
and ``alphas_cumprod = 1 / (1 + sigma^2)``.

Tables are built and kept in float64. Timestep grids are returned as int64 tensors
(float64 for the Euler grid, whose timesteps are fractional); sigma grids are float64
tensors on the CPU, decreasing, of length ``steps + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "LAVIE_BETA_START",
    "LAVIE_BETA_END",
    "LAVIE_NUM_TRAIN_TIMESTEPS",
    "LAVIE_BETAS",
    "LAVIE_SCHEDULE",
    "LAVIE_DIFFUSERS_SCHEDULE",
    "DiscreteSchedule",
    "linear_betas",
    "alphas_cumprod_from_betas",
    "sigmas_from_alphas_cumprod",
    "ddpm_timesteps",
    "ddim_timesteps",
    "euler_timesteps",
    "respaced_timesteps",
    "get_sigmas_ddpm",
    "get_sigmas_ddim",
    "get_sigmas_respaced",
    "get_sigmas_euler",
    "get_sigmas_karras",
    "initial_noise_scale",
    "final_vp_scale",
    "ScheduleSpec",
    "SCHEDULES",
    "get_schedule_spec",
    "get_sigmas",
]

LAVIE_BETA_START = 1e-4
LAVIE_BETA_END = 0.02
LAVIE_NUM_TRAIN_TIMESTEPS = 1000


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_steps(steps: int, num_train_timesteps: int) -> None:
    _check_int("steps", steps, 1)
    if steps > num_train_timesteps:
        raise ValueError(
            f"steps must be <= num_train_timesteps ({num_train_timesteps}), got {steps}"
        )


def linear_betas(
    num_train_timesteps: int = LAVIE_NUM_TRAIN_TIMESTEPS,
    beta_start: float = LAVIE_BETA_START,
    beta_end: float = LAVIE_BETA_END,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Linearly spaced betas, returned as float64.

    ``dtype`` is the precision the linspace is evaluated in: diffusers 0.16 builds its betas in
    float32, guided-diffusion (the interpolation sampler) in float64.
    """
    _check_int("num_train_timesteps", num_train_timesteps, 2)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype).to(torch.float64)


def alphas_cumprod_from_betas(
    betas: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Cumulative product of ``1 - betas``, evaluated in ``dtype`` and returned as float64."""
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must lie in the open interval (0, 1)")
    return torch.cumprod(1.0 - betas.to(dtype), dim=0).to(torch.float64)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sigma = sqrt((1 - a) / a)``, the sigma-space noise level of each training timestep."""
    ac = alphas_cumprod.to(torch.float64)
    return ((1.0 - ac) / ac).sqrt()


class DiscreteSchedule:
    """A discrete training schedule with a continuous map between timesteps and sigmas.

    The map is piecewise linear in sigma against t. diffusers' EulerDiscreteScheduler builds
    its sigmas with ``np.interp(timesteps, arange(n), sigmas)``, so this exact inverse gives
    back its fractional timesteps, and integer timesteps come back as the same integers.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D tensor with at least 2 entries, got shape {tuple(ac.shape)}"
            )
        if not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1)")
        self.alphas_cumprod = ac
        self.sigmas = sigmas_from_alphas_cumprod(ac)
        self._cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @classmethod
    def from_betas(cls, betas: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> "DiscreteSchedule":
        return cls(alphas_cumprod_from_betas(betas, dtype=dtype))

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _table(self, like: torch.Tensor) -> torch.Tensor:
        dtype = like.dtype if like.is_floating_point() else torch.float64
        key = (dtype, like.device)
        table = self._cache.get(key)
        if table is None:
            table = self.sigmas.to(device=like.device, dtype=dtype)
            self._cache[key] = table
        return table

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at (possibly fractional) timestep ``t``; ``t`` is clamped to [0, n-1]."""
        t = torch.as_tensor(t)
        table = self._table(t)
        t = t.to(table.dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        frac = t - low.to(t.dtype)
        return torch.lerp(table[low], table[low + 1], frac)

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Timestep (float) whose interpolated sigma is ``sigma``.

        Sigmas below ``sigma_min`` map to 0 and above ``sigma_max`` to n-1: a denoiser is never
        asked about noise levels outside the trained range.
        """
        sigma = torch.as_tensor(sigma)
        table = self._table(sigma)
        sigma = sigma.to(table.dtype)
        low = (torch.searchsorted(table, sigma.contiguous(), right=True) - 1).clamp(
            0, self.num_timesteps - 2
        )
        s_low, s_high = table[low], table[low + 1]
        frac = ((sigma - s_low) / (s_high - s_low)).clamp(0, 1)
        return low.to(table.dtype) + frac


LAVIE_BETAS: torch.Tensor = linear_betas()
"""Betas of all three LaVie models (linear 1e-4 .. 0.02, 1000 steps), float64."""

LAVIE_SCHEDULE = DiscreteSchedule.from_betas(LAVIE_BETAS)
"""The LaVie schedule in float64, as guided-diffusion (the interpolation sampler) computes it."""

LAVIE_DIFFUSERS_SCHEDULE = DiscreteSchedule.from_betas(
    linear_betas(dtype=torch.float32), dtype=torch.float32
)
"""The LaVie schedule with alphas_cumprod rounded the way diffusers 0.16 computes them
(float32 betas and cumprod): sigma(0) differs from the float64 value by 8e-5 relative, which is
what the official base and VSR samplers see."""


def ddpm_timesteps(steps: int, num_train_timesteps: int = LAVIE_NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """diffusers 0.16 DDPMScheduler grid: ``arange(steps) * (n // steps)``, descending."""
    _check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps // steps
    return (torch.arange(steps, dtype=torch.int64) * ratio).flip(0)


def ddim_timesteps(
    steps: int, num_train_timesteps: int = LAVIE_NUM_TRAIN_TIMESTEPS, steps_offset: int = 1
) -> torch.Tensor:
    """diffusers 0.16 DDIMScheduler grid: ``arange(steps) * (n // steps) + steps_offset``, descending."""
    _check_steps(steps, num_train_timesteps)
    _check_int("steps_offset", steps_offset, 0)
    ratio = num_train_timesteps // steps
    timesteps = torch.arange(steps, dtype=torch.int64) * ratio + steps_offset
    if int(timesteps[-1]) > num_train_timesteps - 1:
        raise ValueError(
            f"steps_offset={steps_offset} pushes the DDIM grid past timestep {num_train_timesteps - 1}"
        )
    return timesteps.flip(0)


def euler_timesteps(steps: int, num_train_timesteps: int = LAVIE_NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """diffusers 0.16 EulerDiscreteScheduler grid: ``linspace(0, n - 1, steps)`` reversed, float64."""
    _check_steps(steps, num_train_timesteps)
    return torch.linspace(0, num_train_timesteps - 1, steps, dtype=torch.float64).flip(0)


def respaced_timesteps(steps: int, num_train_timesteps: int = LAVIE_NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """guided-diffusion ``space_timesteps(n, str(steps))``, ascending.

    The stride is accumulated in a Python float and rounded with Python's ``round`` (ties to
    even), exactly as guided-diffusion does; that is ``round(i * (n - 1) / (steps - 1))`` except
    where accumulated rounding error tips a value across a .5 boundary.
    """
    _check_steps(steps, num_train_timesteps)
    stride = 1.0 if steps == 1 else (num_train_timesteps - 1) / (steps - 1)
    position = 0.0
    taken = []
    for _ in range(steps):
        taken.append(round(position))
        position += stride
    return torch.tensor(sorted(set(taken)), dtype=torch.int64)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_ddpm(steps: int, schedule: DiscreteSchedule = LAVIE_DIFFUSERS_SCHEDULE) -> torch.Tensor:
    """Sigmas at the DDPM grid, then 0 (diffusers uses alpha_prev = 1 after timestep 0)."""
    timesteps = ddpm_timesteps(steps, schedule.num_timesteps)
    return _append_zero(schedule.sigmas[timesteps])


def get_sigmas_ddim(
    steps: int, schedule: DiscreteSchedule = LAVIE_DIFFUSERS_SCHEDULE, steps_offset: int = 1
) -> torch.Tensor:
    """Sigmas at the DDIM grid, then sigma(t=0).

    With ``set_alpha_to_one=False`` diffusers' last "previous" alpha is ``alphas_cumprod[0]``, so
    the final sigma is ``sigma(0) > 0``. The official output is the VP latent at that level:
    ``x_vp = x * final_vp_scale(sigmas)``.
    """
    timesteps = ddim_timesteps(steps, schedule.num_timesteps, steps_offset)
    return torch.cat([schedule.sigmas[timesteps], schedule.sigmas[:1]])


def get_sigmas_respaced(steps: int, schedule: DiscreteSchedule = LAVIE_SCHEDULE) -> torch.Tensor:
    """Sigmas at the guided-diffusion respaced grid (descending), then 0.

    guided-diffusion's ``alphas_cumprod_prev`` starts at 1.0, so its last DDIM step lands on sigma 0.
    """
    timesteps = respaced_timesteps(steps, schedule.num_timesteps)
    return _append_zero(schedule.sigmas[timesteps.flip(0)])


def get_sigmas_euler(steps: int, schedule: DiscreteSchedule = LAVIE_DIFFUSERS_SCHEDULE) -> torch.Tensor:
    """diffusers 0.16 EulerDiscreteScheduler: sigma interpolated at the Euler grid, then 0."""
    timesteps = euler_timesteps(steps, schedule.num_timesteps)
    return _append_zero(schedule.t_to_sigma(timesteps))


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> torch.Tensor:
    """Karras et al. (2022) sigmas: uniform in ``sigma^(1/rho)`` from sigma_max to sigma_min, then 0."""
    _check_int("n", n, 1)
    if not 0.0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    # Pin the endpoints: the power round trip is off by an ulp or so.
    sigmas[0] = sigma_max
    if n > 1:
        sigmas[-1] = sigma_min
    return _append_zero(sigmas)


_NOISE_MODES = ("vp", "sigma")


def initial_noise_scale(sigmas: torch.Tensor, mode: str) -> float:
    """Factor turning a standard normal draw into the starting ``x`` (sigma space).

    ``"vp"``: the official DDPM/DDIM pipelines start from ``x_vp = randn`` (init_noise_sigma 1),
    i.e. ``x = randn * sqrt(1 + sigma_max^2)``.
    ``"sigma"``: diffusers 0.16 Euler (init_noise_sigma = max sigma) and k-diffusion,
    ``x = randn * sigma_max``.
    """
    if mode not in _NOISE_MODES:
        raise ValueError(f"unknown noise mode {mode!r}; valid modes: {', '.join(_NOISE_MODES)}")
    sigma_max = float(torch.as_tensor(sigmas).max())
    return math.sqrt(1.0 + sigma_max**2) if mode == "vp" else sigma_max


def final_vp_scale(sigmas: torch.Tensor) -> float:
    """``1 / sqrt(1 + sigma_last^2)``: multiply a sampler's output by it to get the VP latent.

    It is 1 when the grid ends at 0; for the DDIM grid it makes the result equal diffusers' output.
    """
    sigma_last = float(torch.as_tensor(sigmas)[-1])
    return 1.0 / math.sqrt(1.0 + sigma_last**2)


@dataclass(frozen=True)
class ScheduleSpec:
    """A named sigma grid: how to build it and how the official pipeline scales its first noise."""

    name: str
    build: Callable[..., torch.Tensor]
    noise_mode: str
    default_schedule: DiscreteSchedule


def _build_karras(
    steps: int,
    schedule: DiscreteSchedule,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> torch.Tensor:
    return get_sigmas_karras(
        steps,
        schedule.sigma_min if sigma_min is None else sigma_min,
        schedule.sigma_max if sigma_max is None else sigma_max,
        rho,
    )


SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        ScheduleSpec("lavie_ddpm", lambda steps, schedule: get_sigmas_ddpm(steps, schedule), "vp", LAVIE_DIFFUSERS_SCHEDULE),
        ScheduleSpec(
            "lavie_ddim",
            lambda steps, schedule, steps_offset=1: get_sigmas_ddim(steps, schedule, steps_offset),
            "vp",
            LAVIE_DIFFUSERS_SCHEDULE,
        ),
        ScheduleSpec("lavie_respaced", lambda steps, schedule: get_sigmas_respaced(steps, schedule), "vp", LAVIE_SCHEDULE),
        ScheduleSpec("euler_discrete", lambda steps, schedule: get_sigmas_euler(steps, schedule), "sigma", LAVIE_DIFFUSERS_SCHEDULE),
        ScheduleSpec("karras", _build_karras, "sigma", LAVIE_DIFFUSERS_SCHEDULE),
    )
}
"""Named sigma grids. lavie_ddpm / lavie_ddim / euler_discrete are the base model's three official
samplers (lavie_ddim with a v-prediction model is also the VSR one), lavie_respaced is the
interpolation model's."""


def get_schedule_spec(name: str) -> ScheduleSpec:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(
            f"unknown schedule {name!r}; valid schedules: {', '.join(sorted(SCHEDULES))}"
        ) from None


def get_sigmas(
    name: str, steps: int, schedule: DiscreteSchedule | None = None, **kwargs: float
) -> torch.Tensor:
    """The sigma grid ``name`` for ``steps`` sampler steps (float64, length steps + 1).

    ``schedule`` defaults to the one the official pipeline uses for that grid; extra keyword
    arguments go to the builder (``steps_offset`` for lavie_ddim; ``sigma_min``, ``sigma_max``,
    ``rho`` for karras).
    """
    spec = get_schedule_spec(name)
    try:
        return spec.build(steps, spec.default_schedule if schedule is None else schedule, **kwargs)
    except TypeError as exc:
        if kwargs and "unexpected keyword" in str(exc):
            raise ValueError(f"schedule {name!r} does not accept {sorted(kwargs)}") from None
        raise
