"""The tiny cascade shipped in bundled/lavie-tiny: loadable, the right kinds and sizes, and runnable end to end."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lavie_core import load_unet, pipeline
from lavie_core.text import load_text_encoder
from lavie_core.training import world
from lavie_core.vae import decode_video, load_vae

from helpers import single_thread  # noqa: F401  (autouse: this module runs on one thread)

BUNDLE = Path(__file__).resolve().parent.parent / "bundled" / "lavie-tiny"
UNETS = {"base": "base.safetensors", "interpolation": "interpolation.safetensors", "vsr": "vsr.safetensors"}


@pytest.fixture(scope="module")
def models() -> dict:
    out = {kind: load_unet(BUNDLE / name) for kind, name in UNETS.items()}
    out["vae"] = load_vae(BUNDLE / "vae.safetensors")
    out["vae_x4"] = load_vae(BUNDLE / "vae_x4.safetensors")
    out["text"] = load_text_encoder(BUNDLE / "text_encoder")
    return out


def test_files_are_complete_and_small():
    files = [p for p in BUNDLE.rglob("*") if p.is_file()]
    names = {str(p.relative_to(BUNDLE)) for p in files}
    assert set(UNETS.values()) | {"vae.safetensors", "vae_x4.safetensors", "README.md"} <= names
    assert {"text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/vocab.json", "text_encoder/merges.txt"} <= names
    assert sum(p.stat().st_size for p in files) < 30e6


def test_kinds_and_shapes_fit_together(models):
    for kind in UNETS:
        assert models[kind].config.kind == kind
        assert models[kind].config.cross_attention_dim == models["text"].dim
    assert models["vae"].config.downscale == 8 and models["vae_x4"].config.downscale == 4
    assert models["interpolation"].config.in_channels == 8 and models["vsr"].config.in_channels == 7


def test_vae_latents_have_unit_scale(models):
    scenes = world.sample_scenes(8, torch.Generator().manual_seed(0))
    frames = world.render(scenes, world.base_times(4), 64)
    from lavie_core.vae import encode_video

    latents = encode_video(models["vae"], frames, generator=torch.Generator().manual_seed(0))
    assert 0.6 < float(latents.std()) < 1.6


def test_cascade_runs_end_to_end(models):
    """16 frames of 64x64 -> 61 frames -> x4; two sampler steps each, the upscaler on the first chunk only."""
    text = models["text"]
    caption = world.HELD_OUT_COMBOS[0].caption
    context, empty = text.encode([caption]), text.encode([""])
    base = pipeline.text_to_video(models["base"], context, empty, frames=16, height=64, width=64, steps=2, seed=0)
    assert base.shape == (1, 4, 16, 8, 8)
    video = decode_video(models["vae"], base)
    assert video.shape == (1, 3, 16, 64, 64)
    inter = pipeline.interpolate(models["interpolation"], base, context, text.encode(["None"]), steps=2, seed=0)
    assert inter.shape == (1, 4, 61, 8, 8)
    frames = decode_video(models["vae"], inter).clamp(-1, 1)
    assert frames.shape == (1, 3, 61, 64, 64)
    high = pipeline.upscale(models["vsr"], frames[:, :, :8], context, text.encode(["blur, worst quality"]), steps=2, seed=0)
    assert high.shape == (1, 4, 8, 64, 64)
    out = decode_video(models["vae_x4"], high)
    assert out.shape == (1, 3, 8, 256, 256)
    assert torch.isfinite(out).all()
