"""Deterministic random checkpoints in the official LaVie key layout.

The same (schema, seed) gives the same tensors on any machine: tensor i of the schema draws from its own
generator seeded with `seed * 100003 + i`. Rotary frequency tables get their true values; everything else is
scaled so that activations keep unit scale through every layer, temporal ones included.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


@lru_cache(maxsize=None)
def schema(kind: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    data = json.loads((FIXTURES / "schemas" / f"{kind}.json").read_text())
    return tuple((e["key"], tuple(e["shape"])) for e in data["keys"])


def random_tensor(key: str, shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    if key.endswith("rotary_emb.freqs"):
        dim = 2 * shape[0]
        return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + index))
    if len(shape) >= 2:
        if "embedding" in key and len(shape) == 2 and "linear" not in key:
            return x * 0.5
        return x / math.sqrt(math.prod(shape[1:]))
    if key.endswith(".weight") and "norm" in key:
        return 1.0 + 0.1 * x
    return 0.02 * x


def official_state_dict(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Full-size state dict of a released checkpoint's layout (base ~3.6 GB in float32)."""
    return {key: random_tensor(key, shape, seed, i) for i, (key, shape) in enumerate(schema(kind))}


def random_state_dict_for(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The same scheme applied to any model's own keys (tiny configs)."""
    return {
        key: random_tensor(key, tuple(v.shape), seed, i) for i, (key, v) in enumerate(model.state_dict().items())
    }
