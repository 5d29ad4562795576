"""bench/geglu.py: its shapes are the models' feed-forwards, and it refuses to run without a GPU."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from geglu import SHAPES, load_launcher  # noqa: E402

from lavie_core import LaVieUNet, UNetConfig, blocks, fused  # noqa: E402


@pytest.mark.parametrize("kind", ["base", "interpolation", "vsr"])
def test_shapes_are_every_feed_forward_of_the_model(kind):
    with torch.device("meta"):
        unet = LaVieUNet(UNetConfig.preset(kind))
    projections = [m.net[0].proj for m in unet.modules() if isinstance(m, blocks.FeedForward)]
    in_model = Counter((p.in_features, p.out_features // 2) for p in projections)
    listed = Counter()
    for model, _, _, k, n, count in SHAPES:
        if model == kind:
            listed[(k, n)] += count
    assert listed == in_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_the_script_says_it_needs_a_gpu():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "geglu.py")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "needs an NVIDIA GPU and Triton" in run.stderr


def test_another_versions_launcher_loads_without_taking_over_this_versions_ops():
    custom_op, op = torch.library.custom_op, torch.ops.lavie.geglu.default
    launcher = load_launcher(ROOT / "lavie_core" / "fused.py")
    assert launcher is not fused._launch_geglu and launcher.__name__ == "_launch_geglu"
    assert "_geglu_op" not in launcher.__globals__  # the copy registered no op of its own
    assert torch.library.custom_op is custom_op
    assert torch.ops.lavie.geglu.default is op and str(op._schema).startswith("lavie::geglu(")
