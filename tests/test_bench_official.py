"""bench/official.py: the official UNets beside this project's for `bench/speed.py --official PATH`.

Fake checkouts (a few lines standing in for the official model files) test the import isolation, the
config mapping and the errors. With `LAVIE_OFFICIAL` set to a real Vchitect/LaVie checkout, and the
official code's libraries installed, the official UNets are also run against this project's on the same
random weights.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))

import official  # noqa: E402
from lavie_core import UNetConfig  # noqa: E402

FAKE_UNET = '''
from torch import nn

class {name}(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv_in = nn.Conv2d(config["in_channels"], 4, 1)

    @classmethod
    def from_config(cls, config):
        return cls(config)
'''


def fake_checkout(root: Path, kinds=("base", "interpolation", "vsr"), unet_source: str | None = None) -> Path:
    for kind in kinds:
        package = root / kind / "models"
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("")
        (package / "unet.py").write_text(unet_source or FAKE_UNET.format(name=official.CLASS_NAMES[kind]))
    if "vsr" in kinds:
        (root / "vsr" / "configs").mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "UNet3DVSRModel", "mid_temporal": True, "video_condition": True, "in_channels": 7}
        (root / "vsr" / "configs" / "unet_3d_config.json").write_text(json.dumps(config))
    return root


def conv_in_weights(in_channels: int) -> dict[str, torch.Tensor]:
    return {"conv_in.weight": torch.randn(4, in_channels, 1, 1), "conv_in.bias": torch.randn(4)}


@pytest.mark.parametrize(
    "kinds, stages, missing",
    [
        pytest.param((), ["base"], ["base/models/unet.py"], id="empty-folder"),
        pytest.param(("base",), ["base", "vsr"], ["vsr/models/unet.py", "vsr/configs/unet_3d_config.json"], id="no-vsr"),
        pytest.param(("base", "interpolation", "vsr"), ["base", "interpolation", "vsr"], [], id="complete"),
    ],
)
def test_missing_sources(tmp_path, kinds, stages, missing):
    fake_checkout(tmp_path, kinds)
    assert official.missing_sources(tmp_path, stages) == [str(tmp_path / m) for m in missing]


@pytest.mark.parametrize(
    "kind, expected",
    [
        pytest.param("base", dict(attention_head_dim=8, in_channels=4, use_first_frame=False,
                                  down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                                  up_block_types=["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3,
                                  block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768), id="base"),
        pytest.param("interpolation", dict(in_channels=8, use_first_frame=True), id="interpolation-first-frame"),
        pytest.param("vsr", dict(in_channels=7, video_condition=False, mid_temporal=True, num_class_embeds=1000,
                                 max_noise_level=350, only_cross_attention=[True, True, True, False],
                                 down_block_types=["DownBlock3D"] + ["CrossAttnDownBlock3D"] * 3,
                                 cross_attention_dim=1024), id="vsr-json-plus-overrides"),
    ],
)
def test_official_config(tmp_path, kind, expected):
    config = official.official_config(UNetConfig.preset(kind), fake_checkout(tmp_path))
    assert {key: config[key] for key in expected} == expected
    assert not any(key.startswith("_") for key in config)


def test_stages_import_from_their_own_folders_and_leave_no_trace(tmp_path):
    repo = fake_checkout(tmp_path)
    path_before = list(sys.path)
    base = official.load_official("base", repo, conv_in_weights(4))
    vsr = official.load_official("vsr", repo, conv_in_weights(7))
    assert type(base).__name__ == "UNet3DConditionModel" and type(vsr).__name__ == "UNet3DVSRModel"
    assert vsr.config["video_condition"] is False and base.config["use_first_frame"] is False
    assert sys.path == path_before
    assert not [name for name in sys.modules if name == "models" or name.startswith("models.")]
    assert not any(p.requires_grad for p in base.parameters()) and not base.training


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    weights = {**conv_in_weights(4), "temporal_rotary_emb.freqs": torch.zeros(16)}
    del weights["conv_in.bias"]
    with pytest.raises(ValueError, match=r"1 keys missing \(e.g. \['conv_in.bias'\]\), 1 unexpected"):
        official.load_official("base", fake_checkout(tmp_path), weights)


@pytest.mark.parametrize(
    "source, cause",
    [
        pytest.param("import not_installed_library_xyz\n", "No module named 'not_installed_library_xyz'", id="missing-library"),
        # The official modules retry a failed relative import as an absolute one; the first failure is named.
        pytest.param("try:\n    from .helper_xyz import f\nexcept Exception:\n    from helper_xyz import f\n",
                     "No module named 'models.helper_xyz'", id="first-of-chained-failures"),
    ],
)
def test_import_failure_names_the_cause_and_the_requirements(tmp_path, source, cause):
    repo = fake_checkout(tmp_path, ("base",), unet_source=source)
    with pytest.raises(RuntimeError, match=f"{cause}.*diffusers==0.16.0"):
        official.load_official("base", repo, conv_in_weights(4))
    assert not [name for name in sys.modules if name == "models" or name.startswith("models.")]


def test_not_a_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="base/models/unet.py is missing: is .* a checkout of Vchitect/LaVie"):
        official.load_official("base", tmp_path, {})


class RecordingUNet(nn.Module):
    """Stands in for an official UNet held in `dtype`: records what `official_forward` hands it."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return SimpleNamespace(sample=args[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["base", "vsr"])
def test_official_forward_hands_inputs_over_in_the_model_dtype_and_layout(kind, dtype):
    cfg = UNetConfig.preset(kind)
    model = RecordingUNet(dtype)
    x, ctx = torch.randn(2, cfg.in_channels, 3, 4, 6), torch.randn(2, 77, cfg.cross_attention_dim)
    noise = torch.tensor([50, 50]) if kind == "vsr" else None
    official.official_forward(kind, model, x, torch.tensor([500, 500]), ctx, noise)
    videos = [model.args[0], model.args[2]] if kind == "vsr" else [model.args[0]]
    assert [v.shape[1] for v in videos] == ([4, 3] if kind == "vsr" else [4])
    assert {v.dtype for v in videos} | {model.kwargs["encoder_hidden_states"].dtype} == {dtype}
    if kind == "vsr":
        assert model.kwargs["class_labels"] is noise


OFFICIAL = os.environ.get("LAVIE_OFFICIAL")


@pytest.mark.skipif(
    not OFFICIAL or importlib.util.find_spec("diffusers") is None,
    reason="set LAVIE_OFFICIAL to a Vchitect/LaVie checkout, with the official code's libraries installed",
)
@pytest.mark.parametrize("kind", ["base", "interpolation", "vsr"])
def test_official_unet_matches_on_the_same_weights(kind):
    from speed import random_model

    ours = random_model(kind, torch.device("cpu"), seed=7)
    model = official.load_official(kind, OFFICIAL, ours.state_dict())
    cfg = UNetConfig.preset(kind)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, 6, 16, 24, generator=g)
    t = torch.tensor([500, 120])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    noise = torch.tensor([50, 20]) if kind == "vsr" else None
    with torch.no_grad():
        expected = official.official_forward(kind, model, x, t, ctx, noise)
        out = ours(x, t, ctx, noise)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4
