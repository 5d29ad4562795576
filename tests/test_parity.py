"""Full-size networks against outputs of the official LaVie code (fixtures from the reference runs).

Each checkpoint is generated with the deterministic scheme in `ckpt_factory` (seed 1234); the fixture holds
the official model's float32 CPU output for the same inputs. Faithful means relative L2 error < 1e-4.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_factory import FIXTURES, official_state_dict
from lavie_core import load_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["base", "interpolation", "vsr"])
def test_matches_official_outputs(kind):
    model = load_unet({"ema": official_state_dict(kind, 1234)})
    fx = load_file(FIXTURES / "parity" / f"{kind}_1234.safetensors")
    with torch.no_grad():
        out = model(fx["x"], fx["timesteps"], fx["context"], fx.get("noise_level"))
    err = ((out - fx["expected"]).norm() / fx["expected"].norm()).item()
    assert err < 1e-4, f"{kind}: relative L2 error {err:.2e}"


@pytest.mark.slow
def test_full_size_base_loads_within_1_3x_of_the_file_size(tmp_path):
    """Peak resident memory of a process that loads lavie_base.pt and touches every weight.

    Read from VmHWM: ru_maxrss of a child keeps the parent's size from before exec."""
    path = tmp_path / "lavie_base.pt"
    torch.save({"ema": official_state_dict("base", 7)}, path)
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from lavie_core import load_unet
        model = load_unet({str(path)!r})
        total = sum(float(p.sum()) for p in model.parameters())  # page every weight in
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(int(status["VmHWM"].split()[0]) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    print(f"checkpoint {size / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB, ratio {peak / size:.2f}")
    assert peak < 1.3 * size
