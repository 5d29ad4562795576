"""ComfyUI node classes of the pack.

Each node module adds its classes here. Conventions: node modules import the core as
`lavie_core` (absolute; the pack's __init__ puts the pack folder on sys.path) and each other
relatively (`from . import ...`); only the bridge module touches ComfyUI internals.
"""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
