"""DreamRelation Dataset node: a relation dataset folder, validated for training.

Checks what `prepare` checks before encoding (captions, masks present and matching their
videos, mask colours, clip length, size) and outputs a DREAMRELATION_DATASET object
(`dreamrelation_core.data.dataset.DatasetSpec`) plus a readable report.
"""

from __future__ import annotations

from dreamrelation_core.data.dataset import DatasetSpec, describe_dataset, folder_stamp

from .paths import resolve_dataset_folder


class DreamRelationDataset:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": "dataset folder (absolute, or relative to ComfyUI's input folder), one per relation: <name>.mp4|.gif|<name>/ "
                                      "frames, <name>.txt caption, <name>.masks.npz or reference mask PNGs"}),
                "frames": ("INT", {"default": 61, "min": 7, "max": 301, "step": 6,
                                   "tooltip": "frames per training clip: 6k + 1 (61 in the paper)"}),
                "height": ("INT", {"default": 480, "min": 16, "max": 2048, "step": 16,
                                   "tooltip": "training height in pixels, a multiple of 16 (Mochi: 480)"}),
                "width": ("INT", {"default": 848, "min": 16, "max": 2048, "step": 16,
                                  "tooltip": "training width in pixels, a multiple of 16 (Mochi: 848)"}),
            }
        }

    RETURN_TYPES = ("DREAMRELATION_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "load"
    CATEGORY = "DreamRelation/training"
    DESCRIPTION = "Check a relation dataset folder (videos, captions, subject masks) for training at the given clip size."

    @classmethod
    def IS_CHANGED(cls, folder: str, frames: int, height: int, width: int):
        # Re-validate when the folder's files change, not only when the inputs do.
        return f"{folder_stamp(resolve_dataset_folder(folder))}|{frames}|{height}|{width}"

    def load(self, folder: str, frames: int, height: int, width: int) -> tuple[DatasetSpec, str]:
        spec = describe_dataset(resolve_dataset_folder(folder), frames, (height, width))
        return spec, spec.report()


NODE_CLASS_MAPPINGS = {"DreamRelationDataset": DreamRelationDataset}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamRelationDataset": "DreamRelation Dataset"}
