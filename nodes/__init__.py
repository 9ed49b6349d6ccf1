"""ComfyUI nodes of the pack: one module per node family, each exporting
NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS, merged here.

A node family whose module fails to import (a missing optional dependency) is reported and
skipped so the rest of the pack still loads.
"""

import importlib
import logging

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# Node family modules, in menu order.
_FAMILIES = ("masks", "dataset", "train", "lora", "sampler")

for _name in _FAMILIES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{_name}":
            continue  # family not written yet
        logging.getLogger("dreamrelation").warning("DreamRelation: node family %r not loaded: %s", _name, e)
        continue
    NODE_CLASS_MAPPINGS.update(getattr(_mod, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))
