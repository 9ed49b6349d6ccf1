"""DreamRelation mask nodes: subject masks from a video (Grounding DINO + SAM / SAM 2), save, load.

The models' folders and the cache of loaded models (under ComfyUI's model management) are in
`mask_models.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from dreamrelation_core.data import mask_files as mask_io

from .mask_models import NONE, get_models, grounding_dino_choices, load_on_device, sam2_choices, sam_choices
from .paths import dataset_path_candidates, resolve_dataset_path

log = logging.getLogger("dreamrelation.masks")

LAYOUTS = ("compact (.masks.npz)", "reference PNG folder")


def _tensor_masks(m: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(m)).float()


class DreamRelationSubjectMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from dreamrelation_core.masks.extractor import MODES
        from dreamrelation_core.masks.tracking import ORDERS

        return io.Schema(
            node_id="DreamRelationSubjectMasks",
            display_name="DreamRelation Subject Masks",
            category="DreamRelation/masks",
            description=("Masks of the two subjects on every frame (Grounding DINO boxes, SAM / SAM 2 masks), identity "
                         "kept across frames; relation = their union. The preview tints subject 1 orange, subject 2 blue."),
            inputs=[
                io.Image.Input("images", tooltip="The video's frames, as a video loader gives them."),
                io.Combo.Input("grounding_dino", options=grounding_dino_choices(), tooltip=(
                    "The detector in models/grounding-dino/: groundingdino_swint_ogc.pth (+ .cfg.py), "
                    "groundingdino_swinb_cogcoor.pth, or a Hugging Face folder. An original .pth also needs "
                    "models/bert-base-uncased/vocab.txt.")),
                io.Combo.Input("sam", options=sam_choices(), tooltip=(
                    "SAM in models/sams/ (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth): "
                    "masks frame by frame.")),
                io.Combo.Input("sam2", options=sam2_choices(), tooltip=(
                    "SAM 2 in models/sam2/ (sam2.1_hiera_*.pt / .safetensors): masks propagated through the clip.")),
                io.Combo.Input("mode", options=list(MODES), default="auto", tooltip=(
                    "'per_frame': detect and run SAM on the frames. 'propagate': detect once, then SAM 2 through "
                    "the clip. 'auto': propagate when SAM 2 is chosen.")),
                io.String.Input("prompt1", default="person", tooltip="What subject 1 is (Grounding DINO text prompt)."),
                io.String.Input("prompt2", default="person", tooltip=(
                    "What subject 2 is. When both prompts are equal, 'order' decides which one is subject 1.")),
                io.Combo.Input("order", options=list(ORDERS), default="left_first", tooltip=(
                    "With equal prompts, subject 1 is the left one (or the larger one) on the frame where both are "
                    "first found.")),
                io.Float.Input("box_threshold", default=0.35, min=0.0, max=1.0, step=0.01,
                               tooltip="Minimum detection score of a box."),
                io.Float.Input("text_threshold", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Minimum score of the prompt's words for a box."),
                io.Int.Input("detection_stride", default=6, min=1, max=120, tooltip=(
                    "Detect on every k-th frame (boxes carried between). In propagate mode, the search step.")),
                io.Int.Input("dilation", default=0, min=0, max=64, tooltip="Grow the masks by this many pixels."),
                io.Int.Input("max_frames_per_batch", default=8, min=1, max=64,
                             tooltip="Frames per forward pass: more is faster and needs more memory."),
            ],
            outputs=[
                io.Mask.Output(display_name="subject1"),
                io.Mask.Output(display_name="subject2"),
                io.Mask.Output(display_name="relation"),
                io.Image.Output(display_name="preview"),
                io.String.Output(display_name="notes", tooltip=(
                    "Per subject, the frames where its mask is empty, and what else the extractor noticed.")),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, grounding_dino: str, sam: str, sam2: str, mode: str, prompt1: str,
                prompt2: str, order: str, box_threshold: float, text_threshold: float, detection_stride: int,
                dilation: int, max_frames_per_batch: int) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from dreamrelation_core.masks.extractor import SubjectMaskExtractor, SubjectMaskOptions, as_uint8_frames
        from dreamrelation_core.masks.preview import preview

        frames = as_uint8_frames(images)
        if sam == NONE and sam2 == NONE:
            raise ValueError("choose a SAM model (models/sams/) or a SAM 2 model (models/sam2/)")
        detector, sam_m, sam2_m = get_models(grounding_dino, sam, sam2)
        load_on_device([m for m in (detector, sam_m, sam2_m) if m is not None])
        opt = SubjectMaskOptions(
            prompt1=prompt1, prompt2=prompt2, mode=mode, order=order, box_threshold=box_threshold,
            text_threshold=text_threshold, detection_stride=detection_stride, dilation=dilation,
            max_frames_per_batch=max_frames_per_batch,
        )
        bar = comfy.utils.ProgressBar(len(frames))

        def cancel() -> bool:
            mm.throw_exception_if_processing_interrupted()  # raises when the user pressed cancel
            return False

        extractor = SubjectMaskExtractor(detector.model, sam_m.model if sam_m else None, sam2_m.model if sam2_m else None)
        result = extractor.run(frames, opt, progress=lambda d, t: bar.update_absolute(d, t), cancel=cancel)
        for note in result.notes:
            log.info("DreamRelation Subject Masks: %s", note)
        view = torch.from_numpy(preview(frames, result)).float() / 255.0
        return io.NodeOutput(_tensor_masks(result.subject1), _tensor_masks(result.subject2),
                             _tensor_masks(result.relation), view, _notes(result, (prompt1, prompt2)))


def _notes(result, prompts: tuple[str, str]) -> str:
    """Coverage of each subject (always), then the extractor's other notes."""
    lines = [c.describe(prompts[c.subject - 1]) for c in result.coverage]
    return "\n".join(lines + [n for n in result.notes if n not in lines])


def _stack(mask: torch.Tensor, what: str) -> np.ndarray:
    m = mask.detach().cpu()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"{what}: expected a MASK [frames, height, width], got shape {tuple(mask.shape)}")
    return mask_io.as_bool_mask(m.float().numpy() if m.dtype != torch.bool else m.numpy(), "the " + what + " input", what)


def _has_frame_pngs(folder: Path) -> bool:
    try:
        mask_io.frame_files(folder)
        return True
    except mask_io.MaskFormatError:
        return False


class DreamRelationSaveMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationSaveMasks",
            display_name="DreamRelation Save Masks",
            category="DreamRelation/masks",
            description="Write two subjects' masks in a layout the DreamRelation dataset reader (and trainer) reads.",
            is_output_node=True,
            inputs=[
                io.Mask.Input("subject1", tooltip="Subject 1's mask on every frame."),
                io.Mask.Input("subject2", tooltip="Subject 2's mask on every frame (same size and frame count)."),
                io.String.Input("folder", default="dreamrelation/masks", tooltip=(
                    "The dataset folder (the video's folder). A relative path is inside ComfyUI's input folder (or "
                    "its output folder where only that one has it).")),
                io.String.Input("name", default="clip", tooltip=(
                    "The video's name without extension: writes <name>.masks.npz or <name>/frame{i}.png.")),
                io.Combo.Input("layout", options=list(LAYOUTS), tooltip=(
                    "'compact': one exact .masks.npz (overlaps kept). 'reference': a colour PNG per frame, as the "
                    "original DreamRelation code reads them.")),
                io.Boolean.Input("overwrite", default=True, tooltip="Replace masks already saved under this name."),
            ],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, subject1: torch.Tensor, subject2: torch.Tensor, folder: str, name: str, layout: str,
                overwrite: bool) -> io.NodeOutput:
        name = name.strip()
        if not name or "/" in name or "\\" in name:
            raise ValueError(f"name must be a plain file name without folders, got {name!r}")
        m1, m2 = _stack(subject1, "subject1"), _stack(subject2, "subject2")
        if m1.shape != m2.shape:
            raise ValueError(f"subject1 is {m1.shape} but subject2 is {m2.shape}: both need the same frames and size")
        out = resolve_dataset_path(folder)
        target = out / name if layout == LAYOUTS[1] else out / f"{name}{mask_io.COMPACT_SUFFIX}"
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; switch 'overwrite' on to replace it")
        if layout == LAYOUTS[1]:
            path = mask_io.save_reference_masks(target, m1, m2)
        else:
            path = mask_io.save_compact_masks(target, m1, m2)
        return io.NodeOutput(str(path), ui=ui.PreviewText(str(path)))


def find_masks(path: str) -> Path:
    """The mask file / PNG folder a Load Masks path means: itself, or the masks of the video it names."""
    candidates = dataset_path_candidates(path)
    p = resolve_dataset_path(path)
    if not p.exists():
        raise FileNotFoundError(f"masks {path!r} not found (looked at {', '.join(str(c) for c in candidates)})")
    if (p.is_file() and p.name.endswith(mask_io.COMPACT_SUFFIX)) or (p.is_dir() and _has_frame_pngs(p)):
        return p
    found = mask_io.find_masks(p)  # a video file or frame folder: its masks beside / inside it
    if found is None:
        stem = p.name if p.is_dir() else p.stem
        raise FileNotFoundError(f"{p}: no masks for it ({stem}{mask_io.COMPACT_SUFFIX} or {stem}/frame{{i}}.png beside it)")
    return found


class DreamRelationLoadMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationLoadMasks",
            display_name="DreamRelation Load Masks",
            category="DreamRelation/masks",
            description="Read two subjects' masks saved in the compact or the reference PNG layout.",
            inputs=[
                io.String.Input("path", default="", tooltip=(
                    "A <name>.masks.npz, a folder of frame{i}.png masks, or a video (its masks are found beside it). "
                    "Relative paths are looked up in ComfyUI's input folder, then its output folder.")),
            ],
            outputs=[
                io.Mask.Output(display_name="subject1"),
                io.Mask.Output(display_name="subject2"),
                io.Mask.Output(display_name="relation"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, path: str) -> float:
        # Load again when the mask file / PNGs change, not only when the path does.
        try:
            p = find_masks(path)
        except FileNotFoundError:
            return float("nan")
        return max([p.stat().st_mtime] + ([f.stat().st_mtime for f in p.iterdir()] if p.is_dir() else []))

    @classmethod
    def execute(cls, path: str) -> io.NodeOutput:
        m1, m2 = mask_io.load_masks(find_masks(path))
        return io.NodeOutput(_tensor_masks(m1), _tensor_masks(m2), _tensor_masks(m1 | m2))


NODES: list[type[io.ComfyNode]] = [DreamRelationSubjectMasks, DreamRelationSaveMasks, DreamRelationLoadMasks]
