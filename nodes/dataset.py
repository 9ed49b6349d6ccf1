"""DreamRelation dataset nodes.

Dataset: a relation dataset folder, validated for training. Checks what `prepare` checks before
encoding (captions, masks present and matching their videos, mask colours, clip length, size) and
outputs a DREAMRELATION_DATASET object (`dreamrelation_core.data.dataset.DatasetSpec`) plus a
readable report.

Add To Dataset: one exemplar (frames, two subject masks, caption) appended to a dataset folder in
ComfyUI's input folder (`dreamrelation_core.data.exemplars.add_exemplar`), so a dataset is built
in the graph without placing files by hand.
"""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui

from dreamrelation_core.data.dataset import describe_dataset, folder_stamp
from dreamrelation_core.data.mask_files import as_bool_mask
from dreamrelation_core.errors import DatasetError

from .comfy_types import Dataset
from .paths import resolve_dataset_folder, resolve_dataset_path

BASE_MODELS = ("mochi", "wan2.1", "wan2.2-5b")


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
                    "The dataset folder, one per relation (absolute, or relative to ComfyUI's input folder, then its "
                    "output folder): <name>.mp4|.gif|<name>/ frames, a <name>.txt caption, <name>.masks.npz or "
                    "reference mask PNGs.")),
                io.Int.Input("frames", default=61, min=5, max=301, step=2,
                             tooltip="Frames per training clip: Mochi 6k + 1 (61 in the paper), Wan 4k + 1 (81)."),
                io.Int.Input("height", default=480, min=16, max=2048, step=16,
                             tooltip="Training height in pixels, a multiple of 16 (Mochi: 480)."),
                io.Int.Input("width", default=848, min=16, max=2048, step=16,
                             tooltip="Training width in pixels, a multiple of 16 (Mochi: 848)."),
                io.Combo.Input("base_model", options=list(BASE_MODELS), default="mochi", optional=True,
                               tooltip=("The base model whose clip rules apply: mochi, wan2.1 (Wan 2.1 1.3B / 14B and "
                                        "the Wan 2.2 A14B experts) or wan2.2-5b (Wan 2.2 TI2V 5B, sizes in multiples "
                                        "of 32).")),
            ],
            outputs=[
                Dataset.Output(display_name="dataset"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, frames: int, height: int, width: int, base_model: str = "mochi") -> str:
        # Re-validate when the folder's files change, not only when the inputs do.
        return f"{folder_stamp(resolve_dataset_folder(folder))}|{frames}|{height}|{width}|{base_model}"

    @classmethod
    def execute(cls, folder: str, frames: int, height: int, width: int, base_model: str = "mochi") -> io.NodeOutput:
        from dreamrelation_core.base_models import get_spec

        spec = describe_dataset(resolve_dataset_folder(folder), frames, (height, width), get_spec(base_model))
        return io.NodeOutput(spec, spec.report())


def _uint8_frames(images: torch.Tensor) -> np.ndarray:
    """IMAGE [F, H, W, 3] float 0..1 -> uint8 [F, H, W, 3] (rounded, as ComfyUI's image savers do)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetError(f"images: expected IMAGE frames [F, H, W, 3], got shape {tuple(images.shape)}")
    return (images.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def _bool_mask(mask: torch.Tensor, what: str) -> np.ndarray:
    """MASK [F, H, W] (or one [H, W] frame) -> bool [F, H, W]."""
    m = mask.detach().cpu()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise DatasetError(f"{what}: expected a MASK [frames, height, width], got shape {tuple(mask.shape)}")
    return as_bool_mask(m.float().numpy() if m.dtype != torch.bool else m.numpy(), "the " + what + " input", what)


class DreamRelationAddToDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationAddToDataset",
            display_name="DreamRelation Add To Dataset",
            category="DreamRelation/training",
            description=("Append one exemplar (video frames, the two subjects' masks, a caption) to a relation dataset "
                         "folder in ComfyUI's input folder, checked as the Dataset node checks it; the same exemplar "
                         "added twice is stored once."),
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip=(
                    "The video's frames (e.g. Load Video -> Get Video Components), 6k + 1 of them (7, 13, ..., 61). "
                    "They are stored losslessly as <clip_name>/frame0000.png and on.")),
                io.Mask.Input("subject1_mask", tooltip="Subject 1's mask on every frame (Subject Masks' subject1)."),
                io.Mask.Input("subject2_mask", tooltip="Subject 2's mask on every frame (Subject Masks' subject2)."),
                io.String.Input("caption", default="", multiline=True, tooltip=(
                    "What happens in the clip, e.g. 'a person shaking hands with another person'. Saved as "
                    "<clip_name>.txt.")),
                io.String.Input("dataset", default="relations/shaking_hands", tooltip=(
                    "The dataset folder, one per relation, inside ComfyUI's input folder (made if missing). Feed the "
                    "output to the Dataset node's folder.")),
                io.String.Input("clip_name", default="", tooltip=(
                    "The exemplar's file name (letters, digits, . _ - space). Empty: clip_<content hash>, so the "
                    "same exemplar always gets the same name.")),
            ],
            outputs=[
                io.String.Output(display_name="dataset"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, subject1_mask: torch.Tensor, subject2_mask: torch.Tensor, caption: str,
                dataset: str, clip_name: str) -> io.NodeOutput:
        from dreamrelation_core.data.exemplars import add_exemplar, check_dataset_name

        name = check_dataset_name(dataset)
        folder = resolve_dataset_path(name)
        added = add_exemplar(folder, clip_name, _uint8_frames(images), _bool_mask(subject1_mask, "subject1_mask"),
                             _bool_mask(subject2_mask, "subject2_mask"), caption)
        return io.NodeOutput(name, added.report, ui=ui.PreviewText(added.report))


NODES: list[type[io.ComfyNode]] = [DreamRelationDataset, DreamRelationAddToDataset]
