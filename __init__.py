"""ComfyUI entry point of the DreamRelation node pack.

ComfyUI imports this folder as a package and calls `comfy_entrypoint` (V3 node API). It reads
NODE_CLASS_MAPPINGS before `comfy_entrypoint`, so this module must not define it. The core library
`dreamrelation_core` lives beside it and is imported by its top-level name, so the pack's folder
goes on sys.path; the node modules are imported relatively (ComfyUI owns the top-level name `nodes`).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

try:
    import comfy_api  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_api = None

if __package__ and comfy_api is not None:
    from .nodes import comfy_entrypoint  # noqa: E402

    __all__ = ["comfy_entrypoint"]
else:
    # Imported outside ComfyUI (e.g. pytest collecting the checkout as a package, or as a plain
    # module when the folder name is no Python identifier): there are no nodes to offer.
    __all__ = []
