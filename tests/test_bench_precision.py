"""bench/precision.py: the sources of a half-precision call's error, each measured alone."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from precision import ACTIVATION_KINDS, WEIGHT_GROUPS, error_sources, weight_group  # noqa: E402


@pytest.mark.parametrize(
    "name, group",
    [
        pytest.param("down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.weight", "temporal layers",
                     id="temporal-before-self-attention"),
        pytest.param("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "frame self-attention",
                     id="self-attention"),
        pytest.param("down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight", "norm scales and shifts",
                     id="norm"),
        pytest.param("down_blocks.0.resnets.0.conv1.weight", "resnet convolutions", id="resnet"),
        pytest.param("conv_in.weight", "conv_in, conv_out and the rest", id="fallback"),
    ],
)
def test_weight_groups(name, group):
    assert weight_group(name) == group


@pytest.fixture(scope="module")
def tiny_rows():
    return {dtype: error_sources("base", dtype, torch.device("cpu"), 2, 8, 8, tiny=True)
            for dtype in (torch.bfloat16, torch.float16)}


def test_every_source_is_measured(tiny_rows):
    rows = tiny_rows[torch.bfloat16]
    assert len(rows) == len(WEIGHT_GROUPS) + 1 + len(ACTIVATION_KINDS) + 2
    assert all(err > 0 for _, _, err in rows)


def test_bf16_errs_more_than_fp16(tiny_rows):
    # Three fewer mantissa bits: about 8x the rounding, in every total.
    totals = {dtype: [err for _, what, err in rows if what.startswith(("all weights", "bfloat16", "float16"))]
              for dtype, rows in tiny_rows.items()}
    assert all(b > 3 * f for b, f in zip(totals[torch.bfloat16], totals[torch.float16]))
