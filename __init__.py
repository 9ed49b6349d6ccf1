"""ComfyUI entry point of the DreamRelation node pack.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS. The core library
`dreamrelation_core` lives beside it and is imported by its top-level name, so the pack's folder
goes on sys.path; the node modules are imported relatively (ComfyUI owns the top-level name `nodes`).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:
    # Imported as a plain module, not as ComfyUI imports a pack (e.g. pytest collecting a
    # checkout whose folder name is no Python identifier): there is no package to load nodes from.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
