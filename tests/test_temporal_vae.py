"""SVD-style temporal VAE decoder: released key layouts, strict loading, chunked decoding, SD fallback."""
import math

import pytest
import torch
from safetensors.torch import save_file

from lavie_core.temporal_vae import (
    TemporalAutoencoder,
    TemporalVAEConfig,
    convert_temporal_vae_state_dict,
    decode_video_any,
    decode_video_smooth,
    decode_video_temporal,
    detect_layout,
    flicker_metrics,
    load_temporal_vae,
    temporal_smooth,
    temporal_windows,
)
from lavie_core.vae import AutoencoderKL, VAEConfig, decode_video

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- released layouts
def diffusers_keys(cfg: TemporalVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of diffusers' AutoencoderKLTemporalDecoder, written out from its module layout."""
    ch, layers, lat = cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels
    keys: dict[str, tuple[int, ...]] = {}

    def conv(p, cout, cin, k):
        keys[f"{p}.weight"], keys[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def conv_t(p, cout, cin):
        keys[f"{p}.weight"], keys[f"{p}.bias"] = (cout, cin, 3, 1, 1), (cout,)

    def norm(p, c):
        keys[f"{p}.weight"], keys[f"{p}.bias"] = (c,), (c,)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.conv_shortcut", cout, cin, 1)

    def attention(p, c):
        norm(f"{p}.group_norm", c)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            keys[f"{p}.{n}.weight"], keys[f"{p}.{n}.bias"] = (c, c), (c,)

    def spatio_temporal(p, cin, cout):
        resnet(f"{p}.spatial_res_block", cin, cout)
        norm(f"{p}.temporal_res_block.norm1", cout)
        conv_t(f"{p}.temporal_res_block.conv1", cout, cout)
        norm(f"{p}.temporal_res_block.norm2", cout)
        conv_t(f"{p}.temporal_res_block.conv2", cout, cout)
        keys[f"{p}.time_mixer.mix_factor"] = (1,)

    conv("encoder.conv_in", ch[0], 3, 3)
    for i, c in enumerate(ch):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", ch[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(ch) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    resnet("encoder.mid_block.resnets.0", ch[-1], ch[-1])
    attention("encoder.mid_block.attentions.0", ch[-1])
    resnet("encoder.mid_block.resnets.1", ch[-1], ch[-1])
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out", 2 * lat, ch[-1], 3)
    conv("quant_conv", 2 * lat, 2 * lat, 1)
    conv("decoder.conv_in", ch[-1], lat, 3)
    for j in range(layers):
        spatio_temporal(f"decoder.mid_block.resnets.{j}", ch[-1], ch[-1])
    attention("decoder.mid_block.attentions.0", ch[-1])
    rev = ch[::-1]
    for i, c in enumerate(rev):
        for j in range(layers + 1):
            spatio_temporal(f"decoder.up_blocks.{i}.resnets.{j}", rev[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    norm("decoder.conv_norm_out", ch[0])
    conv("decoder.conv_out", 3, ch[0], 3)
    conv_t("decoder.time_conv_out", 3, 3)
    return keys


def sgm_names(cfg: TemporalVAEConfig) -> dict[str, str]:
    """generative-models (sgm) VideoDecoder name -> diffusers name, for every tensor but quant_conv."""
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    names: dict[str, str] = {}

    def resnet(old, new, shortcut, video):
        for part in ("norm1", "conv1", "norm2", "conv2"):
            for t in ("weight", "bias"):
                names[f"{old}.{part}.{t}"] = f"{new}{'.spatial_res_block' if video else ''}.{part}.{t}"
        if shortcut:
            for t in ("weight", "bias"):
                names[f"{old}.nin_shortcut.{t}"] = f"{new}{'.spatial_res_block' if video else ''}.conv_shortcut.{t}"
        if video:
            for old_part, new_part in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"),
                                       ("out_layers.0", "norm2"), ("out_layers.3", "conv2")):
                for t in ("weight", "bias"):
                    names[f"{old}.time_stack.{old_part}.{t}"] = f"{new}.temporal_res_block.{new_part}.{t}"
            names[f"{old}.mix_factor"] = f"{new}.time_mixer.mix_factor"

    def attention(old, new):
        for old_part, new_part in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                                   ("proj_out", "to_out.0")):
            for t in ("weight", "bias"):
                names[f"{old}.{old_part}.{t}"] = f"{new}.{new_part}.{t}"

    ch = cfg.block_out_channels
    for side in ("encoder", "decoder"):
        for t in ("weight", "bias"):
            names[f"{side}.conv_in.{t}"] = f"{side}.conv_in.{t}"
            names[f"{side}.norm_out.{t}"] = f"{side}.conv_norm_out.{t}"
            names[f"{side}.conv_out.{t}"] = f"{side}.conv_out.{t}"
        video = side == "decoder"
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False, video)
        attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False, video)
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                   j == 0 and ch[max(i - 1, 0)] != ch[i], False)
        if i < n - 1:
            for t in ("weight", "bias"):
                names[f"encoder.down.{i}.downsample.conv.{t}"] = f"encoder.down_blocks.{i}.downsamplers.0.conv.{t}"
    for level in range(n):
        up = n - 1 - level
        below = ch[min(level + 1, n - 1)]
        for j in range(layers + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}",
                   j == 0 and below != ch[level], True)
        if level > 0:
            for t in ("weight", "bias"):
                names[f"decoder.up.{level}.upsample.conv.{t}"] = f"decoder.up_blocks.{up}.upsamplers.0.conv.{t}"
    for t in ("weight", "bias"):
        names[f"decoder.conv_out.time_mix_conv.{t}"] = f"decoder.time_conv_out.{t}"
    return names


def random_checkpoint(cfg: TemporalVAEConfig, seed: int = 0, mix: float | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in diffusers_keys(cfg).items():
        x = torch.randn(shape, generator=g)
        if key.endswith("mix_factor"):
            sd[key] = x if mix is None else torch.full(shape, mix)
        elif len(shape) >= 2:
            sd[key] = x / math.sqrt(math.prod(shape[1:]))
        elif "norm" in key and key.endswith("weight"):
            sd[key] = 1.0 + 0.1 * x
        else:
            sd[key] = 0.02 * x
    return sd


def to_sgm(sd: dict[str, torch.Tensor], cfg: TemporalVAEConfig, prefix: str = "first_stage_model.") -> dict:
    out = {}
    for old, new in sgm_names(cfg).items():
        value = sd[new]
        if ".attn_1." in old and old.endswith("weight") and ".norm." not in old:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        out[prefix + old] = value.contiguous()
    out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # rest of a full SVD checkpoint
    return out


TINY = TemporalVAEConfig.tiny()


def tiny_vae(seed: int = 0, mix: float | None = None) -> TemporalAutoencoder:
    return load_temporal_vae(random_checkpoint(TINY, seed, mix))


def latents(f: int = 10, seed: int = 0, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, f, 4, 6, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- layouts and loading
def test_svd_layout_has_exactly_the_released_keys_and_shapes():
    cfg = TemporalVAEConfig.svd()
    with torch.device("meta"):
        model = TemporalAutoencoder(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == diffusers_keys(cfg)
    assert len(got) == 374 and sum(math.prod(s) for s in got.values()) == 97_742_847
    # The sgm (single-file) layout converts onto the same names; it has no quant_conv.
    shapes = diffusers_keys(cfg)
    sgm = {f"first_stage_model.{k}": torch.empty(
        (*shapes[v], 1, 1) if ".attn_1." in k and k.endswith("weight") and ".norm." not in k else shapes[v],
        device="meta") for k, v in sgm_names(cfg).items()}
    assert detect_layout(sgm) == "sgm"
    converted = {k: tuple(v.shape) for k, v in convert_temporal_vae_state_dict(sgm).items()}
    want = {k: s for k, s in diffusers_keys(cfg).items() if not k.startswith("quant_conv.")}
    assert converted == want


def test_random_checkpoint_round_trips_through_files_in_both_layouts(tmp_path):
    sd = random_checkpoint(TINY, seed=1)
    folder = tmp_path / "svd" / "vae"
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    from_folder = load_temporal_vae(tmp_path / "svd")
    assert detect_layout(sd) == "diffusers"
    assert from_folder.config.has_quant_conv and from_folder.config.block_out_channels == TINY.block_out_channels
    loaded = from_folder.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)

    save_file(to_sgm(sd, TINY), str(tmp_path / "svd_xt.safetensors"))
    from_sgm = load_temporal_vae(tmp_path / "svd_xt.safetensors")
    assert not from_sgm.config.has_quant_conv
    z = latents(5)
    assert torch.equal(decode_video_temporal(from_sgm, z, chunk=5), decode_video_temporal(from_folder, z, chunk=5))


def test_strict_loading_names_what_is_wrong():
    sd = random_checkpoint(TINY)
    missing = {k: v for k, v in sd.items() if k != "decoder.time_conv_out.bias"}
    with pytest.raises(ValueError, match=r"missing 1: decoder\.time_conv_out\.bias"):
        load_temporal_vae(missing)
    with pytest.raises(ValueError, match=r"unexpected 1: decoder\.extra\.weight"):
        load_temporal_vae({**sd, "decoder.extra.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["decoder.time_conv_out.weight"] = torch.zeros(3, 3, 5, 1, 1)
    with pytest.raises(ValueError, match=r"wrong shape 1: decoder\.time_conv_out\.weight \(expected \[3, 3, 3, 1, 1\]"):
        load_temporal_vae(bad)
    plain = AutoencoderKL(VAEConfig.tiny(3)).state_dict()
    with pytest.raises(ValueError, match="no temporal layers"):
        load_temporal_vae(plain)


# ----------------------------------------------------------------------------- chunked decoding
def test_windows_partition_unity_and_zero_weight_at_inner_edges():
    for frames in range(1, 13):
        for chunk in range(1, frames + 2):
            for overlap in range(0, max(1, chunk)):
                if chunk < frames and overlap >= chunk:
                    continue
                windows = temporal_windows(frames, chunk, overlap)
                total = torch.zeros(frames, dtype=torch.float64)
                for (start, stop), w in windows:
                    assert stop - start <= chunk and w.shape == (stop - start,)
                    total[start:stop] += w
                    if overlap >= 2:
                        assert (start == 0 or w[0] == 0) and (stop == frames or w[-1] == 0)
                torch.testing.assert_close(total, torch.ones(frames, dtype=torch.float64))


def test_chunk_covering_all_frames_equals_the_full_decode_exactly():
    vae = tiny_vae(2)
    z = latents(7, b=2)
    full = vae.decode(z / vae.config.scaling_factor)
    for chunk in (7, 8, 30):
        assert torch.equal(decode_video_temporal(vae, z, chunk=chunk, overlap=3), full)


def test_chunking_is_exact_where_only_time_conv_out_couples_frames():
    """mix_factor = -inf switches every temporal block off (sigmoid = 0 exactly); time_conv_out then
    needs one neighbour per side, which every overlap >= 2 provides."""
    vae = tiny_vae(3, mix=-math.inf)
    z = latents(10)
    full = decode_video_temporal(vae, z, chunk=10)
    for chunk in range(3, 10):
        for overlap in sorted({2, chunk - 1}):
            torch.testing.assert_close(decode_video_temporal(vae, z, chunk=chunk, overlap=overlap), full,
                                       rtol=1e-5, atol=1e-5)
    # Without overlap the window edges see zero padding in time: not exact, as the theory says.
    assert (decode_video_temporal(vae, z, chunk=4, overlap=0) - full).abs().max() > 1e-4


def test_purely_2d_decoder_chunks_exactly_at_every_size():
    vae = tiny_vae(4, mix=-math.inf)
    with torch.no_grad():
        vae.decoder.time_conv_out.weight.zero_()
        vae.decoder.time_conv_out.weight[:, :, 1, 0, 0] = torch.eye(3)
        vae.decoder.time_conv_out.bias.zero_()
    z = latents(6)
    full = decode_video_temporal(vae, z, chunk=6)
    for chunk in range(1, 7):
        for overlap in range(0, chunk):
            torch.testing.assert_close(decode_video_temporal(vae, z, chunk=chunk, overlap=overlap), full,
                                       rtol=1e-5, atol=1e-5)


def test_active_temporal_layers_give_bounded_seams_and_overlap_helps():
    """With the temporal blocks on (random mix factors), windows see fewer frames than the full decode:
    the GroupNorm statistics and the temporal receptive field change. Independent random latents are
    the worst case for that; the error stays bounded, shrinks as windows grow, and overlap cuts it."""
    vae = tiny_vae(5)
    z = latents(12, seed=3)
    full = decode_video_temporal(vae, z, chunk=12)
    scale = float(full.std())
    errors = {}
    for chunk in range(1, 13):
        overlap = min(4, chunk - 1)
        out = decode_video_temporal(vae, z, chunk=chunk, overlap=overlap)
        assert torch.isfinite(out).all()
        errors[chunk] = (float((out - full).abs().mean()), float((out - full).abs().max()))
        assert errors[chunk][0] < 0.75 * scale, (chunk, errors[chunk], scale)
        if chunk >= 4:
            assert errors[chunk][0] < 0.1 * scale and errors[chunk][1] < 1.0 * scale, (chunk, errors[chunk], scale)
    assert errors[11][0] < errors[8][0] < errors[4][0] < errors[2][0]
    hard = decode_video_temporal(vae, z, chunk=6, overlap=0)
    soft = decode_video_temporal(vae, z, chunk=6, overlap=4)
    assert float((soft - full).abs().mean()) < 0.5 * float((hard - full).abs().mean())
    assert float((soft - full).abs().max()) < 0.5 * float((hard - full).abs().max())


def test_memory_is_bounded_by_the_chunk_and_progress_streams():
    vae = tiny_vae(6)
    seen, ticks = [], []
    inner = vae.decode

    def spy(z):
        seen.append(z.shape[2])
        return inner(z)

    vae.decode = spy
    out = decode_video_temporal(vae, latents(11, b=2), chunk=4, overlap=1, callback=lambda d, t: ticks.append((d, t)))
    assert out.shape == (2, 3, 11, 16, 24) and out.device.type == "cpu"
    assert max(seen) == 4
    assert ticks[-1] == (22, 22) and [d for d, _ in ticks] == sorted(d for d, _ in ticks)


# ----------------------------------------------------------------------------- 2-D fallback
def sd_vae(seed: int = 0) -> AutoencoderKL:
    vae = AutoencoderKL(VAEConfig.tiny(3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
    return vae.eval()


def jittery_latents(f: int = 16, jitter: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A slowly drifting latent pattern, with and without independent per-frame jitter."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, 1, 6, 6, generator=g)
    drift = torch.randn(1, 4, 1, 6, 6, generator=g)
    t = torch.linspace(0, 1, f).view(1, 1, f, 1, 1)
    clean = base + 0.5 * t * drift
    return clean, clean + jitter * torch.randn(clean.shape, generator=g)


def test_sd_fallback_without_smoothing_is_the_plain_decode_for_any_chunk():
    vae = sd_vae()
    z = jittery_latents(9)[1]
    ref = decode_video(vae, z, chunk=9)
    for chunk in (1, 2, 4, 9, 20):
        torch.testing.assert_close(decode_video_smooth(vae, z, chunk=chunk), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_video_any(vae, z, chunk=3, overlap=2), ref, rtol=1e-5, atol=1e-5)


def test_sd_fallback_smoothing_reduces_flicker_and_does_not_depend_on_chunk():
    vae = sd_vae(1)
    clean, noisy = jittery_latents(16)
    plain = decode_video_smooth(vae, noisy, chunk=16)
    smooth = decode_video_smooth(vae, noisy, chunk=16, smooth=1.0, sigma=0.2)
    for chunk in (1, 3, 5):
        torch.testing.assert_close(decode_video_smooth(vae, noisy, chunk=chunk, smooth=1.0, sigma=0.2), smooth,
                                   rtol=1e-5, atol=1e-5)
    before, after = flicker_metrics(plain)["flicker"], flicker_metrics(smooth)["flicker"]
    assert after < 0.75 * before
    # Closer to the jitter-free video than the unsmoothed decode is.
    target = decode_video(vae, clean, chunk=16)
    assert float((smooth - target).abs().mean()) < float((plain - target).abs().mean())


def test_temporal_smooth_keeps_static_video_and_hard_cuts():
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(1, 3, 1, 8, 8, generator=g) * 2 - 1
    static = frame.expand(1, 3, 6, 8, 8).contiguous()
    torch.testing.assert_close(temporal_smooth(static, 1.0), static, rtol=0, atol=1e-6)
    cut = torch.cat([static[:, :, :3], -static[:, :, 3:]], dim=2)  # large change between frames 2 and 3
    out = temporal_smooth(cut, 1.0, sigma=0.05)
    assert float((out - cut).abs().max()) < 1e-3
    assert torch.equal(temporal_smooth(cut, 0.0), cut)


def test_flicker_metric_separates_motion_from_flicker():
    t = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1)
    ramp = (0.1 * t).expand(1, 3, 8, 4, 4)
    alternating = (0.1 * (t % 2)).expand(1, 3, 8, 4, 4)
    assert flicker_metrics(ramp)["flicker"] == pytest.approx(0.0, abs=1e-6)
    assert flicker_metrics(ramp)["mean_abs_diff"] == pytest.approx(0.1, abs=1e-6)
    assert flicker_metrics(alternating)["flicker"] == pytest.approx(0.1, abs=1e-6)
