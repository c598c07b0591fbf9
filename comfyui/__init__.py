"""Luna Foundry's ComfyUI nodes (category Luna/...): the Luna Semantic Detailer on ComfyUI's own models.

Install: link or copy this folder into ComfyUI/custom_nodes/ and install the `luna-foundry`
package into ComfyUI's Python (see README.md here). Vaults, projectors and detectors are listed
from models/luna_vaults/, models/luna_projectors/ and models/luna_detectors/.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("lsd_runtime") is None:  # linked from a checkout without `pip install`: use it
    _checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if os.path.isdir(os.path.join(_checkout, "lsd_runtime")):
        sys.path.append(_checkout)

from . import paths  # noqa: E402
from .host import install_unload_hook  # noqa: E402
from .lsd_nodes import NODE_CLASS_MAPPINGS as _LSD_NODES, NODE_DISPLAY_NAME_MAPPINGS as _LSD_NAMES
from .projector_node import NODE_CLASS_MAPPINGS as _PROJECTOR_NODES, NODE_DISPLAY_NAME_MAPPINGS as _PROJECTOR_NAMES
from .vault_node import NODE_CLASS_MAPPINGS as _VAULT_NODES, NODE_DISPLAY_NAME_MAPPINGS as _VAULT_NAMES

paths.register()
install_unload_hook()

NODE_CLASS_MAPPINGS = {**_LSD_NODES, **_VAULT_NODES, **_PROJECTOR_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {**_LSD_NAMES, **_VAULT_NAMES, **_PROJECTOR_NAMES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
