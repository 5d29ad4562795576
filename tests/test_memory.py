"""The meta-device memory trace: storage bookkeeping, attention as its output, agreement with a real run,
and the activation peaks measured on an H200."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lavie_core import UNetConfig, fused
from lavie_core import pipeline as P
from lavie_core import unet as unet_module
from lavie_core.memory import decode_activation_peak, trace_peak, unet_activation_peak
from test_unet import KINDS, inputs, tiny_model

GIB = 2**30


def meta_bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8, device="meta")


def test_trace_counts_the_storages_alive_at_once():
    def fn():
        a, b = meta_bytes(1000), meta_bytes(2000)
        view = a.view(10, 100)
        del a  # the view keeps the storage
        c = meta_bytes(500)  # 3500 live
        del view, b
        return c, meta_bytes(4000)  # 4500 live

    assert trace_peak(fn) == 4500


def test_trace_ignores_storages_made_before_it_and_their_views():
    weight = torch.empty(10**6, device="meta")

    def fn():
        weight.t().add_(1)
        weight.view(1000, 1000)[0].mul_(2)
        return weight * 2  # the only new storage

    assert trace_peak(fn) == 4 * 10**6


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_attention_is_traced_as_its_output_not_the_score_matrix(device):
    q = torch.empty(1, 8, 4096, 40, dtype=torch.float16, device="meta")
    assert trace_peak(lambda: F.scaled_dot_product_attention(q, q, q), device=device) == q.numel() * 2


@pytest.mark.parametrize("kind", KINDS)
def test_meta_trace_equals_the_trace_of_a_real_run(kind):
    model = tiny_model(kind).use_channels_last()  # as loaded
    x, t, ctx, noise_level = inputs(model, b=1, f=5)
    # Two texts, the video once; plain-number timestep and noise level, which need no copy on either device.
    args = (int(t), torch.cat([ctx, ctx + 1]), None if noise_level is None else int(noise_level))
    real = trace_peak(lambda: model(x, *args))
    model, x, args = model.to("meta"), x.to("meta"), (args[0], args[1].to("meta"), args[2])
    meta = trace_peak(lambda: model(x, *args))
    assert meta == real > 0


# Peak allocated minus weights and inputs of one eager fp16 UNet call on an H200 (cudnn.benchmark off; one
# text or two), with the fused kernels and without: `python bench/memory.py`. The largest gap to the trace
# was 8% (base with the kernels, first call).
H200_MEASURED = [
    pytest.param("base", 16, 40, 64, 2, True, 0.45, id="base-16f-kernels"),
    pytest.param("base", 16, 40, 64, 2, False, 1.05, id="base-16f"),
    pytest.param("base", 16, 40, 64, 1, True, 0.22, id="base-16f-one-text"),
    pytest.param("interpolation", 61, 40, 64, 2, True, 1.60, id="interpolation-61f-kernels"),
    pytest.param("interpolation", 61, 40, 64, 2, False, 4.02, id="interpolation-61f"),
    pytest.param("vsr", 8, 320, 512, 2, True, 6.49, id="vsr-8f-kernels"),
    pytest.param("vsr", 8, 320, 512, 2, False, 15.23, id="vsr-8f"),
    pytest.param("vsr", 8, 320, 512, 1, True, 5.82, id="vsr-8f-one-text-kernels"),
    pytest.param("vsr", 4, 320, 512, 2, True, 3.33, id="vsr-4f-kernels"),
    pytest.param("vsr", 1, 320, 512, 2, True, 1.34, id="vsr-1f-kernels"),
    pytest.param("vsr", 8, 256, 256, 2, True, 2.84, id="vsr-8f-tile-256-kernels"),
]


@pytest.mark.parametrize("kind,frames,h,w,texts,kernels,measured_gib", H200_MEASURED)
def test_trace_matches_the_peaks_measured_on_an_h200(kind, frames, h, w, texts, kernels, measured_gib):
    traced = unet_activation_peak(UNetConfig.preset(kind), frames, h, w, texts, torch.float16, "cuda", kernels)
    assert traced / GIB == pytest.approx(measured_gib, rel=0.08)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no-kernels"])
def test_estimate_is_the_trace_plus_a_margin_above_every_measured_peak(monkeypatch, kernels):
    monkeypatch.setattr(fused, "kernels_available", lambda device: kernels)
    for kind, frames, h, w, texts, with_kernels, measured_gib in (p.values for p in H200_MEASURED):
        if with_kernels != kernels:
            continue
        config = UNetConfig.preset(kind)
        estimate = P.estimate_unet_memory(config, frames, h, w, texts, device="cuda")
        traced = unet_activation_peak(config, frames, h, w, texts, torch.float16, "cuda", kernels)
        assert estimate == int(traced * 1.1)
        assert estimate > measured_gib * GIB


@pytest.mark.parametrize("name,value", [("frames", 0), ("height", -1), ("batch", 0)])
def test_estimate_rejects_impossible_sizes(name, value):
    sizes = dict(frames=8, height=32, width=32, batch=2) | {name: value}
    with pytest.raises(ValueError, match=name):
        P.estimate_unet_memory(UNetConfig.preset("vsr"), **sizes)


def test_kernels_and_fewer_texts_need_less():
    config = UNetConfig.preset("vsr")

    def peak(texts, kernels):
        return unet_activation_peak(config, 4, 160, 256, texts, torch.float16, "cuda", kernels)

    assert peak(1, True) < peak(2, True) < peak(2, False)
    assert peak(1, True) < peak(1, False) < peak(2, False)


def test_trace_follows_the_per_sample_split(monkeypatch):
    config = UNetConfig.preset("vsr")
    args = (config, 2, 160, 256, 2, torch.float16, "cuda", True)
    unet_activation_peak.cache_clear()
    monkeypatch.setattr(unet_module, "SPLIT_BATCH_MIN_NUMEL", 2**62)
    whole = unet_activation_peak(*args)
    unet_activation_peak.cache_clear()
    monkeypatch.setattr(unet_module, "SPLIT_BATCH_MIN_NUMEL", 1)
    split = unet_activation_peak(*args)
    unet_activation_peak.cache_clear()
    assert split < 0.8 * whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_trace_matches_a_measured_cuda_call(kind, monkeypatch):
    """The paper's UNets at a small size, random weights, the CUDA path (with the kernels where usable)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from memory import peak_of_call  # bench/memory.py
    from speed import random_model

    sizes = {"base": (16, 40, 64), "interpolation": (61, 20, 32), "vsr": (4, 96, 128)}[kind]
    model = random_model(kind, torch.device("cuda")).half()
    config = model.config
    x = torch.randn(1, config.in_channels, *sizes, device="cuda", dtype=torch.half)
    context = torch.randn(2, 77, config.cross_attention_dim, device="cuda", dtype=torch.half)
    noise_level = 20 if config.num_noise_levels is not None else None
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    measured = peak_of_call(lambda: model(x, torch.full((1,), 500.0, device="cuda"), context, noise_level))
    traced = unet_activation_peak(config, *sizes, 2, torch.half, "cuda", fused.kernels_available("cuda"))
    assert 0.97 * traced <= measured <= 1.1 * traced


@pytest.mark.parametrize("op", ["channel_sums", "scale_shift"])
def test_trace_counts_the_copy_a_norm_kernel_makes_of_rows_out_of_order(op):
    rows = torch.empty(2, 64, 32, dtype=torch.float16, device="meta").transpose(1, 2)  # b n c, channels strided
    per_channel = torch.empty(2, 64, device="meta")
    call = (lambda: fused.channel_sums(rows)) if op == "channel_sums" else (lambda: fused.scale_shift(rows, per_channel, per_channel))
    output = 2 * 2 * 64 * 4 if op == "channel_sums" else rows.numel() * 2
    assert trace_peak(call, device="cuda") == rows.numel() * 2 + output


# Peak allocated minus weights and input of one fp16 `decode` of random latents on an H200 (cudnn.benchmark off,
# torch's own allocator, the peak of the second of two calls).
DECODE_H200_MEASURED = [
    pytest.param("x4", 1, 320, 512, 3.128, id="x4-1f"),
    pytest.param("x4", 2, 320, 512, 6.255, id="x4-2f"),
    pytest.param("x4", 4, 320, 512, 12.511, id="x4-4f"),
    pytest.param("sd", 8, 40, 64, 1.563, id="sd-8f"),
    pytest.param("sd", 16, 40, 64, 3.126, id="sd-16f"),
    pytest.param("svd", 14, 40, 64, 4.376, id="temporal-14f"),
]


def _decode_config(name):
    from lavie_core.temporal_vae import TemporalVAEConfig
    from lavie_core.vae import VAEConfig

    return {"x4": VAEConfig.x4_upscaler, "sd": VAEConfig.sd, "svd": TemporalVAEConfig.svd}[name]()


@pytest.mark.parametrize("name,frames,h,w,measured_gib", DECODE_H200_MEASURED)
def test_decode_estimate_covers_the_peaks_measured_on_an_h200(name, frames, h, w, measured_gib):
    config = _decode_config(name)
    traced = decode_activation_peak(config, frames, h, w, torch.float16, "cuda", True) / GIB
    estimate = P.estimate_decode_memory(config, frames, h, w, device="cuda") / GIB
    if name != "svd":  # the temporal decoder's NCHW convolutions add cuDNN's copies, which the margin covers
        assert traced == pytest.approx(measured_gib, rel=1e-3)
    assert measured_gib < estimate < 1.3 * measured_gib


def test_x4_decode_peak_is_two_and_a_half_full_resolution_tensors_per_frame():
    # The last up block's first resnet: its input (256 channels at 1280x2048), that input normalised (the
    # fused GroupNorm-SiLU's one output) and conv1's output (128 channels), in fp16.
    per_frame = (256 + 256 + 128) * 1280 * 2048 * 2
    for frames in (1, 3):
        traced = decode_activation_peak(_decode_config("x4"), frames, 320, 512, torch.float16, "cuda", True)
        assert traced == pytest.approx(frames * per_frame, rel=1e-3)


def test_decode_estimate_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="frames"):
        P.estimate_decode_memory(_decode_config("sd"), 0, 40, 64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frames,size", [(5, 16), (2, 320)], ids=["toy-width", "paper-width"])
def test_trace_is_the_same_under_inference_mode(kind, frames, size):
    """ComfyUI runs its nodes under torch.inference_mode, where the estimates are traced."""
    config = UNetConfig.tiny(kind) if size == 16 else UNetConfig.preset(kind)
    h, w = (size, size) if kind == "vsr" else (size // 8, size // 8)
    trace = unet_activation_peak.__wrapped__  # not the cached value
    plain = trace(config, frames, h, w, 2, torch.float16, "cuda", True)
    with torch.inference_mode():
        assert trace(config, frames, h, w, 2, torch.float16, "cuda", True) == plain


@pytest.mark.parametrize("name,frames,h,w", [("x4", 1, 320, 512), ("sd", 2, 40, 64), ("svd", 3, 40, 64)],
                         ids=["x4", "sd", "temporal"])
def test_decode_trace_is_the_same_under_inference_mode(name, frames, h, w):
    trace = decode_activation_peak.__wrapped__  # not the cached value
    config = _decode_config(name)
    plain = trace(config, frames, h, w, torch.float16, "cuda", True)
    with torch.inference_mode():
        assert trace(config, frames, h, w, torch.float16, "cuda", True) == plain
