"""ComfyUI nodes of the pack (V3 schema API): one module per node family, each listing its node
classes in `NODES`; `comfy_entrypoint` hands them all to ComfyUI.

Every family imports only required dependencies at module level (optional ones such as sam2 are
imported when a node runs, and their absence is reported there), so a family that fails to import
is a broken install: the error propagates and ComfyUI logs it with its traceback.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import analysis, dataset, evaluation, lora, masks, sampler, train

# Families in menu order.
FAMILIES = (masks, dataset, train, lora, sampler, analysis, evaluation)


def node_list() -> list[type[io.ComfyNode]]:
    return [node for family in FAMILIES for node in family.NODES]


class DreamRelationExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


async def comfy_entrypoint() -> DreamRelationExtension:
    return DreamRelationExtension()
