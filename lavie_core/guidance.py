"""Network wrappers that turn an epsilon/v UNet into a sigma-space denoiser, and CFG.

Denoisers follow the ``model(x, sigma, **kwargs) -> x0`` convention of ``lavie_core.samplers``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .schedules import DiscreteSchedule

__all__ = ["DiscreteDenoiser", "CFGDenoiser", "cfg_denoiser", "PREDICTIONS"]

PREDICTIONS = ("epsilon", "v")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[B]`` coefficient to broadcast over ``like`` and match its dtype."""
    return values.to(like.dtype).reshape(values.shape[0], *([1] * (like.ndim - 1)))


class DiscreteDenoiser:
    """Wrap ``unet(x_vp, t, **kwargs) -> eps | v`` trained on a discrete schedule.

    The network sees the VP input ``x_vp = x / sqrt(1 + sigma^2)`` and the (float) training
    timestep ``t = schedule.sigma_to_t(sigma)``. ``quantize=True`` rounds ``t`` to the nearest
    integer, which reproduces the integer timesteps of DDPM/DDIM/respaced grids bit for bit when
    sigma has been rounded to float32; leave it off for diffusers' Euler grid, whose timesteps
    are fractional. Build the sigma grid from the same ``schedule`` object so the timesteps line up.
    """

    def __init__(
        self,
        unet: Callable[..., torch.Tensor],
        schedule: DiscreteSchedule,
        prediction: str = "epsilon",
        *,
        quantize: bool = False,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = quantize

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self.schedule.sigma_to_t(sigma)
        return t.round() if self.quantize else t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise ValueError(
                f"sigma must have shape [B] = [{x.shape[0]}], got {tuple(sigma.shape)}"
            )
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = self.sigma_to_t(sigma).to(t_dtype)
        wide = sigma.to(torch.float64) if sigma.device.type != "mps" else sigma
        s = _per_sample(wide, x)
        c_in = _per_sample((1.0 + wide**2).rsqrt(), x)
        out = self.unet(x * c_in, t, **kwargs)
        if out.shape[0] != x.shape[0]:
            # A network answering several conditionings per sample returns them as `(n b) ...`.
            if out.shape[0] % x.shape[0]:
                raise ValueError(f"network returned batch {out.shape[0]} for an input batch of {x.shape[0]}")
            n = out.shape[0] // x.shape[0]
            x, s, c_in = (v.repeat(n, *(1,) * (v.ndim - 1)) for v in (x, s, c_in))
        if self.prediction == "epsilon":
            # x = x0 + sigma * eps
            return x - s * out
        # v = sqrt(a) eps - sqrt(1 - a) x0 with a = 1 / (1 + sigma^2)  =>  x0 = a x - sigma sqrt(a) v
        return x * c_in * c_in - s * c_in * out


def _fit_batch(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    if value.ndim == 0:
        raise ValueError(f"conditioning {name!r} must have a batch dimension, got a 0-dim tensor")
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(
        f"conditioning {name!r} has batch {value.shape[0]}, expected 1 or {batch} (the batch of x)"
    )


def _expand_singletons(values: Mapping[str, Any], batch: int) -> dict[str, Any]:
    # Lets a single negative-prompt embedding serve the whole batch, as in the batched path.
    return {
        key: value.expand(batch, *value.shape[1:])
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 1
        else value
        for key, value in values.items()
    }


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


class CFGDenoiser:
    """Classifier-free guidance on a denoiser's x0: ``uncond + scale * (cond - uncond)``.

    For epsilon and v parametrisations x0 is affine in the network output with coefficients that
    do not depend on the conditioning, so guiding x0 equals guiding eps (or v).

    ``cond``/``uncond`` are keyword arguments for the model (e.g. ``{"context": tensor}``), used on
    top of the sampler's ``extra_args``. ``batched=True`` runs both branches in one call on a
    doubled batch; conditioning tensors with batch 1 are expanded to the batch of x, shared
    tensors whose first dimension is the batch are repeated, other values are passed through.
    ``batched=False`` makes two calls and needs less memory; batch-1 conditioning tensors are
    expanded there too. ``shared_input=True`` (with ``batched``) passes x, sigma and the shared
    tensors once and only the conditioning doubled, for models that return one output per
    conditioning (``LaVieUNet`` then runs its text-free first layers once). ``uncond_first`` sets the order of
    the halves of the doubled batch (the base and VSR pipelines put uncond first, the interpolation
    one cond first); it only matters for bit-level parity. ``scale == 1`` skips the uncond branch.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any],
        scale: float,
        *,
        batched: bool = True,
        uncond_first: bool = True,
        shared_input: bool = False,
    ) -> None:
        if batched and set(cond) != set(uncond):
            raise ValueError(
                "batched CFG needs cond and uncond with the same keys, got "
                f"{sorted(cond)} and {sorted(uncond)}"
            )
        self.model = model
        self.cond = dict(cond)
        self.uncond = dict(uncond)
        self.scale = float(scale)
        self.batched = batched
        self.uncond_first = uncond_first
        self.shared_input = shared_input

    def _batched_kwargs(self, batch: int, shared: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for key, value in shared.items():
            if key in self.cond:
                continue
            if (
                not self.shared_input
                and isinstance(value, torch.Tensor)
                and value.ndim > 0
                and value.shape[0] == batch
            ):
                value = torch.cat([value, value])
            kwargs[key] = value
        for key in self.cond:
            u, c = self.uncond[key], self.cond[key]
            if isinstance(u, torch.Tensor) and isinstance(c, torch.Tensor):
                u, c = _fit_batch(key, u, batch), _fit_batch(key, c, batch)
                kwargs[key] = torch.cat([u, c] if self.uncond_first else [c, u])
            elif _same(u, c):
                kwargs[key] = c
            else:
                raise ValueError(
                    f"batched CFG cannot merge conditioning {key!r}: values differ and are not tensors; "
                    "use batched=False"
                )
        return kwargs

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.scale == 1.0:
            return self.model(x, sigma, **{**kwargs, **_expand_singletons(self.cond, x.shape[0])})
        if not self.batched:
            batch = x.shape[0]
            uncond_out = self.model(x, sigma, **{**kwargs, **_expand_singletons(self.uncond, batch)})
            cond_out = self.model(x, sigma, **{**kwargs, **_expand_singletons(self.cond, batch)})
        else:
            batch = x.shape[0]
            if self.shared_input:
                out = self.model(x, sigma, **self._batched_kwargs(batch, kwargs))
            else:
                out = self.model(
                    torch.cat([x, x]), torch.cat([sigma, sigma]), **self._batched_kwargs(batch, kwargs)
                )
            if out.shape[0] != 2 * batch:
                raise ValueError(f"batched guidance expected {2 * batch} outputs, got {out.shape[0]}")
            first, second = out[:batch], out[batch:]
            uncond_out, cond_out = (first, second) if self.uncond_first else (second, first)
        return uncond_out + (cond_out - uncond_out) * self.scale


def cfg_denoiser(
    model: Callable[..., torch.Tensor],
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    scale: float,
    *,
    batched: bool = True,
    uncond_first: bool = True,
    shared_input: bool = False,
) -> CFGDenoiser:
    """Classifier-free-guided denoiser; see ``CFGDenoiser``."""
    return CFGDenoiser(
        model, cond, uncond, scale, batched=batched, uncond_first=uncond_first, shared_input=shared_input
    )
