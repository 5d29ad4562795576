"""bench/profile_unet.py: the coarse class of a CUDA kernel, from names as the profiler reports them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from profile_unet import kernel_kind  # noqa: E402


@pytest.mark.parametrize(
    "name, kind",
    [
        pytest.param("triton_poi_fused_convolution_permute_view_31", "triton", id="inductor-named-after-conv"),
        pytest.param("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", "attention",
                     id="cudnn-sdpa"),
        pytest.param("_temporal_attention_kernel", "attention", id="own-triton-attention"),
        pytest.param("_key_frame_attention_kernel", "attention", id="own-key-frame-attention"),
        pytest.param("_short_key_attention_kernel", "attention", id="own-short-key-attention"),
        pytest.param("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x256x64", "conv",
                     id="cudnn-conv"),
        pytest.param("nvjet_sm90_hsh_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "matmul", id="cublas-nvjet"),
        pytest.param("Memset (Device)", "other", id="memset"),
    ],
)
def test_kernel_kind(name, kind):
    assert kernel_kind(name) == kind
