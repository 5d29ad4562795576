"""LaVie cascaded latent video diffusion in plain PyTorch.

Networks (`LaVieUNet`, configured by `UNetConfig`), checkpoint loading (`load_unet`), schedules, samplers and
the cascade stages. Nothing here imports ComfyUI; the `nodes` package adapts it to the host.
"""
from .config import KINDS, UNetConfig
from .loading import CheckpointError, detect_kind, load_unet, read_checkpoint, save_unet
from .unet import LaVieUNet, compile_unet

__all__ = [
    "KINDS",
    "CheckpointError",
    "LaVieUNet",
    "UNetConfig",
    "compile_unet",
    "detect_kind",
    "load_unet",
    "read_checkpoint",
    "save_unet",
]
