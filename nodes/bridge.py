"""The one place where the pack touches ComfyUI's internals.

Everything else in `nodes` talks to ComfyUI through these functions, so a change in the host's
API (ComfyUI moves fast) is fixed here once. Each host call is guarded for the signatures of the
2024 releases and of current ComfyUI.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

log = logging.getLogger("LaVie")

MODEL_FOLDER = "lavie"
MODEL_EXTENSIONS = frozenset({".pt", ".pth", ".ckpt", ".safetensors"})
PACK_DIR = Path(__file__).resolve().parent.parent
BUNDLED_DIR = PACK_DIR / "bundled"

DEVICE_CHOICES = ("auto", "cpu")
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- model folder
def register_model_folder() -> None:
    """Make `lavie` a model folder: models/lavie, the pack's bundled/ directory, and any YAML paths.

    An extra_model_paths.yaml may already have created the entry (with no extension filter, which
    would list every file); its paths are kept and ours added, and the extensions are set.
    """
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    paths: list[str] = list(entry[0]) if entry else []
    extensions = set(entry[1]) if entry and entry[1] else set()
    for path in (default, str(BUNDLED_DIR)):
        if path not in paths:
            paths.append(path)
    extensions |= MODEL_EXTENSIONS
    if entry is not None and isinstance(entry[0], list):
        # Keep the host's list object: some hosts hand it out by reference and append to it later.
        entry[0][:] = paths
        paths = entry[0]
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, extensions)
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(MODEL_FOLDER, None)


def model_folders() -> list[str]:
    """The directories searched for LaVie files, in search order."""
    try:
        return list(folder_paths.get_folder_paths(MODEL_FOLDER))
    except KeyError:
        return [os.path.join(folder_paths.models_dir, MODEL_FOLDER), str(BUNDLED_DIR)]


def model_files() -> list[str]:
    """Checkpoint files under the lavie folders, as names relative to their folder."""
    try:
        return list(folder_paths.get_filename_list(MODEL_FOLDER))
    except (KeyError, OSError):
        return []


def model_subdirs() -> list[str]:
    """Folders (one level down) under the lavie folders, as relative names, for component sets."""
    names: set[str] = set()
    for root in model_folders():
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for e in entries:
            if e.is_dir() and not e.name.startswith("."):
                names.add(e.name)
    return sorted(names)


def resolve_model_path(name: str, *, directory: bool = False) -> str | None:
    """Absolute path of `name` (a file, or a folder with directory=True) in the lavie folders."""
    if not name:
        return None
    if not directory:
        try:
            found = folder_paths.get_full_path(MODEL_FOLDER, name)
        except KeyError:
            found = None
        if found:
            return found
    relative = os.path.relpath(os.path.join("/", name), "/")
    for root in model_folders():
        candidate = os.path.join(root, relative)
        if (os.path.isdir if directory else os.path.isfile)(candidate):
            return candidate
    return None


def output_directory() -> str:
    return folder_paths.get_output_directory()


def temp_directory() -> str:
    return folder_paths.get_temp_directory()


def save_path(prefix: str, directory: str, width: int, height: int) -> tuple[str, str, int, str]:
    """(folder, file stem, counter, subfolder) the host's own savers would use for `prefix`."""
    folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, directory, width, height)
    return folder, stem, counter, subfolder


# ----------------------------------------------------------------------------- devices, dtypes
def compute_device(choice: str = "auto") -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    return mm.get_torch_device()


def offload_device(choice: str = "auto") -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    return mm.unet_offload_device()


def _host_dtype(role: str, device: torch.device) -> torch.dtype:
    try:
        if role == "vae":
            try:
                return mm.vae_dtype(device=device)
            except TypeError:  # older hosts take no arguments
                return mm.vae_dtype()
        if role == "text":
            return mm.text_encoder_dtype(device)
        if mm.should_use_fp16(device=device):
            return torch.float16
        if mm.should_use_bf16(device=device):
            return torch.bfloat16
    except Exception as e:  # a host helper that changed shape must not stop the load
        log.debug("LaVie: host dtype helper failed (%s); using fp32", e)
    return torch.float32


def resolve_dtype(choice: str, device: torch.device, role: str = "unet") -> torch.dtype:
    """`auto`: half precision on accelerators that support it (the host's own policy), fp32 on CPU."""
    if choice in _DTYPES:
        dtype = _DTYPES[choice]
    elif device.type == "cpu":
        return torch.float32
    else:
        dtype = _host_dtype(role, device)
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("LaVie: fp16 on the CPU is very slow and some kernels lack it; prefer fp32 or bf16")
    return dtype


# ----------------------------------------------------------------------------- model management
class _Holder(torch.nn.Module):
    """Container the host's ModelPatcher manages.

    ModelPatcher writes plain attributes such as `device` onto the module it manages; the core
    models expose `device` as a read-only property, so they ride inside this holder instead.
    """

    def __init__(self, module: torch.nn.Module, attr: str, device: torch.device):
        super().__init__()
        self.attr = attr
        setattr(self, attr, module)
        self.device = device

    @property
    def inner(self) -> torch.nn.Module:
        return getattr(self, self.attr)


def wrap_module(module: torch.nn.Module, device_choice: str = "auto", attr: str = "diffusion_model") -> Any:
    """A host ModelPatcher around `module`, so the host moves it to the GPU and offloads it with its own models.

    The UNet rides under `diffusion_model`, the attribute name the host's own models use, so state
    dict keys line up with the host's convention for patches.
    """
    load = compute_device(device_choice)
    offload = offload_device(device_choice)
    current = next((p.device for p in module.parameters()), offload)
    holder = _Holder(module, attr, current)
    return comfy.model_patcher.ModelPatcher(holder, load_device=load, offload_device=offload)


def _load_kwargs(memory_required: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"memory_required": int(memory_required)}
    try:
        params = inspect.signature(mm.load_models_gpu).parameters
    except (TypeError, ValueError):
        return kwargs
    # The core modules have no host cast layers, so a partial (lowvram) load would leave some
    # layers on the CPU; ask for all or nothing where the host lets us.
    if "force_full_load" in params:
        kwargs["force_full_load"] = True
    return kwargs


def load_module(patcher: Any, memory_required: int = 0) -> torch.nn.Module:
    """Load the patcher's module onto its compute device (offloading other models as needed) and return it."""
    if memory_required:
        # The host counts torch's cached memory as free, and under cudaMallocAsync a fragmented pool could not
        # serve a stage's large tensors from it: handed back first, the host offloads what the stage needs.
        soft_empty_cache()
    mm.load_models_gpu([patcher], **_load_kwargs(memory_required))
    holder = patcher.model
    device = patcher.load_device
    stray = any(p.device != device for p in holder.parameters())
    if stray:
        # Hosts in no-VRAM mode may still load partially; the core layers need all weights on one device.
        holder.to(device)
        holder.device = device
        for attr, value in (("model_lowvram", False), ("model_loaded_weight_memory", patcher.model_size())):
            if hasattr(holder, attr):
                setattr(holder, attr, value)
    return holder.inner


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` as the host counts them (the driver's free memory and torch's unused cache)."""
    try:
        return int(mm.get_free_memory(device))
    except Exception:  # an unknown device or an older host: take it as ample, as before this check
        return 1 << 62


def module_of(patcher: Any) -> torch.nn.Module:
    return patcher.model.inner


def load_device(patcher: Any) -> torch.device:
    return patcher.load_device


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory: torch's OutOfMemoryError, or the CUDA error a
    graph replay raises (under cudaMallocAsync graph memory is mapped at replay)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def unload_all() -> None:
    """Move every model the host holds off the compute device and empty torch's cache."""
    mm.unload_all_models()
    soft_empty_cache()


def soft_empty_cache() -> None:
    try:
        mm.soft_empty_cache()
    except Exception:
        pass


def check_interrupted() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


# ----------------------------------------------------------------------------- progress and previews
def _previewer(latent_format: str, device: torch.device) -> Any:
    try:
        import comfy.latent_formats as formats
        import latent_preview

        fmt = formats.SD_X4() if latent_format == "sd_x4" else formats.SD15()
        return latent_preview.get_previewer(device, fmt)
    except Exception as e:  # previews are a nicety; a host without them still samples
        log.debug("LaVie: no previewer (%s)", e)
        return None


class Progress:
    """A host progress bar for one stage; its methods are the core's callback and per-call hook.

    Every tick checks for Cancel, so an interrupt lands between two network calls.
    """

    def __init__(self, total: int, *, latent_format: str | None = "sd15", device: torch.device | None = None):
        self.total = max(1, int(total))
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = _previewer(latent_format, device or torch.device("cpu")) if latent_format else None
        self._fine = False

    def _preview(self, denoised: Any) -> Any:
        if self.previewer is None or not isinstance(denoised, torch.Tensor):
            return None
        try:
            x0 = denoised
            if x0.ndim == 5:  # b c f h w: show the middle frame
                x0 = x0[:, :, x0.shape[2] // 2]
            return self.previewer.decode_latent_to_preview_image("JPEG", x0[:1].float())
        except Exception as e:
            log.debug("LaVie: preview failed: %s", e)
            self.previewer = None
            return None

    def on_step(self, info: dict) -> None:
        """Sampler-step callback: advances the bar unless the finer per-call hook already drives it."""
        check_interrupted()
        preview = self._preview(info.get("denoised"))
        if self._fine:
            if preview is not None:
                self.bar.update_absolute(self.bar.current, self.bar.total, preview)
            return
        steps = int(info.get("steps") or self.total)
        step = int(info.get("step", self.bar.current + 1))  # completed steps, 1-based
        self.bar.update_absolute(min(step, steps), steps, preview)

    def on_call(self, done: int, total: int) -> None:
        """Per-network-call hook (tiles, windows): the bar counts calls instead of steps."""
        check_interrupted()
        self._fine = True
        self.bar.update_absolute(int(done), max(1, int(total)))

    def tick(self, done: int, total: int) -> None:
        """Plain counter, e.g. frames decoded."""
        check_interrupted()
        self.bar.update_absolute(int(done), max(1, int(total)))


def progress(total: int, *, latent_format: str | None = "sd15", device: torch.device | None = None) -> Progress:
    return Progress(total, latent_format=latent_format, device=device)

