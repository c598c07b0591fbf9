"""Luna Foundry ComfyUI custom nodes (copy or symlink this folder into ComfyUI/custom_nodes/;
the `luna-foundry` package must be installed in ComfyUI's Python environment)."""
from .vault_node import NODE_CLASS_MAPPINGS as _VAULT_NODES, NODE_DISPLAY_NAME_MAPPINGS as _VAULT_NAMES
from .projector_node import NODE_CLASS_MAPPINGS as _PROJECTOR_NODES, NODE_DISPLAY_NAME_MAPPINGS as _PROJECTOR_NAMES

NODE_CLASS_MAPPINGS = {**_VAULT_NODES, **_PROJECTOR_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {**_VAULT_NAMES, **_PROJECTOR_NAMES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
