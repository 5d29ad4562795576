"""Activation memory of a UNet call or a VAE decode, traced on the meta device.

The forward pass runs on shape-only tensors while a dispatch mode follows every storage from the op that
creates it until the last tensor viewing it is gone; the largest sum of live storages is the activation
peak of an eager call, taken from the model's own code path (guidance batch, shared text-free prefix,
per-sample upper levels, chunked attention), so it stays right when that code changes. Nothing is
computed or allocated: a paper-size call traces in one or two seconds on any machine.

`device="cuda"` traces the path an NVIDIA GPU takes, with the fused kernels (`kernels`), whose outputs are
all they allocate. Attention is traced as the flash, cuDNN and CPU SDPA kernels allocate it: the output
alone (on the meta device SDPA would otherwise decompose into the score matrix).

Not seen: the caching allocator's rounding and fragmentation, and cuDNN's convolution workspace;
`pipeline.estimate_unet_memory` adds a margin for those.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import fused
from .config import UNetConfig
from .temporal_vae import TemporalAutoencoder, TemporalVAEConfig
from .unet import LaVieUNet
from .vae import AutoencoderKL, VAEConfig

__all__ = ["decode_activation_peak", "trace_peak", "unet_activation_peak"]


class _StorageTracker(TorchDispatchMode):
    """Live bytes of the storages created under it. Views and in-place results keep their storage alive;
    storages made before (weights, inputs) are not counted."""

    def __init__(self, cuda: bool) -> None:
        super().__init__()
        self.cuda = cuda
        self.refs: dict[int, list[int]] = {}  # storage id -> [tensors alive, bytes]
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default and out.is_meta:
            out = self._convolution_layout(out, args[0], args[1])
        returns = func._schema.returns
        for i, t in enumerate(tree_leaves(out)):
            if isinstance(t, torch.Tensor):
                aliased = i < len(returns) and returns[i].alias_info is not None
                self._hold(t, new=not aliased)
        return out

    def _convolution_layout(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The meta convolution returns a contiguous output; cuDNN returns channels-last where its input or
        weight is, and oneDNN on the CPU does so for 2-D convolutions only. Layout decides which later
        reshapes copy, so the trace takes the device's."""
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(out.ndim)
        if fmt is None or (out.ndim == 5 and not self.cuda):
            return out
        if fmt in (suggest_memory_format(x), suggest_memory_format(weight)):
            return torch.empty_like(out, memory_format=fmt)
        return out

    def _hold(self, t: torch.Tensor, *, new: bool) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.refs.get(key)
        if entry is None:
            if not new:
                return
            entry = self.refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key).atexit = False

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]


class _OutputOnlyAttention(TorchFunctionMode):
    """SDPA as its fused kernels allocate it: the output alone, stored `... l h d` and returned as the
    `... h l d` view, so that merging heads afterwards is a view as it is on the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        q, v = args[0], args[2]
        if q.ndim < 4:
            return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        *batch, heads, length, _ = q.shape
        return torch.empty((*batch, length, heads, v.shape[-1]), dtype=q.dtype, device=q.device).transpose(-3, -2)


def _outside_inference_mode() -> contextlib.AbstractContextManager:
    """Inference mode (ComfyUI runs nodes in it) hands composite ops such as `aten.conv2d` to the tracker
    undecomposed, so it would miss the convolutions' channels-last outputs and trace another path: the VSR's
    8-frame call at 7.58 GiB instead of the 6.49 it measures."""
    return torch.inference_mode(False)


def trace_peak(fn: Callable[[], Any], *, device: torch.device | str = "cpu", kernels: bool = True) -> int:
    """Peak bytes of the storages that `fn` creates and holds at once, on the code path of `device` (its type
    matters: "cuda" takes the CUDA paths, with the fused kernels if `kernels`).

    `fn` is meant to run on meta tensors. On real ones the count is the same, but attention outputs are
    left uninitialised."""
    cuda = torch.device(device).type == "cuda"
    tracker = _StorageTracker(cuda)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_outside_inference_mode())
        stack.enter_context(torch.no_grad())
        if cuda:
            stack.enter_context(fused.meta_as_cuda(kernels=kernels))
        stack.enter_context(_OutputOnlyAttention())
        stack.enter_context(tracker)
        out = fn()
    del out
    return tracker.peak


@functools.lru_cache(maxsize=64)
def unet_activation_peak(
    config: UNetConfig,
    frames: int,
    height: int,
    width: int,
    batch: int,
    dtype: torch.dtype,
    device_type: str = "cuda",
    kernels: bool = True,
) -> int:
    """Traced activation bytes of one UNet call on `frames` latent frames of `height x width` with `batch`
    conditionings per sample (2 with guidance batched), called as the samplers call it: the video once,
    the texts stacked. Weights and inputs are not included; the output is."""
    with _outside_inference_mode(), torch.device("meta"):
        model = LaVieUNet(config).to(dtype).use_channels_last()  # as loaded
        x = torch.empty(1, config.in_channels, frames, height, width, dtype=dtype)
        context = torch.empty(batch, 77, config.cross_attention_dim, dtype=dtype)
    noise_level = 0 if config.num_noise_levels is not None else None
    return trace_peak(lambda: model(x, torch.zeros(1), context, noise_level), device=device_type, kernels=kernels)


@functools.lru_cache(maxsize=64)
def decode_activation_peak(
    config: VAEConfig | TemporalVAEConfig,
    frames: int,
    height: int,
    width: int,
    dtype: torch.dtype,
    device_type: str = "cuda",
    kernels: bool = True,
) -> int:
    """Traced activation bytes of decoding `frames` latents of `height x width` in one call: a per-image VAE
    (`VAEConfig`) takes them as a batch, a temporal one (`TemporalVAEConfig`) as one video. Weights and
    inputs are not included; the output is."""
    with _outside_inference_mode(), torch.device("meta"):
        if isinstance(config, TemporalVAEConfig):
            vae: torch.nn.Module = TemporalAutoencoder(config).to(dtype)
            z = torch.empty(1, config.latent_channels, frames, height, width, dtype=dtype)
        else:
            vae = AutoencoderKL(config).to(dtype)
            z = torch.empty(frames, config.latent_channels, height, width, dtype=dtype)
    return trace_peak(lambda: vae.decode(z), device=device_type, kernels=kernels)
