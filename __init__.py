"""LaVie text-to-video cascade (base, frame interpolation, video super-resolution) as ComfyUI nodes."""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    # ComfyUI imports this folder as a package named after the folder (e.g. "ComfyUI-LaVie").
    # Appending it to sys.path lets the node modules import the plain-PyTorch core as
    # `lavie_core`, the same name the tests use, whatever the folder is called. Appended, not
    # prepended, so ComfyUI's own modules (its `nodes` module in particular) keep precedence.
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
