"""Pieces shared by the LaVie nodes: input definitions, input checks, and running a core stage.

Input definitions are what saved workflows refer to: a node that spreads ``common_inputs(...)`` or
``size_inputs()`` into its ``INPUT_TYPES`` gets the same names, defaults and ranges as every other.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from lavie_core import pipeline
from lavie_core.samplers import SAMPLERS
from lavie_core.schedules import SCHEDULES

from . import bridge
from .models import LaVieError, LaVieModel

__all__ = [
    "CATEGORY",
    "MAX_SEED",
    "MAX_SIZE",
    "AUTO",
    "SAMPLER_NAMES",
    "SCHEDULE_NAMES",
    "DTYPE_TIP",
    "DEVICE_TIP",
    "dtype_device_inputs",
    "base_model_inputs",
    "size_inputs",
    "common_inputs",
    "schedule_kwargs",
    "size_error",
    "size_check",
    "overlap_error",
    "raise_if_invalid",
    "run_stage",
    "memory",
    "smaller_chunks",
    "stage_fits",
    "stage_need",
    "stage_kwargs",
]

CATEGORY = "LaVie"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_SIZE = 8192
AUTO = "auto"
SAMPLER_NAMES = list(SAMPLERS)
SCHEDULE_NAMES = [AUTO, *SCHEDULES]

DTYPE_TIP = ("Weight precision. auto: the host's choice for this device (fp16 where the GPU supports it, else "
             "bf16 where it does, else fp32), fp32 on the CPU. bf16 output is about 2e-2 from fp32, fp16 about 2e-3.")
DEVICE_TIP = ("Where the model runs. auto: ComfyUI's device, with weights offloaded between runs like "
              "ComfyUI's own models; cpu: always on the CPU.")
_SCHEDULE_TIP = ("Sigma grid. auto: the official one for this stage and sampler ({}); karras or "
                 "euler_discrete trade fidelity to the paper for fewer steps.")
_SIZE_TIPS = {
    "width": "Frame width in pixels, a multiple of 8; the model was trained at 512.",
    "height": "Frame height in pixels, a multiple of 8; the model was trained at 320.",
}


# ----------------------------------------------------------------------------- input definitions
def dtype_device_inputs() -> dict:
    """The ``dtype`` and ``device`` choices of the loader nodes."""
    return {
        "dtype": (list(bridge.DTYPE_CHOICES), {"default": "auto", "tooltip": DTYPE_TIP}),
        "device": (list(bridge.DEVICE_CHOICES), {"default": "auto", "tooltip": DEVICE_TIP}),
    }


def base_model_inputs() -> dict:
    """``model``, ``positive`` and ``negative`` of the nodes that run the base UNet."""
    return {
        "model": ("LAVIE_UNET", {"tooltip": "The LaVie base UNet (LaVie Loader with lavie_base)."}),
        "positive": ("CONDITIONING", {"tooltip": "Prompt to follow (LaVie Text Encode with the SD v1 CLIP)."}),
        "negative": ("CONDITIONING", {"tooltip": "Prompt to steer away from; the official base uses an empty prompt."}),
    }


def size_inputs() -> dict:
    """``width`` and ``height`` in pixels, multiples of 8."""
    return {
        "width": ("INT", {"default": 512, "min": 8, "max": MAX_SIZE, "step": 8, "tooltip": _SIZE_TIPS["width"]}),
        "height": ("INT", {"default": 320, "min": 8, "max": MAX_SIZE, "step": 8, "tooltip": _SIZE_TIPS["height"]}),
    }


def common_inputs(cfg: float, sampler: str, official_schedule: str) -> dict:
    """``steps``, ``cfg``, ``sampler_name``, ``schedule`` and ``seed`` with a stage's official defaults."""
    return {
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": (
            "Sampler steps (network evaluations per step depend on the sampler; 50 is the official setting).")}),
        "cfg": ("FLOAT", {"default": cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": (
            f"Classifier-free guidance scale; {cfg} is the official value for this stage. 1 skips the negative pass.")}),
        "sampler_name": (SAMPLER_NAMES, {"default": sampler, "tooltip": (
            f"Sampler. {sampler} is the official one for this stage.")}),
        "schedule": (SCHEDULE_NAMES, {"default": AUTO, "tooltip": _SCHEDULE_TIP.format(official_schedule)}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": (
            "Seed of this stage's noise; the same seed gives the same video on any device.")}),
    }


def schedule_kwargs(schedule: str) -> dict[str, Any]:
    """The core stage's ``schedule`` argument for a node's ``schedule`` input."""
    # auto leaves the stage's own default in force, so the official pairing lives in the core only.
    return {} if schedule == AUTO else {"schedule": schedule}


# ----------------------------------------------------------------------------- input checks
def size_error(name: str, value: Any) -> str | None:
    """Why ``value`` is not a usable frame width / height, or None (also for linked inputs, None)."""
    if value is None:  # linked from another node: only known at run time
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return f"{name} must be an integer, got {value!r}"
    if value < 8 or value > MAX_SIZE:
        return f"{name} {value} is outside 8..{MAX_SIZE}"
    if value % 8:
        lower, upper = value // 8 * 8, value // 8 * 8 + 8
        return (f"{name} {value} is not a multiple of 8 (the VAE works on 8x8 pixel blocks); "
                f"use {max(lower, 8)} or {upper}")
    return None


def size_check(width: Any, height: Any) -> bool | str:
    """``VALIDATE_INPUTS`` answer for a width / height pair: True, or the errors joined."""
    errors = [e for e in (size_error("width", width), size_error("height", height)) if e]
    return "; ".join(errors) if errors else True


def overlap_error(size_name: str, size: Any, overlap_name: str, overlap: Any) -> str | None:
    """Why a window size (0 = off) and its overlap do not fit together, or None."""
    if size is None or overlap is None:
        return None
    size, overlap = int(size), int(overlap)
    if size < 0 or overlap < 0:
        return f"{size_name} and {overlap_name} must not be negative"
    if size > 0 and overlap >= size:
        return f"{overlap_name} ({overlap}) must be smaller than {size_name} ({size}), or set {size_name} to 0"
    return None


def raise_if_invalid(node: str, error: bool | str) -> None:
    """Raises a LaVieError naming ``node`` unless ``error`` (a ``VALIDATE_INPUTS`` answer) is True."""
    if error is not True:
        raise LaVieError(f"{node}: {error}")


# ----------------------------------------------------------------------------- running a stage
def run_stage(node: str, fn: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``fn(*args, **kwargs)``, its ValueErrors and torch.compile failures turned into LaVieErrors naming ``node``."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise LaVieError(f"{node}: {e}") from None
    except Exception as e:
        if not _compile_failure(e):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LaVieError(
            f"{node}: torch.compile could not compile the UNet ({first_line}). Set compile to false on the "
            "LaVie Loader to run it uncompiled."
        ) from e


def _compile_failure(error: BaseException) -> bool:
    # torch._dynamo is imported by the first compiled call; without it no compile error can have occurred.
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(error, dynamo.TorchDynamoException)


def memory(model: LaVieModel, frames: int, h: int, w: int, cfg: float) -> int:
    """Estimated activation bytes of one UNet call on ``frames`` latent frames of ``h x w`` (0 if unknown)."""
    try:
        unet = model.unet
        return pipeline.estimate_unet_memory(unet.config, max(1, frames), max(1, h), max(1, w),
                                             batch=1 if cfg == 1.0 else 2, dtype=unet.dtype, device=model.device)
    except Exception:  # an estimate only steers offloading; never fail a run on it
        return 0


# A stage replayed from CUDA graphs needs room for its calls' activations twice: the graphs' memory, and the
# cache of each new shape's first, eager call (torch's own allocator keeps both). The whole cascade as a 12 GiB
# card runs it (`bench/comfy_cascade.py --card-gib 12`) ran out of memory at the first replay of the VSR's
# 8-frame graph; without graphs a VSR call takes under 1% longer.
GRAPH_ROOM = 2


def graphs_fit(model: LaVieModel, need: int) -> bool:
    """Whether a stage of ``model`` whose calls need ``need`` bytes of activations replays them from CUDA
    graphs: if the loader's ``cuda_graph`` asks for it and the device has ``GRAPH_ROOM`` times that free.
    Graphs save time where calls are small (a base call: 55.6 -> 37.3 ms on an H200), under 1% of a VSR call."""
    if not model.cuda_graph:
        return False
    free = bridge.free_memory(model.device)
    if need and free < GRAPH_ROOM * need:
        bridge.log.info("LaVie: CUDA graphs off for this stage: %.1f GiB free, they need %.1f GiB",
                        free / 2**30, GRAPH_ROOM * need / 2**30)
        return False
    return True


# Over a whole VSR stage the allocator holds more of the card than the traced activations: its pool fragments
# under the stage's mix of large tensors. Measured on an H200 (VSR stages of 61 frames at 320x512, guided, fp16,
# 12 steps), the most the driver gave above the weights, for the estimates 7.14 / 3.66 / 2.77 GiB of 8-, 4- and
# 2-frame chunks: under cudaMallocAsync (ComfyUI's default) 9.7-10.3 / 5.0-5.1 / 3.8 GiB, under torch's own
# allocator 12.1 / 6.0 / 4.8. The rule holds every one (tests/test_nodes.py checks it against them); a 12 GiB
# card under ComfyUI (9.9 GiB free) then runs 4-frame chunks and an 8 GiB one (5.9 free) 2-frame ones.
STAGE_ROOM = 1.5
STAGE_SLACK = int(1.5 * 2**30)


def stage_need(need: int) -> int:
    """Free bytes a stage whose calls need ``need`` bytes of activations (0: unknown) likely runs in."""
    return int(STAGE_ROOM * need + STAGE_SLACK) if need else 0


def stage_fits(model: LaVieModel, need: int) -> bool:
    """Whether a stage whose calls need ``need`` bytes of activations fits the free memory of ``model``'s device."""
    return bridge.free_memory(model.device) >= stage_need(need)


def smaller_chunks(chunk_frames: int, chunk_overlap: int, frames: int) -> list[tuple[int, int]]:
    """The (chunk_frames, chunk_overlap) to retry a VSR stage with after it ran out of memory: half the frames
    each time, down to one, the overlap scaled alike (rounded down) so that the share of frames computed twice
    does not grow (8 with overlap 2 -> 4 with 1 -> 2 with 0 -> 1)."""
    first = chunk = min(chunk_frames or frames, frames)
    plans = []
    while chunk > 1:
        chunk //= 2
        plans.append((chunk, chunk_overlap * chunk // first))
    return plans


def stage_kwargs(model: LaVieModel, bar: bridge.Progress, need: int, *, steps: int, cfg: float, sampler_name: str,
                 schedule: str, seed: int) -> dict[str, Any]:
    """The sampling, device and progress arguments every core stage takes, from the common node inputs;
    ``need`` is the activation bytes of one UNet call (``memory``)."""
    return dict(steps=steps, cfg=cfg, sampler=sampler_name, seed=seed, device=model.device,
                callback=bar.on_step, on_call=bar.on_call, cuda_graph=graphs_fit(model, need),
                **schedule_kwargs(schedule))
