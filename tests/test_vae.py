import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import single_thread  # noqa: F401  (autouse: this module runs on one thread)
from lavie_core.vae import (
    AutoencoderKL,
    VAEConfig,
    _product_attention_serves,
    convert_vae_state_dict,
    decode_video,
    encode_video,
    infer_vae_config,
    is_ldm_layout,
    load_vae,
    norm,
    product_attention,
)

LDM_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def random_vae(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Random weights everywhere (norms included) so that any mis-mapped tensor changes outputs."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(config).eval().requires_grad_(False)
    for p in vae.parameters():
        p.add_(0.1 * torch.randn_like(p))
    return vae


def to_ldm_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> original LDM / ComfyUI keys, written independently of the module."""
    num_up = 1 + max(int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
            k,
        )
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
        if m := re.match(r"^(.*)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", k):
            k = f"{m[1]}.mid.attn_1.{LDM_ATTN[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]
        out[k] = value
    return out


def video(b: int = 1, f: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, size, size, generator=g) * 2 - 1


@pytest.fixture
def exact_conv(monkeypatch):
    """oneDNN picks batch-size-dependent conv kernels (1e-6 rounding); the native kernels do not."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


@pytest.fixture(scope="module", params=[4, 3], ids=["x8", "x4"])
def vae(request) -> AutoencoderKL:
    return random_vae(VAEConfig.tiny(request.param))


def test_presets():
    assert VAEConfig.sd().downscale == 8 and VAEConfig.sd().scaling_factor == 0.18215
    assert VAEConfig.x4_upscaler().downscale == 4 and VAEConfig.x4_upscaler().scaling_factor == 0.08333
    assert len(AutoencoderKL(VAEConfig.tiny(4)).state_dict()) == 180
    with pytest.raises(Exception):
        VAEConfig.sd().layers_per_block = 3  # frozen


def test_sd_key_layout():
    with torch.device("meta"):
        sd = AutoencoderKL(VAEConfig.sd()).state_dict()
    assert len(sd) == 248
    assert sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["encoder.down_blocks.2.downsamplers.0.conv.weight"].shape == (512, 512, 3, 3)
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in sd
    assert sd["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    assert sd["encoder.mid_block.attentions.0.to_out.0.bias"].shape == (512,)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert sd["decoder.up_blocks.0.resnets.2.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in sd
    assert sd["decoder.conv_norm_out.weight"].shape == (128,)
    assert infer_vae_config(sd) == VAEConfig.sd()
    with torch.device("meta"):
        x4 = AutoencoderKL(VAEConfig.x4_upscaler()).state_dict()
    assert infer_vae_config(x4) == VAEConfig.x4_upscaler()


def test_round_trip_shapes(vae):
    k = vae.config.downscale
    x = video(b=2, f=3)
    z = encode_video(vae, x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 3, 32 // k, 32 // k) and z.dtype == torch.float32
    y = decode_video(vae, z)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device.type == "cpu"
    assert torch.isfinite(y).all()


def latents(vae: AutoencoderKL, b: int = 1, f: int = 3, size: int = 16) -> torch.Tensor:
    k = size // vae.config.downscale
    return torch.randn(b, 4, f, k, k, generator=torch.Generator().manual_seed(2))


def test_chunked_decode_is_exact(vae, exact_conv):
    z = latents(vae, b=2, f=3)
    full = decode_video(vae, z, chunk=6)
    for chunk in range(1, 4):
        torch.testing.assert_close(decode_video(vae, z, chunk=chunk), full, rtol=0, atol=0)


def test_chunked_decode_default_kernels(vae):
    z = latents(vae, f=5)
    full = decode_video(vae, z, chunk=5)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(decode_video(vae, z, chunk=chunk), full, rtol=0, atol=1e-4)


def test_frames_are_independent(vae, exact_conv):
    z = latents(vae)
    full = decode_video(vae, z)
    single = decode_video(vae, z[:, :, 1:2])
    torch.testing.assert_close(single[:, :, 0], full[:, :, 1], rtol=0, atol=0)


def test_encode_scaling_sampling_and_chunks(vae, exact_conv):
    x = video(b=2, f=3, size=16)
    mean, logvar = vae.encode(x.permute(0, 2, 1, 3, 4).flatten(0, 1))
    z_mean = encode_video(vae, x, sample=False)
    torch.testing.assert_close(z_mean.permute(0, 2, 1, 3, 4).flatten(0, 1), mean * vae.config.scaling_factor)

    def sample(chunk: int, seed: int = 7) -> torch.Tensor:
        return encode_video(vae, x, chunk=chunk, generator=torch.Generator().manual_seed(seed))

    ref = sample(8)
    for chunk in range(1, 4):
        torch.testing.assert_close(sample(chunk), ref, rtol=0, atol=0)
    assert not torch.equal(sample(8, seed=8), ref)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = (mean + torch.exp(0.5 * logvar) * noise) * vae.config.scaling_factor
    torch.testing.assert_close(ref.permute(0, 2, 1, 3, 4).flatten(0, 1), expected)


def test_decode_callback_and_cancel(vae):
    z = latents(vae, f=5)
    calls = []
    decode_video(vae, z, chunk=2, callback=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]

    class Cancelled(Exception):
        pass

    def cancel(done: int, total: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        decode_video(vae, z, chunk=2, callback=cancel)
    assert vae.device.type == "cpu"


def test_ldm_layout_loads_identically(vae, tmp_path, exact_conv):
    sd = vae.state_dict()
    ldm = to_ldm_layout(sd)
    assert is_ldm_layout(ldm) and not is_ldm_layout(sd)
    assert any(k.startswith("decoder.up.0.block.") for k in ldm)
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4

    checkpoint = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    checkpoint["model.diffusion_model.conv_in.weight"] = torch.zeros(3)
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(3)
    converted = convert_vae_state_dict({"state_dict": checkpoint, "global_step": 5})
    assert converted.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(converted[key], value), key

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": checkpoint}, path)
    loaded = load_vae(path, config=vae.config)
    assert loaded.config == vae.config
    x, z = video(f=2, size=16), latents(vae, f=2)
    torch.testing.assert_close(encode_video(loaded, x, sample=False), encode_video(vae, x, sample=False), rtol=0, atol=0)
    torch.testing.assert_close(decode_video(loaded, z), decode_video(vae, z), rtol=0, atol=0)


def test_legacy_attention_names(vae, exact_conv):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in vae.state_dict().items():
        for new, name in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    loaded = load_vae({f"vae.{k}": v for k, v in old.items()})
    z = latents(vae, f=2)
    torch.testing.assert_close(decode_video(loaded, z), decode_video(vae, z), rtol=0, atol=0)


def test_files_and_config_inference(vae, tmp_path):
    sd = vae.state_dict()
    save_file(sd, tmp_path / "vae.safetensors")
    torch.save(sd, tmp_path / "vae.pt")
    for name in ("vae.safetensors", "vae.pt"):
        loaded = load_vae(tmp_path / name)
        assert loaded.config == vae.config
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())


def test_diffusers_folder(vae, tmp_path):
    folder = tmp_path / "sd" / "vae"
    folder.mkdir(parents=True)
    save_file(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    raw = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": list(vae.config.block_out_channels),
        "layers_per_block": vae.config.layers_per_block,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "scaling_factor": 0.5,
    }
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = load_vae(tmp_path / "sd")
    assert loaded.config.scaling_factor == 0.5
    assert loaded.config.block_out_channels == vae.config.block_out_channels


def test_wrong_file_names_file_and_keys(tmp_path):
    small = random_vae(VAEConfig.tiny(3))
    path = tmp_path / "not_this_vae.safetensors"
    save_file(small.state_dict(), path)
    with pytest.raises(ValueError, match=r"not_this_vae\.safetensors.*expected 180 tensors, got 152.*missing .*encoder\.down_blocks\.3"):
        load_vae(path, config=VAEConfig.tiny(4))

    unet = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(320, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(2, 2)}, unet)
    with pytest.raises(ValueError, match=r"unet\.safetensors.*not an AutoencoderKL.*conv_in\.weight"):
        load_vae(unet)
    with pytest.raises(ValueError, match=r"unet\.safetensors.*unexpected 2: conv_in\.weight"):
        load_vae(unet, config=VAEConfig.tiny(4))

    sd = small.state_dict()
    sd["decoder.conv_out.weight"] = torch.zeros(4, 32, 3, 3)
    with pytest.raises(ValueError, match=r"wrong shape 1: decoder\.conv_out\.weight \(expected \[3, 32, 3, 3\], got \[4, 32, 3, 3\]\)"):
        load_vae(sd, config=small.config)

    with pytest.raises(ValueError, match=r"weights\.txt.*unsupported"):
        (tmp_path / "weights.txt").write_text("x")
        load_vae(tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError, match="missing_vae"):
        load_vae(tmp_path / "missing_vae.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(dtype):
    ref = random_vae(VAEConfig.tiny(4))
    low = load_vae(ref.state_dict(), dtype=dtype)
    assert low.dtype == dtype and all(p.dtype == dtype for p in low.parameters())
    x = video(f=2, size=16)
    z_ref = encode_video(ref, x, sample=False)
    z_low = encode_video(low, x, sample=False)
    assert z_low.dtype == torch.float32
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    assert (z_low - z_ref).abs().max() <= tol * z_ref.abs().max()
    y_ref = decode_video(ref, z_ref)
    y_low = decode_video(low, z_ref)
    assert y_low.dtype == torch.float32 and torch.isfinite(y_low).all()
    assert (y_low - y_ref).abs().max() <= tol * y_ref.abs().max()


def test_query_chunked_attention(vae, monkeypatch):
    z = latents(vae, f=2, size=32)
    full = decode_video(vae, z)
    monkeypatch.setattr("lavie_core.vae._ATTN_SCORE_BUDGET", 5)
    torch.testing.assert_close(decode_video(vae, z), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("budget", [5, 1 << 27], ids=["rows-in-blocks", "all-rows"])
def test_product_attention_matches_sdpa(budget, monkeypatch):
    monkeypatch.setattr("lavie_core.vae._ATTN_SCORE_BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 37, 24, generator=g) for _ in range(3))
    torch.testing.assert_close(product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("device", "dtype", "width", "expected"),
    [("cpu", torch.float16, 512, False), ("cuda", torch.float32, 512, False), ("cuda", torch.float16, 256, False),
     ("cuda", torch.bfloat16, 512, True)],
    ids=["cpu", "float32", "narrow-head", "wide-half-head"],
)
def test_product_attention_takes_wide_half_heads_on_cuda(device, dtype, width, expected):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q = torch.zeros(1, 1, 4, width, device=device, dtype=dtype)
    assert _product_attention_serves(q) is expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_product_attention_half_matches_float32(dtype, monkeypatch):
    monkeypatch.setattr("lavie_core.vae._ATTN_SCORE_BUDGET", 1 << 14)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1, 1000, 512, generator=g, device="cuda") for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = product_attention(*(t.to(dtype) for t in (q, k, v))).float()
    assert ((out - ref).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 1.5e-2)


def test_decoding_without_autograd_writes_in_place_and_gives_the_same_images(vae, exact_conv):
    # In-place SiLU and residual adds without autograd; with it, the same arithmetic out of place, so that
    # training (the bundled VAEs) can differentiate through the decoder.
    z = torch.randn(2, vae.config.latent_channels, 6, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lean = vae.decode(z)
    with torch.enable_grad():
        z_grad = z.clone().requires_grad_()
        traced = vae.decode(z_grad)
        traced.square().mean().backward()
    assert torch.equal(lean, traced.detach()) and z_grad.grad.abs().sum() > 0


@pytest.mark.parametrize("silu", [False, True], ids=["norm", "norm-silu"])
def test_norm_off_the_fused_path_is_torchs_group_norm(silu):
    layer = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(0))
    expected = layer(x)
    with torch.no_grad():
        out = norm(layer, x.contiguous(memory_format=torch.channels_last), silu=silu)
    torch.testing.assert_close(out, F.silu(expected) if silu else expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_channels_last_decode_on_cuda_matches_the_cpu(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    vae = random_vae(VAEConfig.tiny(3))
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = vae.decode(z)
        out = vae.to("cuda", dtype).decode(z.to("cuda", dtype)).float().cpu()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ((out - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 3e-3)
