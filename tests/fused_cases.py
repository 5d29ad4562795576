"""Fused temporal attention against the matmul path, case by case; prints one JSON line per case.

Run as a script (tests/test_fused.py does, with TRITON_INTERPRET=1 on the CPU) or imported on CUDA.
"""
from __future__ import annotations

import json
import sys

import torch

from lavie_core import blocks, fused

# id: (rows, frames, heads, head_dim, rotary_dim, bias)
CASES = {
    "vsr-8-frames-rotary-bias": (5, 8, 2, 64, 32, True),
    "base-16-frames-head-40": (3, 16, 2, 40, 32, True),
    "odd-frames-no-bias": (4, 7, 3, 16, 8, False),
    "plain-13-frames": (2, 13, 2, 8, 0, False),
    "long-61-frames": (2, 61, 2, 16, 0, False),
    "many-rows-one-frame": (37, 1, 2, 8, 8, True),
}


def max_error(case: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    rows, frames, heads, head_dim, rotary_dim, with_bias = CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, frames, heads * head_dim, generator=g).to(device, dtype) for _ in range(3))
    bias = torch.randn(heads, frames, frames, generator=g).to(device) if with_bias else None
    rotary = blocks.RotaryEmbedding(rotary_dim).to(device) if rotary_dim else None
    qh, kh, vh = (blocks.split_heads(t.float(), heads) for t in (q, k, v))
    if rotary is not None:
        qh, kh = rotary.rotate(qh), rotary.rotate(kh)
    expected = blocks.merge_heads(blocks.short_sequence_attention(qh, kh, vh, bias))
    table = rotary.table(frames, q.device) if rotary is not None else None
    out = fused.temporal_attention(q, k, v, heads, rotary=table, bias=bias)
    assert out.shape == q.shape and out.dtype == dtype
    return (out.float() - expected).abs().max().item()


if __name__ == "__main__":
    for name in sys.argv[1:] or CASES:
        print(json.dumps({"case": name, "max_error": max_error(name)}), flush=True)
