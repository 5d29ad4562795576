"""bench/attention.py: the switch to the SDPA path restores the kernels, and the script refuses to run without a GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from attention import without_kernels  # noqa: E402

from lavie_core import fused  # noqa: E402


def test_without_kernels_restores_the_check_even_after_an_error(monkeypatch):
    monkeypatch.setattr(fused, "kernels_usable", lambda *_: True)
    x = torch.zeros(1)
    with pytest.raises(RuntimeError, match="inside"):
        with without_kernels():
            assert not fused.kernels_usable(x)
            raise RuntimeError("inside")
    assert fused.kernels_usable(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_the_script_says_it_needs_a_gpu():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "attention.py")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "needs an NVIDIA GPU and Triton" in run.stderr
