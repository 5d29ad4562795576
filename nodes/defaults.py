"""Names of the bundled tiny model set and of the released weights.

The tiny set lives in the pack's `bundled/` directory, which the pack registers as a `lavie` model
folder, so its files appear in the loaders as `lavie-tiny/...`. Shipped workflows, tests and the
tool that writes the bundled set all read these names from here.
"""

from __future__ import annotations

TINY_DIR = "lavie-tiny"
TINY_BASE = f"{TINY_DIR}/base.safetensors"
TINY_INTERPOLATION = f"{TINY_DIR}/interpolation.safetensors"
TINY_VSR = f"{TINY_DIR}/vsr.safetensors"
TINY_UNETS = {"base": TINY_BASE, "interpolation": TINY_INTERPOLATION, "vsr": TINY_VSR}

# Inside a components folder (the tiny set's own layout; diffusers folders use text_encoder/,
# tokenizer/ and vae/ instead).
TEXT_ENCODER_DIR = "text_encoder"
VAE_X8_FILE = "vae.safetensors"
VAE_X4_FILE = "vae_x4.safetensors"
VAE_X8_DIR = "vae"
VAE_X4_DIR = "vae_x4"

# Released LaVie checkpoints, named in messages that tell users what to download.
RELEASED_UNETS = {"base": "lavie_base.pt", "interpolation": "lavie_interpolation.pt", "vsr": "lavie_vsr.pt"}
# Released component sources: base and interpolation use Stable Diffusion v1-4's text encoder and
# VAE; VSR uses those of the Stable Diffusion x4 upscaler.
RELEASED_COMPONENTS = {"x8": "stable-diffusion-v1-4", "x4": "stable-diffusion-x4-upscaler"}
