"""Loader nodes: the three LaVie UNets, and a text encoder + VAE pair from a components folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import lavie_core
from lavie_core.loading import CheckpointError

from . import bridge
from .defaults import (
    RELEASED_COMPONENTS,
    RELEASED_UNETS,
    TEXT_ENCODER_DIR,
    TINY_BASE,
    TINY_DIR,
    VAE_X4_DIR,
    VAE_X4_FILE,
    VAE_X8_DIR,
    VAE_X8_FILE,
)
from .common import CATEGORY, dtype_device_inputs
from .models import LaVieCLIP, LaVieError, LaVieModel, LaVieVAE, kind_name

# Parts of a diffusers or components folder that are not LaVie UNets; kept out of the UNet list.
_COMPONENT_PARTS = {"text_encoder", "tokenizer", "vae", "vae_x4", "loras", "unet", "scheduler", "low_res_scheduler",
                    "safety_checker", "feature_extractor"}


def _where() -> str:
    return ", ".join(bridge.model_folders()) or "(no lavie folder registered)"


def unet_files() -> list[str]:
    files = []
    for name in bridge.model_files():
        parts = Path(name).parts
        if any(p in _COMPONENT_PARTS for p in parts[:-1]) or Path(name).stem.startswith("vae"):
            continue
        files.append(name)
    return files


def missing_unet_message(name: str) -> str:
    released = ", ".join(RELEASED_UNETS.values())
    return (
        f"LaVie model file '{name}' was not found. Looked in the lavie model folders: {_where()}. "
        f"Put the checkpoint in one of them (for example ComfyUI/models/lavie/; the released weights are "
        f"{released}), optionally converting a .pt to safetensors with "
        f"`python -m lavie_core.convert lavie_base.pt lavie_base.safetensors`, then refresh the page and "
        f"pick it in this loader."
    )


class LaVieLoader:
    DESCRIPTION = (
        "Loads one LaVie UNet: base (text-to-video), interpolation (16 -> 61 frames) or VSR (x4 video "
        f"super-resolution); the stage is read from the file. Defaults to the bundled tiny test model "
        f"({TINY_DIR}/); for real videos put {', '.join(RELEASED_UNETS.values())} in models/lavie/ and "
        "choose them here."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("LAVIE_UNET",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The LaVie UNet; its stage (base, interpolation or VSR) decides which LaVie node accepts it.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = unet_files()
        default = TINY_BASE if TINY_BASE in files else (files[0] if files else TINY_BASE)
        return {"required": {
            "ckpt_name": (files, {"default": default, "tooltip": (
                "LaVie checkpoint from models/lavie/ (.safetensors, .pt, .pth or .ckpt): lavie_base, "
                "lavie_interpolation or lavie_vsr, or the bundled lavie-tiny/*.safetensors.")}),
            **dtype_device_inputs(),
        }, "optional": {
            "compile": ("BOOLEAN", {"default": False, "tooltip": (
                "Run the UNet through torch.compile. On an H200 (with CUDA graphs) it no longer pays: eager calls "
                "took 36.2-36.4 ms (base), 151.4-151.9 (interpolation) and 545-546 (VSR 8-frame chunk), compiled "
                "ones (an earlier version) 39.8-39.9, 166-167 and 568, and each stage first compiles for 1-3 "
                "minutes, again for every new shape (frames, size, VSR chunk) in a ComfyUI session. Needs Triton "
                "on the GPU.")}),
            "cuda_graph": ("BOOLEAN", {"default": True, "tooltip": (
                "Replay the UNet's calls from CUDA graphs (NVIDIA GPUs): from the second step on, a call is "
                "one launch instead of 1,000-2,500 kernel launches, so the CPU no longer holds the GPU back. "
                "Same results and memory; on an H200 an uncompiled base call took 36-37 ms instead of 46-70 "
                "(the host's speed decides). Works with ComfyUI's default cudaMallocAsync allocator (Triton "
                "3.5-3.6, uncompiled UNets) and with --disable-cuda-malloc; otherwise the calls run without "
                "graphs. With --disable-cuda-malloc a failed capture is logged and the run goes on without "
                "graphs; under cudaMallocAsync torch cannot recover from one, so turn this off if a capture "
                "ever fails there.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name: str) -> bool | str:
        if ckpt_name is None:
            return True
        if bridge.resolve_model_path(ckpt_name) is None:
            return missing_unet_message(ckpt_name)
        return True

    def load(self, ckpt_name: str, dtype: str = "auto", device: str = "auto", compile: bool = False,
             cuda_graph: bool = True) -> tuple[LaVieModel]:
        path = bridge.resolve_model_path(ckpt_name)
        if path is None:
            raise LaVieError(missing_unet_message(ckpt_name))
        compute = bridge.compute_device(device)
        weight_dtype = bridge.resolve_dtype(dtype, compute, "unet")
        try:
            unet = lavie_core.load_unet(path, device=bridge.offload_device(device), dtype=weight_dtype)
        except CheckpointError as e:
            raise LaVieError(f"{e} (LaVie Loader, {ckpt_name})") from None
        kind = unet.config.kind
        bridge.log.info("LaVie: loaded %s UNet from %s (%s)", kind_name(kind), path, weight_dtype)
        patcher = bridge.wrap_module(unet, device)
        return (LaVieModel(kind=kind, patcher=patcher, name=ckpt_name, compile=compile, cuda_graph=cuda_graph),)


# ----------------------------------------------------------------------------- components
def _looks_like_components(path: str) -> bool:
    p = Path(path)
    return any((p / n).exists() for n in (TEXT_ENCODER_DIR, "tokenizer", VAE_X8_FILE, VAE_X4_FILE,
                                          VAE_X8_DIR, VAE_X4_DIR))


def component_dirs() -> list[str]:
    names = []
    for name in bridge.model_subdirs():
        path = bridge.resolve_model_path(name, directory=True)
        if path and _looks_like_components(path):
            names.append(name)
    return names


def _text_encoder_dir(root: Path) -> Path:
    if (root / "tokenizer").is_dir():
        return root  # diffusers pipeline folder: tokenizer/ and text_encoder/ side by side
    if (root / TEXT_ENCODER_DIR).is_dir():
        return root / TEXT_ENCODER_DIR  # the pack's layout: tokenizer files inside text_encoder/
    return root


def _vae_candidates(root: Path, variant: str) -> list[Path]:
    if variant == "x4":
        return [root / VAE_X4_FILE, root / VAE_X4_DIR, root / VAE_X8_DIR]
    return [root / VAE_X8_FILE, root / VAE_X8_DIR]


def missing_components_message(name: str, detail: str = "") -> str:
    return (
        f"LaVie components folder '{name}' {detail or 'was not found'}. Looked in the lavie model "
        f"folders: {_where()}. A components folder holds a CLIP text encoder and a VAE: either a "
        f"diffusers pipeline folder (tokenizer/, text_encoder/, vae/; for LaVie: {RELEASED_COMPONENTS['x8']} "
        f"for base and interpolation, {RELEASED_COMPONENTS['x4']} for VSR) or the pack's layout "
        f"({TEXT_ENCODER_DIR}/ with tokenizer files, {VAE_X8_FILE}, {VAE_X4_FILE}). Put it in "
        "ComfyUI/models/lavie/ and refresh."
    )


class LaVieComponentsLoader:
    DESCRIPTION = (
        "Loads a CLIP text encoder and a VAE from a folder under models/lavie/. Defaults to the bundled "
        f"tiny set ({TINY_DIR}); with the released weights pick {RELEASED_COMPONENTS['x8']} (vae = x8) for "
        f"the base and interpolation stages and {RELEASED_COMPONENTS['x4']} (vae = x4) for VSR. ComfyUI's "
        "own checkpoint loader (SD 1.x checkpoint, x4 upscaler checkpoint) works as well."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP", "VAE")
    RETURN_NAMES = ("clip", "vae")
    OUTPUT_TOOLTIPS = ("Text encoder for LaVie Text Encode (or ComfyUI's CLIP Text Encode).",
                       "VAE for LaVie Decode / LaVie Upscale (or ComfyUI's VAE Decode).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        dirs = component_dirs()
        default = TINY_DIR if TINY_DIR in dirs else (dirs[0] if dirs else TINY_DIR)
        return {"required": {
            "components": (dirs, {"default": default, "tooltip": (
                "Folder under models/lavie/ with the text encoder and VAE: a diffusers pipeline folder or "
                "the bundled lavie-tiny set.")}),
            "vae": (["x8", "x4"], {"default": "x8", "tooltip": (
                "Which VAE to load: x8 (Stable Diffusion VAE; base and interpolation stages) or x4 (x4 "
                "upscaler VAE; VSR stage).")}),
            **dtype_device_inputs(),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, components: str) -> bool | str:
        if components is None:
            return True
        root = bridge.resolve_model_path(components, directory=True)
        if root is None:
            return missing_components_message(components)
        if not _looks_like_components(root):
            return missing_components_message(components, f"({root}) holds no text encoder or VAE")
        return True

    def load(self, components: str, vae: str = "x8", dtype: str = "auto",
             device: str = "auto") -> tuple[LaVieCLIP, LaVieVAE]:
        found = bridge.resolve_model_path(components, directory=True)
        if found is None:
            raise LaVieError(missing_components_message(components))
        root = Path(found)
        compute = bridge.compute_device(device)
        offload = bridge.offload_device(device)

        from lavie_core.text import load_text_encoder
        from lavie_core.vae import load_vae

        text_dir = _text_encoder_dir(root)
        try:
            encoder = load_text_encoder(text_dir, device="cpu",
                                        dtype=bridge.resolve_dtype(dtype, compute, "text"))
        except (OSError, ValueError) as e:
            raise LaVieError(f"LaVie Components Loader: cannot load the text encoder of '{components}' "
                             f"from {text_dir}: {e}") from None

        candidates = _vae_candidates(root, vae)
        source = next((c for c in candidates if c.exists()), None)
        if source is None:
            raise LaVieError(
                f"LaVie Components Loader: '{components}' ({root}) has no {vae} VAE; looked for "
                + ", ".join(c.name for c in candidates) + ". "
                + ("For the VSR stage pick the x4 upscaler's folder." if vae == "x4" else "")
            )
        try:
            autoencoder = load_vae(source, device="cpu", dtype=bridge.resolve_dtype(dtype, compute, "vae"))
        except (OSError, ValueError) as e:
            raise LaVieError(f"LaVie Components Loader: cannot load the VAE {source}: {e}") from None
        got = f"x{autoencoder.config.downscale}"
        if got != vae:
            raise LaVieError(
                f"LaVie Components Loader: {source} is an {got} VAE but vae = {vae} was asked for. "
                + ("The VSR stage needs the x4 upscaler's VAE: pick that folder." if vae == "x4"
                   else "Base and interpolation need the Stable Diffusion (x8) VAE.")
            )
        if offload != torch.device("cpu"):
            encoder.to(offload)
            autoencoder.to(offload)
        clip = LaVieCLIP(encoder, bridge.wrap_module(encoder.model, device, attr="text_model"), name=components)
        lavie_vae = LaVieVAE(autoencoder, bridge.wrap_module(autoencoder, device, attr="first_stage_model"),
                             name=f"{components}/{source.name}")
        return clip, lavie_vae


class LaVieTextEncode:
    DESCRIPTION = (
        "Encodes a prompt for the LaVie stages. Takes the pack's CLIP (LaVie Components Loader) or ComfyUI's "
        "(checkpoint loader): Stable Diffusion v1 CLIP for base and interpolation, the x4 upscaler's for VSR."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Text conditioning ([1, 77, D] embedding) for a LaVie sampler node.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "Text encoder: from LaVie Components Loader or a ComfyUI checkpoint loader."}),
            "text": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": True, "tooltip": (
                "The prompt. LaVie reads up to 77 CLIP tokens; leave empty for the unconditional (negative) side.")}),
        }}

    def encode(self, clip: Any, text: str) -> tuple[list]:
        from .models import encode_text

        return (encode_text(clip, text),)


NODE_CLASS_MAPPINGS = {
    "LaVieLoader": LaVieLoader,
    "LaVieComponentsLoader": LaVieComponentsLoader,
    "LaVieTextEncode": LaVieTextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LaVieLoader": "LaVie Loader",
    "LaVieComponentsLoader": "LaVie Components Loader",
    "LaVieTextEncode": "LaVie Text Encode",
}

