"""Training-side diffusion: the forward process and the targets the three UNets learn.

Base and interpolation predict the noise (epsilon), VSR the velocity v, all on LaVie's linear beta schedule
(1e-4 .. 0.02, 1000 steps). The VSR low-res input is noise-augmented on the x4 upscaler's low-res
schedule (scaled-linear betas over the same range) at a level passed to the UNet as its class label.
"""
from __future__ import annotations

import torch

from ..schedules import LAVIE_NUM_TRAIN_TIMESTEPS, alphas_cumprod_from_betas, linear_betas


def lavie_alphas_cumprod() -> torch.Tensor:
    return alphas_cumprod_from_betas(linear_betas()).float()


def low_res_alphas_cumprod() -> torch.Tensor:
    root = torch.linspace(1e-4**0.5, 0.02**0.5, LAVIE_NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    return alphas_cumprod_from_betas(root**2).float()


def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table.to(like.device)[t].reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(table: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sqrt(a_t) x0 + sqrt(1 - a_t) noise, with a_t = table[t] per batch row."""
    a = _gather(table, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(table: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    a = _gather(table, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0
