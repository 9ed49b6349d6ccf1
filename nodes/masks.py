"""DreamRelation mask nodes: subject masks from a video (Grounding DINO + SAM / SAM 2), save, load.

Models come from the folders ComfyUI users already have (registered here where missing):
`models/grounding-dino/` (original .pth [+ .cfg.py] or Hugging Face folders), `models/sams/`,
`models/sam2/`, and `models/bert-base-uncased/` (vocab.txt, for original .pth detectors).
Loaded models are kept between runs under ComfyUI's model management (see "Models under
ComfyUI's model management" below) and dropped when ComfyUI unloads them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io, ui

from dreamrelation_core.data import mask_files as mask_io

from .paths import dataset_path_candidates, resolve_dataset_path

log = logging.getLogger("dreamrelation.masks")

MODEL_FOLDERS = {
    "grounding-dino": {".pth", ".pt", ".safetensors"},
    "sams": {".pth", ".pt", ".safetensors"},
    "sam2": {".pt", ".pth", ".safetensors"},
    "bert-base-uncased": {".txt", ".json"},
}
NONE = "none"
LAYOUTS = ("compact (.masks.npz)", "reference PNG folder")


# ---------------------------------------------------------------------------------------------
# Model folders and files


def register_folders() -> None:
    """Add our model folders to folder_paths where ComfyUI (or another pack) has not."""
    import folder_paths

    for name, exts in MODEL_FOLDERS.items():
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(exts))


def _folders(name: str) -> list[Path]:
    import folder_paths

    register_folders()
    return [Path(p) for p in folder_paths.get_folder_paths(name)]


def _hf_folders(name: str) -> list[str]:
    """Sub-folders holding a Hugging Face model (config.json)."""
    found = []
    for base in _folders(name):
        if base.is_dir():
            found += [p.name for p in sorted(base.iterdir()) if p.is_dir() and (p / "config.json").is_file()]
    return found


def _files(name: str) -> list[str]:
    import folder_paths

    register_folders()
    hf = set(_hf_folders(name))
    exts = MODEL_FOLDERS[name]
    # Weights inside an HF folder are part of that folder's entry, not models of their own.
    return [f for f in folder_paths.get_filename_list(name)
            if os.path.splitext(f)[1].lower() in exts and f.replace("\\", "/").split("/")[0] not in hf]


def grounding_dino_choices() -> list[str]:
    from dreamrelation_core.masks.grounding_dino import ORIGINAL_FILES

    found = _files("grounding-dino") + _hf_folders("grounding-dino")
    # With nothing installed, offer the expected file: choosing it gives the "put it here" error.
    return found or [ORIGINAL_FILES[0]]


def sam_choices() -> list[str]:
    return [NONE] + _files("sams")


def sam2_choices() -> list[str]:
    return [NONE] + _files("sam2")


def resolve_model(folder: str, name: str, expected: tuple[str, ...]) -> Path:
    """Full path of a model file / HF folder, or an error naming the folders and files expected."""
    for base in _folders(folder):
        p = base / name
        if p.exists():
            return p
    where = ", ".join(str(b) for b in _folders(folder))
    raise FileNotFoundError(
        f"{folder} model {name!r} not found in {where}; expected one of: {', '.join(expected)}"
    )


def bert_folder() -> Path | None:
    """A folder holding bert-base-uncased's vocab.txt (or tokenizer files), if any."""
    for base in _folders("bert-base-uncased"):
        for cand in [base] + (sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []):
            if (cand / "vocab.txt").is_file() or (cand / "tokenizer.json").is_file():
                return cand
    return None


# ---------------------------------------------------------------------------------------------
# Models under ComfyUI's model management
#
# Each mask model is wrapped in ComfyUI's own ModelPatcher and loaded with
# `comfy.model_management.load_models_gpu`, the way ComfyUI loads its own models. So it counts in
# ComfyUI's memory bookkeeping: it is on the GPU for a run and stays there while memory allows;
# ComfyUI moves it off when another model (Mochi) needs the memory, when the user frees memory,
# on its out-of-memory retry, and after every prompt under --disable-smart-memory. Whenever
# ComfyUI unloads it like that, the patcher's own ON_DETACH callback (a per-model hook of
# ModelPatcher, comfy.patcher_extension.CallbacksMP) drops our cache entry, so its RAM goes as
# well and the next run reads the file again. Nothing outside our own objects is patched.


class _ModelWeights(torch.nn.Module):
    """The torch module(s) of one mask model, as a model for ModelPatcher: a plain module whose
    `device` attribute ModelPatcher may set (transformers, segment-anything and sam2 models make
    `device` a read-only property)."""

    def __init__(self, modules: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)


@dataclass
class _Loaded:
    """One cached mask model: the core's wrapper and the ModelPatcher that ComfyUI manages."""

    stamp: tuple  # (file modification time, anything else it was loaded with)
    model: Any  # GroundingDino / SamSegmenter / Sam2Propagator (dreamrelation_core.masks)
    patcher: Any  # comfy.model_patcher.ModelPatcher over the model's torch modules


_CACHE: dict[tuple[str, str], _Loaded] = {}  # (kind, file) -> loaded model
# Patchers of models ComfyUI unloaded, emptied, kept until the next run (see _on_detach).
_RELEASED: list = []
_DETACH_KEY = "dreamrelation_mask_cache"


def _on_detach(patcher, unpatch_all: bool) -> None:
    """ModelPatcher.detach callback. `unpatch_all` is true when ComfyUI unloads the model (its
    weights go to the offload device); false when it only re-registers a model it keeps loaded.

    The unloaded model leaves the cache and its torch modules are let go, so their RAM is freed
    now. The patcher object itself (and the empty module it manages) is kept until our next run:
    ComfyUI is inside its unloading loop here, and the last reference to a managed module dying
    there fires ComfyUI's own clean-up of its loaded-model list in the middle of that loop.
    """
    if not unpatch_all:
        return
    for key in [k for k, v in _CACHE.items() if v.patcher is patcher]:
        del _CACHE[key]
    patcher.model.parts = torch.nn.ModuleList()
    _RELEASED.append(patcher)


def _manage(model) -> Any:
    """A ModelPatcher for a core mask model, loaded on ComfyUI's torch device when used."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.patcher_extension as pe

    modules = [v for v in vars(model).values() if isinstance(v, torch.nn.Module)]
    if not modules:
        raise TypeError(f"{type(model).__name__} holds no torch module for ComfyUI to manage")
    patcher = comfy.model_patcher.ModelPatcher(_ModelWeights(modules), load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.add_callback_with_key(pe.CallbacksMP.ON_DETACH, _DETACH_KEY, _on_detach)
    return patcher


def _cached(kind: str, path: Path, extra: tuple, load) -> _Loaded:
    """The cached model for this file, loaded again when the file (or `extra`) changed."""
    key, stamp = (kind, str(path)), (_stamp(path),) + extra
    entry = _CACHE.get(key)
    if entry is None or entry.stamp != stamp:
        model = load()
        entry = _CACHE[key] = _Loaded(stamp, model, _manage(model))
    return entry


def _stamp(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def get_models(gdino_name: str, sam_name: str, sam2_name: str) -> tuple[_Loaded, _Loaded | None, _Loaded | None]:
    """(detector, sam or None, sam2 or None), read once per file (and file change)."""
    from dreamrelation_core.masks.grounding_dino import ORIGINAL_FILES, load_grounding_dino
    from dreamrelation_core.masks.sam import SAM1_FILES, SAM2_FILES, load_sam1, load_sam2

    _RELEASED.clear()  # outside ComfyUI's unloading now: the emptied patchers may go
    gd_path = resolve_model("grounding-dino", gdino_name, ORIGINAL_FILES + ("<HF folder with config.json>",))
    bert = bert_folder()
    detector = _cached("gdino", gd_path, (str(bert),), lambda: load_grounding_dino(gd_path, bert))
    sam = sam2 = None
    if sam_name != NONE:
        p1 = resolve_model("sams", sam_name, SAM1_FILES)
        sam = _cached("sam", p1, (), lambda: load_sam1(p1))
    if sam2_name != NONE:
        p2 = resolve_model("sam2", sam2_name, SAM2_FILES)
        sam2 = _cached("sam2", p2, (), lambda: load_sam2(p2))
    return detector, sam, sam2


def load_on_device(entries: list[_Loaded]) -> None:
    """Have ComfyUI load the models (freeing other models' memory as it sees fit)."""
    import comfy.model_management as mm

    # Fully: these libraries' layers cannot run with weights left on the offload device.
    mm.load_models_gpu([e.patcher for e in entries], force_full_load=True)
    for e in entries:
        e.model.to(e.patcher.load_device)  # no copy now; the core wrappers note their device


# ---------------------------------------------------------------------------------------------
# Nodes


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
                io.Image.Input("images", tooltip="the video's frames, as a video loader gives them"),
                io.Combo.Input("grounding_dino", options=grounding_dino_choices(), tooltip=(
                    "detector in models/grounding-dino/: groundingdino_swint_ogc.pth (+ .cfg.py), "
                    "groundingdino_swinb_cogcoor.pth, or a Hugging Face folder; an original .pth also needs "
                    "models/bert-base-uncased/vocab.txt")),
                io.Combo.Input("sam", options=sam_choices(), tooltip=(
                    "SAM in models/sams/ (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth): "
                    "masks frame by frame")),
                io.Combo.Input("sam2", options=sam2_choices(), tooltip=(
                    "SAM 2 in models/sam2/ (sam2.1_hiera_*.pt / .safetensors): masks propagated through the clip")),
                io.Combo.Input("mode", options=list(MODES), default="auto", tooltip=(
                    "per_frame: detect + SAM on frames; propagate: detect once + SAM 2 through the clip; auto: "
                    "propagate when SAM 2 is chosen")),
                io.String.Input("prompt1", default="person", tooltip="what subject 1 is (Grounding DINO text prompt)"),
                io.String.Input("prompt2", default="person", tooltip=(
                    "what subject 2 is; when both prompts are equal, 'order' decides which one is subject 1")),
                io.Combo.Input("order", options=list(ORDERS), default="left_first", tooltip=(
                    "with equal prompts: subject 1 is the left one, or the larger one, on the frame where both are "
                    "first found")),
                io.Float.Input("box_threshold", default=0.35, min=0.0, max=1.0, step=0.01,
                               tooltip="minimum detection score of a box"),
                io.Float.Input("text_threshold", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="minimum score of the prompt's words for a box"),
                io.Int.Input("detection_stride", default=6, min=1, max=120, tooltip=(
                    "detect on every k-th frame (boxes carried between); in propagate mode the search step")),
                io.Int.Input("dilation", default=0, min=0, max=64, tooltip="grow masks by this many pixels"),
                io.Int.Input("max_frames_per_batch", default=8, min=1, max=64,
                             tooltip="frames per forward pass (memory vs speed)"),
            ],
            outputs=[
                io.Mask.Output(display_name="subject1"),
                io.Mask.Output(display_name="subject2"),
                io.Mask.Output(display_name="relation"),
                io.Image.Output(display_name="preview"),
                io.String.Output(display_name="notes", tooltip=(
                    "per subject, the frames where its mask is empty, and what else the extractor noticed")),
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
    return (m > 0.5).numpy()


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
                io.Mask.Input("subject1", tooltip="subject 1's mask on every frame"),
                io.Mask.Input("subject2", tooltip="subject 2's mask on every frame (same size and frame count)"),
                io.String.Input("folder", default="dreamrelation/masks", tooltip=(
                    "dataset folder (the video's folder); a relative path is inside ComfyUI's input folder (or its "
                    "output folder where only that one has it)")),
                io.String.Input("name", default="clip", tooltip=(
                    "the video's name without extension: writes <name>.masks.npz or <name>/frame{i}.png")),
                io.Combo.Input("layout", options=list(LAYOUTS), tooltip=(
                    "compact: one exact .masks.npz (overlaps kept); reference: colour PNG per frame as the original "
                    "DreamRelation code reads")),
                io.Boolean.Input("overwrite", default=True, tooltip="replace masks already saved under this name"),
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
                    "a <name>.masks.npz, a folder of frame{i}.png masks, or a video (its masks are found beside it); "
                    "relative paths are looked up in ComfyUI's input, then output folder")),
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
