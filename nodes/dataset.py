"""DreamRelation Dataset node: a relation dataset folder, validated for training.

Checks what `prepare` checks before encoding (captions, masks present and matching their
videos, mask colours, clip length, size) and outputs a DREAMRELATION_DATASET object
(`dreamrelation_core.data.dataset.DatasetSpec`) plus a readable report.
"""

from __future__ import annotations

from comfy_api.latest import io

from dreamrelation_core.data.dataset import describe_dataset, folder_stamp

from .comfy_types import Dataset
from .paths import resolve_dataset_folder


class DreamRelationDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationDataset",
            display_name="DreamRelation Dataset",
            category="DreamRelation/training",
            description="Check a relation dataset folder (videos, captions, subject masks) for training at the given clip size.",
            inputs=[
                io.String.Input("folder", default="", tooltip=(
                    "dataset folder (absolute, or relative to ComfyUI's input folder, then its output folder), one "
                    "per relation: <name>.mp4|.gif|<name>/ frames, <name>.txt caption, <name>.masks.npz or "
                    "reference mask PNGs")),
                io.Int.Input("frames", default=61, min=7, max=301, step=6,
                             tooltip="frames per training clip: 6k + 1 (61 in the paper)"),
                io.Int.Input("height", default=480, min=16, max=2048, step=16,
                             tooltip="training height in pixels, a multiple of 16 (Mochi: 480)"),
                io.Int.Input("width", default=848, min=16, max=2048, step=16,
                             tooltip="training width in pixels, a multiple of 16 (Mochi: 848)"),
            ],
            outputs=[
                Dataset.Output(display_name="dataset"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, frames: int, height: int, width: int) -> str:
        # Re-validate when the folder's files change, not only when the inputs do.
        return f"{folder_stamp(resolve_dataset_folder(folder))}|{frames}|{height}|{width}"

    @classmethod
    def execute(cls, folder: str, frames: int, height: int, width: int) -> io.NodeOutput:
        spec = describe_dataset(resolve_dataset_folder(folder), frames, (height, width))
        return io.NodeOutput(spec, spec.report())


NODES: list[type[io.ComfyNode]] = [DreamRelationDataset]
