"""The synthetic world and the training stages of the tiny cascade, at micro sizes on the CPU."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from lavie_core import LaVieUNet, load_unet
from lavie_core.text import load_text_encoder
from lavie_core.training import world
from lavie_core.training.diffusion import add_noise, lavie_alphas_cumprod, low_res_alphas_cumprod, velocity
from lavie_core.training.spec import micro_cascade, tiny_cascade
from lavie_core.training.stages import (
    FILES,
    STAGES,
    Budget,
    CaptionProbe,
    eps_loss,
    fold_latent_scale,
    init_from_2d,
    interpolation_sources,
    latent_std,
    normalise_vae,
    temporal_parameter_names,
    train_t2i,
    train_temporal,
    train_vae,
)
from lavie_core.training.text import WORLD_WORDS, write_tokenizer
from lavie_core.vae import AutoencoderKL, VAEConfig, load_vae

from helpers import single_thread  # noqa: F401  (autouse: this module runs on one thread)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------
# World


def test_world_is_deterministic_by_seed():
    a = world.sample_scenes(6, torch.Generator().manual_seed(3))
    b = world.sample_scenes(6, torch.Generator().manual_seed(3))
    c = world.sample_scenes(6, torch.Generator().manual_seed(4))
    assert a.captions == b.captions
    times = world.base_times()
    assert torch.equal(world.render(a, times, 32), world.render(b, times, 32))
    assert not torch.equal(world.render(a, times, 32), world.render(c, times, 32))


def test_held_out_split_is_disjoint_and_covers_every_word():
    train, held = set(world.TRAIN_COMBOS), set(world.HELD_OUT_COMBOS)
    assert not train & held and len(held) == world.HELD_OUT_COUNT
    assert train | held == set(world.all_combos())
    for field in ("colour", "shape", "direction", "background"):
        assert {getattr(c, field) for c in held} <= {getattr(c, field) for c in train}
    scenes = world.sample_scenes(50, torch.Generator().manual_seed(0), split="heldout")
    assert set(scenes.combos) <= held


def test_captions_round_trip():
    for combo in world.all_combos()[::17]:
        assert world.parse_caption(combo.caption) == combo
    assert world.parse_caption("a cat on a mat") is None


def test_detector_reads_the_caption_back_from_ground_truth():
    """Every combo, rendered at the base size and at a quarter of the interpolated frame rate."""
    combos = world.all_combos()
    scenes = world.scenes_for(combos, torch.Generator().manual_seed(1))
    videos = world.render(scenes, world.base_times(8), 64)
    wrong = [(c.caption, d) for c, v in zip(combos, videos) if not (d := world.detect(v)).matches(c)["all"]]
    assert not wrong, wrong[:3]


def test_shapes_stay_inside_the_frame():
    scenes = world.sample_scenes(200, torch.Generator().manual_seed(2))
    path = scenes.position(world.base_times())
    reach = (world._EXTENT * scenes.radius)[:, None, None]
    assert ((path - reach) >= 0.02 - 1e-6).all() and ((path + reach) <= 0.98 + 1e-6).all()
    video = world.render(scenes, world.base_times(4), 256)
    border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)
    background = scenes.background_rgb[:, :, None, None] * 2 - 1
    assert torch.allclose(border, background.expand_as(border), atol=1e-5)


def test_any_resolution_and_frame_rate_agree():
    scenes = world.sample_scenes(4, torch.Generator().manual_seed(5))
    fine = world.render(scenes, world.base_times(4), 128)
    coarse = world.render(scenes, world.base_times(4), 32)
    assert (world.downsample(fine, 4) - coarse).abs().mean() < 2e-3
    assert torch.equal(world.interpolated_times(16, 4)[::4], world.base_times(16))
    fast = world.render(scenes, world.interpolated_times(4, 4), 32)
    assert torch.allclose(fast[:, :, ::4], coarse, atol=1e-6)


def test_motion_follows_the_named_direction():
    scenes = world.sample_scenes(40, torch.Generator().manual_seed(6))
    path = scenes.position(world.base_times())
    for combo, p in zip(scenes.combos, path):
        step = p[-1] - p[0]
        dx, dy = world.DIRECTIONS[combo.direction]
        assert float(step[0] * dx + step[1] * dy) > 0.25
        assert float(step[0] * dy + step[1] * dx).__abs__() < 1e-6


# ---------------------------------------------------------------------------------------------------
# Text


def test_tokenizer_has_one_token_per_world_word(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for word in WORLD_WORDS:
        assert len(tok(word).input_ids) == 3, (word, tok.tokenize(word))
    caption = world.all_combos()[0].caption
    assert tok.tokenize(caption) == [w + "</w>" for w in caption.split()]
    assert len(tok("an unknown prompt!").input_ids) > 3  # falls back to bytes instead of failing


# ---------------------------------------------------------------------------------------------------
# Diffusion helpers


def test_velocity_and_noise_recover_x0():
    table = lavie_alphas_cumprod()
    x0, noise = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    t = torch.tensor([0, 500, 999])
    xt, v = add_noise(table, x0, noise, t), velocity(table, x0, noise, t)
    a = table[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, rtol=1e-4, atol=1e-4)
    assert math.isclose(float(table[0]), 1 - 1e-4, rel_tol=1e-6)
    assert low_res_alphas_cumprod()[350] > table[350]  # scaled-linear is gentler than linear


def test_eps_loss_weights_high_noise_samples_up_to_the_cap():
    table = lavie_alphas_cumprod()
    pred, noise = torch.zeros(2, 4, 1, 2, 2), torch.ones(2, 4, 1, 2, 2)
    pred[1] = 1.0  # only the low-noise sample is right
    t = torch.tensor([900, 10])
    assert eps_loss(pred, noise, t, table, 0.0) == torch.nn.functional.mse_loss(pred, noise)
    weighted = eps_loss(pred, noise, t, table, 20.0)
    assert abs(float(weighted) - 20 / 21) < 1e-5  # weights 20 (capped) and 1 (floor)


def test_interpolation_sources_follow_the_official_layout():
    assert interpolation_sources(16) == [(p + 1) // 4 for p in range(61)]
    assert interpolation_sources(16)[::4] == list(range(16))


# ---------------------------------------------------------------------------------------------------
# VAE scale folding


def test_fold_latent_scale_keeps_reconstruction_and_normalises():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig((32, 32, 32), 1)).eval()
    x = world.render(world.sample_scenes(8, torch.Generator().manual_seed(0)), world.base_times(1), 32)[:, :, 0]
    with torch.no_grad():
        mean, _ = vae.encode(x)
        before = vae.decode(mean)
        fold_latent_scale(vae, 3.0)
        mean3, _ = vae.encode(x)
        torch.testing.assert_close(mean3, 3 * mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vae.decode(mean3), before, rtol=1e-4, atol=1e-4)
        normalise_vae(vae, x)
        std = latent_std(vae, x)
    assert abs(std * vae.config.scaling_factor - 1) < 0.15


# ---------------------------------------------------------------------------------------------------
# Stages at micro size


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """VAE and text-to-image stages of the micro cascade, a few steps each."""
    work = tmp_path_factory.mktemp("work")
    spec, cpu = micro_cascade(), torch.device("cpu")
    train_vae(spec, "vae", work, Budget(steps=4, batch=2, lr=1e-3), cpu)
    train_t2i(spec, work, Budget(steps=3, batch=2, lr=1e-3), cpu)
    return work


def test_stages_write_loadable_files(trained):
    vae = load_vae(trained / FILES["vae"])
    assert vae.config.downscale == 8
    unet = load_unet(trained / FILES["t2i"])
    assert unet.config.kind == "base"
    text = load_text_encoder(trained / FILES["text"])
    assert text.dim == unet.config.cross_attention_dim
    for p in unet.parameters():
        assert torch.isfinite(p).all()
    assert (trained / "logs" / "t2i.done.json").is_file()


def test_freezing_spatial_layers_trains_only_temporal_ones(trained):
    spec = micro_cascade()
    train_temporal(spec, trained, Budget(steps=2, batch=2, lr=1e-2), torch.device("cpu"), out="frozen.safetensors",
                   name="frozen", freeze_spatial=True, train_text=False)
    before, after = load_unet(trained / FILES["t2i"]), load_unet(trained / "frozen.safetensors")
    temporal = temporal_parameter_names(after)
    assert temporal and all(".attn_temp." in n or ".norm_temp." in n for n in temporal)
    a, b = dict(before.named_parameters()), dict(after.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a if n not in temporal)
    assert any(not torch.equal(a[n], b[n]) for n in temporal)


def test_video_stage_trains_its_own_copy_of_the_text_encoder(trained, tmp_path):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    snapshot = load_text_encoder(work / FILES["text_t2i"]).model.state_dict()
    shared = load_text_encoder(work / FILES["text"]).model.state_dict()
    STAGES["temporal_video_only"](micro_cascade(), work, Budget(steps=2, batch=2, lr=1e-2, pool=1), torch.device("cpu"), 0)
    own = load_text_encoder(work / "ablation" / "text_encoder_video_only").model.state_dict()
    assert any(not torch.equal(snapshot[k], own[k]) for k in snapshot)
    for folder, before in ((FILES["text_t2i"], snapshot), (FILES["text"], shared)):  # never touched by an ablation
        after = load_text_encoder(work / folder).model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), folder
    assert (work / "ablation" / "base_video_only.safetensors").is_file()


def test_caption_probe_reads_attributes_and_ignores_dropped_captions():
    combos = [world.Combo("red", "circle", "left", "blue"), world.Combo("white", "triangle", "down", "gray")]
    labels = CaptionProbe.labels(combos, [True, False])
    assert labels[0].tolist() == [0, 0, 0, 2] and labels[1].tolist() == [-100] * 4
    probe = CaptionProbe(8)
    states = torch.randn(2, 5, 8)
    assert probe(states, CaptionProbe.labels(combos, [False, False])) == 0  # nothing to read
    opt = torch.optim.Adam(probe.parameters(), lr=0.1)
    first = probe(states, labels).item()
    for _ in range(20):
        opt.zero_grad()
        probe(states, labels).backward()
        opt.step()
    assert probe(states, labels).item() < 0.1 * first


def test_interpolation_model_starts_from_the_2d_weights():
    spec = micro_cascade()
    torch.manual_seed(0)
    base, interp = LaVieUNet(spec.base), LaVieUNet(spec.interpolation)
    assert init_from_2d(interp, base) > 0
    torch.testing.assert_close(interp.conv_in.weight[:, :4], base.conv_in.weight)
    assert not interp.conv_in.weight[:, 4:].any()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(interp.get_parameter(name), base.get_parameter(name))


@pytest.mark.parametrize("kind", ["base", "interpolation", "vsr"])
def test_each_objective_learns_a_fixed_batch(kind):
    """A few optimiser steps on one batch lower the stage's loss, with finite gradients everywhere."""
    spec = micro_cascade()
    config = getattr(spec, kind)
    torch.manual_seed(0)
    unet = LaVieUNet(config).train()
    table = lavie_alphas_cumprod()
    x0 = torch.randn(2, 4, 3, 4, 4)
    extra = torch.randn(2, config.conditioning_channels, 3, 4, 4)
    context = torch.randn(2, 77, config.cross_attention_dim)
    t = torch.tensor([100, 700])
    noise = torch.randn_like(x0)
    level = torch.tensor([10, 200]) if kind == "vsr" else None
    target = velocity(table, x0, noise, t) if kind == "vsr" else noise
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        pred = unet(torch.cat([add_noise(table, x0, noise, t), extra], dim=1), t, context, level)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_smoke_run_covers_every_stage(tmp_path):
    spec = importlib.util.spec_from_file_location("train_bundled", ROOT / "tools" / "train_bundled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--pack", str(tmp_path / "pack")]) == 0
    out = tmp_path / "out"
    kinds = {name: load_unet(out / f"{name}.safetensors").config.kind for name in ("base", "interpolation", "vsr")}
    assert kinds == {"base": "base", "interpolation": "interpolation", "vsr": "vsr"}
    assert load_vae(out / "vae_x4.safetensors").config.downscale == 4
    packed = sorted(p.name for p in (tmp_path / "pack").iterdir())
    assert len(packed) <= 8 and "t2i.tar" in packed


def test_bundled_spec_fits_the_size_budget():
    spec = tiny_cascade()
    params = sum(sum(p.numel() for p in LaVieUNet(c).parameters()) for c in (spec.base, spec.interpolation, spec.vsr))
    params += sum(sum(p.numel() for p in AutoencoderKL(c).parameters()) for c in (spec.vae, spec.vae_x4))
    assert params * 2 < 28e6  # fp16, leaving room for the text encoder
    assert spec.latent_size == 8 and spec.interpolated_frames == 61 and spec.vsr_size == 256
