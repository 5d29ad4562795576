"""Loading LaVie UNet checkpoints: detection from keys, every accepted wrapping, and every failure."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_factory import schema
from lavie_core import CheckpointError, LaVieUNet, UNetConfig, detect_kind, load_unet, save_unet
from lavie_core.convert import main as convert_main
from lavie_core.loading import infer_config

KINDS = ["base", "interpolation", "vsr"]
ROOT = Path(__file__).resolve().parents[1]


def released_shaped(kind: str) -> dict[str, torch.Tensor]:
    """The full released key set as meta tensors: shapes without memory."""
    return {k: torch.empty(shape, device="meta") for k, shape in schema(kind)}


def official_like_tiny(kind: str) -> UNetConfig:
    """Toy width but the released defaults for everything shapes cannot tell (32 groups, 8 heads)."""
    rotary = {"rotary_dim": 4} if kind != "interpolation" else {"rotary_dim": 32}
    return UNetConfig.tiny(kind, norm_groups=32, heads=8, **rotary)


def random_model(config: UNetConfig, seed: int = 0) -> LaVieUNet:
    torch.manual_seed(seed)
    model = LaVieUNet(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def run(model, seed=0, frames=3):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c.in_channels, frames, 8, 8, generator=g)
    ctx = torch.randn(1, 5, c.cross_attention_dim, generator=g)
    return model(x, torch.tensor([500]), ctx, 20 if c.num_noise_levels else None)


@pytest.mark.parametrize("kind", KINDS)
def test_kind_and_architecture_of_released_checkpoints_are_read_from_keys(kind):
    sd = released_shaped(kind)
    assert detect_kind(sd) == kind
    assert infer_config(sd, kind) == UNetConfig.preset(kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrapping", ["ema", "state_dict", "bare"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_torch_files_load_in_every_wrapping(tmp_path, kind, wrapping, suffix):
    model = random_model(official_like_tiny(kind))
    sd = model.state_dict()
    path = tmp_path / f"model{suffix}"
    torch.save(sd if wrapping == "bare" else {wrapping: sd}, path)
    loaded = load_unet(path)
    assert loaded.config == model.config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(run(loaded), run(model))


@pytest.mark.parametrize("kind", KINDS)
def test_safetensors_round_trip_keeps_any_config(tmp_path, kind):
    model = random_model(UNetConfig.tiny(kind))  # 8 groups, 2 heads: only the metadata can tell
    save_unet(model, tmp_path / "m.safetensors")
    loaded = load_unet(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        # Same weights; safetensors buffers may be aligned differently, which changes SIMD summation order.
        torch.testing.assert_close(run(loaded), run(model), rtol=1e-5, atol=1e-6)


def test_state_dict_source_and_explicit_config():
    model = random_model(UNetConfig.tiny("base"))
    loaded = load_unet({"ema": model.state_dict()}, config=model.config)
    with torch.no_grad():
        assert torch.equal(run(loaded), run(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dtype_on_load_and_on_save(tmp_path, dtype):
    model = random_model(UNetConfig.tiny("base"))
    half = load_unet(model.state_dict(), config=model.config, dtype=dtype)
    freqs = [b for n, b in half.named_buffers() if n.endswith("freqs")]
    assert {p.dtype for p in half.parameters()} == {dtype}
    assert freqs and all(f.dtype == torch.float32 for f in freqs)
    save_unet(model, tmp_path / "h.safetensors", dtype=dtype)
    stored = load_file(tmp_path / "h.safetensors")
    assert stored["conv_in.weight"].dtype == dtype
    back = load_unet(tmp_path / "h.safetensors")
    assert torch.equal(back.conv_in.weight, model.conv_in.weight.to(dtype).float())
    with torch.no_grad():
        ref, out = run(model), run(half).float()
    assert ((out - ref).norm() / ref.norm()) < (5e-3 if dtype == torch.float16 else 3e-2)


def test_convert_command_writes_safetensors_that_load_the_same(tmp_path, capsys):
    model = random_model(official_like_tiny("vsr"))
    torch.save({"ema": model.state_dict()}, tmp_path / "lavie_vsr.pt")
    assert convert_main([str(tmp_path / "lavie_vsr.pt"), str(tmp_path / "out" / "lavie_vsr.safetensors")]) == 0
    assert "LaVie VSR UNet" in capsys.readouterr().out
    loaded = load_unet(tmp_path / "out" / "lavie_vsr.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(model), rtol=1e-5, atol=1e-6)
    assert convert_main([str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")]) == 1
    assert "missing.pt: no such file" in capsys.readouterr().err


def _drop(sd, n=3):
    keys = sorted(sd)[:n]
    return {k: v for k, v in sd.items() if k not in keys}


def _sd_ldm(sd):
    return {"model.diffusion_model." + k: v for k, v in sd.items()}


def _sd_2d(sd):
    return {k: v for k, v in sd.items() if "_temp" not in k}


def _extra(sd):
    return {**sd, "down_blocks.0.resnets.0.extra.weight": torch.zeros(3)}


def _reshaped(sd):
    out = dict(sd)
    out["conv_out.bias"] = torch.zeros(5)
    return out


BROKEN = [
    ("missing-keys", _drop, r"looks like a LaVie base.*3 missing keys \('conv_in\.bias'.*nothing was loaded"),
    ("unexpected-key", _extra, r"1 unexpected keys \('down_blocks\.0\.resnets\.0\.extra\.weight'\)"),
    ("shape-mismatch", _reshaped, r"'conv_out\.bias': expected \[4\], got \[5\]"),
    ("ldm-checkpoint", _sd_ldm, r"Stable Diffusion checkpoint in the original"),
    ("2d-unet", _sd_2d, r"2-D image UNet"),
    ("vae", lambda sd: {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)}, "is a VAE"),
    ("lora", lambda sd: {"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(1)}, "is a LoRA file"),
    ("no-tensors", lambda sd: {"step": 3}, "contains no tensors"),
]


@pytest.mark.parametrize("name,breaker,match", BROKEN, ids=[b[0] for b in BROKEN])
def test_wrong_checkpoints_fail_with_the_file_and_the_keys(tmp_path, name, breaker, match):
    model = random_model(official_like_tiny("base"))
    broken = breaker(model.state_dict())
    path = tmp_path / f"{name}.pt"
    torch.save({"ema": broken}, path)
    with pytest.raises(CheckpointError, match=match) as err:
        load_unet(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("truncated.pt", "truncate", "not a readable torch checkpoint"),
        ("truncated.safetensors", "truncate", "not a readable safetensors file"),
        ("model.onnx", "x", r"unsupported file type '\.onnx'"),
        ("code.pt", "pickle-code", "not a readable torch checkpoint"),
    ],
    ids=["truncated-pt", "truncated-safetensors", "wrong-suffix", "pickled-code"],
)
def test_unreadable_files_are_named(tmp_path, name, content, match):
    path = tmp_path / name
    model = random_model(UNetConfig.tiny("base"))
    if content == "truncate":
        full = tmp_path / ("full" + path.suffix)
        if path.suffix == ".pt":
            torch.save({"ema": model.state_dict()}, full)
        else:
            save_unet(model, full)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "pickle-code":
        import pickle

        path.write_bytes(pickle.dumps({"ema": subprocess.Popen}))  # a pickle that references code
    else:
        path.write_text(content)
    with pytest.raises(CheckpointError, match=match) as err:
        load_unet(path)
    assert name in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"lavie_base\.pt: no such file"):
        load_unet(tmp_path / "lavie_base.pt")


def test_importing_lavie_core_never_touches_comfyui(tmp_path):
    """A poisoned `comfy` package on the path would raise if anything imported it."""
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "__init__.py").write_text("raise ImportError('lavie_core imported comfy')\n")
    (tmp_path / "folder_paths.py").write_text("raise ImportError('lavie_core imported folder_paths')\n")
    code = (
        "import sys, lavie_core, lavie_core.convert\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.iter_modules(lavie_core.__path__): importlib.import_module('lavie_core.' + m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'server')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env_path = f"{tmp_path}:{ROOT}"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
