"""ComfyUI node classes of the pack.

Each node module adds its classes here. Conventions: node modules import the core as
`lavie_core` (absolute; the pack's __init__ puts the pack folder on sys.path) and each other
relatively (`from . import ...`); only the bridge module touches ComfyUI internals.
"""

from . import applications, bridge, loaders, sampling, video

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

bridge.register_model_folder()

for _module in (loaders, sampling, video, applications):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
