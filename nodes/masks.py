"""DreamRelation mask nodes: subject masks from a video (Grounding DINO + SAM / SAM 2), save, load.

Models come from the folders ComfyUI users already have (registered here where missing):
`models/grounding-dino/` (original .pth [+ .cfg.py] or Hugging Face folders), `models/sams/`,
`models/sam2/`, and `models/bert-base-uncased/` (vocab.txt, for original .pth detectors).
Loaded models are cached between runs (parked on ComfyUI's offload device) and dropped when
ComfyUI unloads all models ("Free model and node cache", or its out-of-memory retry).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from dreamrelation_core.data import mask_files as mask_io

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
# Model cache, released with ComfyUI's models


_CACHE: dict[tuple, object] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _hook_unload() -> None:
    """Clear our cache whenever ComfyUI unloads all models (the API and UI 'free memory', OOM retry)."""
    import comfy.model_management as mm

    original = mm.unload_all_models
    if getattr(original, "_dreamrelation_hooked", False):
        return

    def unload_all_models(*args, **kwargs):
        clear_cache()
        return original(*args, **kwargs)

    unload_all_models._dreamrelation_hooked = True  # type: ignore[attr-defined]
    mm.unload_all_models = unload_all_models


def _cached(key: tuple, load):
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def _stamp(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def get_models(gdino_name: str, sam_name: str, sam2_name: str):
    """(detector, sam or None, sam2 or None), loaded once per file (and file change)."""
    from dreamrelation_core.masks.grounding_dino import ORIGINAL_FILES, load_grounding_dino
    from dreamrelation_core.masks.sam import SAM1_FILES, SAM2_FILES, load_sam1, load_sam2

    _hook_unload()
    gd_path = resolve_model("grounding-dino", gdino_name, ORIGINAL_FILES + ("<HF folder with config.json>",))
    bert = bert_folder()
    detector = _cached(("gdino", str(gd_path), _stamp(gd_path), str(bert)),
                       lambda: load_grounding_dino(gd_path, bert))
    sam = sam2 = None
    if sam_name != NONE:
        p = resolve_model("sams", sam_name, SAM1_FILES)
        sam = _cached(("sam", str(p), _stamp(p)), lambda: load_sam1(p))
    if sam2_name != NONE:
        p = resolve_model("sam2", sam2_name, SAM2_FILES)
        sam2 = _cached(("sam2", str(p), _stamp(p)), lambda: load_sam2(p))
    return detector, sam, sam2


# ---------------------------------------------------------------------------------------------
# Nodes


def _tensor_masks(m: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(m)).float()


class DreamRelationSubjectMasks:
    @classmethod
    def INPUT_TYPES(cls):
        from dreamrelation_core.masks.extractor import MODES
        from dreamrelation_core.masks.tracking import ORDERS

        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "the video's frames, as a video loader gives them"}),
                "grounding_dino": (grounding_dino_choices(), {
                    "tooltip": "detector in models/grounding-dino/: groundingdino_swint_ogc.pth (+ .cfg.py), "
                               "groundingdino_swinb_cogcoor.pth, or a Hugging Face folder; an original .pth "
                               "also needs models/bert-base-uncased/vocab.txt"}),
                "sam": (sam_choices(), {"tooltip": "SAM in models/sams/ (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, "
                                                   "sam_vit_b_01ec64.pth): masks frame by frame"}),
                "sam2": (sam2_choices(), {"tooltip": "SAM 2 in models/sam2/ (sam2.1_hiera_*.pt / .safetensors): "
                                                     "masks propagated through the clip"}),
                "mode": (list(MODES), {"default": "auto", "tooltip": "per_frame: detect + SAM on frames; propagate: "
                                       "detect once + SAM 2 through the clip; auto: propagate when SAM 2 is chosen"}),
                "prompt1": ("STRING", {"default": "person", "tooltip": "what subject 1 is (Grounding DINO text prompt)"}),
                "prompt2": ("STRING", {"default": "person", "tooltip": "what subject 2 is; when both prompts are "
                                       "equal, 'order' decides which one is subject 1"}),
                "order": (list(ORDERS), {"default": "left_first", "tooltip": "with equal prompts: subject 1 is the "
                                         "left one, or the larger one, on the frame where both are first found"}),
                "box_threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "minimum detection score of a box"}),
                "text_threshold": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "minimum score of the prompt's words for a box"}),
                "detection_stride": ("INT", {"default": 6, "min": 1, "max": 120, "tooltip": "detect on every k-th "
                                             "frame (boxes carried between); in propagate mode the search step"}),
                "dilation": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "grow masks by this many pixels"}),
                "max_frames_per_batch": ("INT", {"default": 8, "min": 1, "max": 64,
                                                 "tooltip": "frames per forward pass (memory vs speed)"}),
            }
        }

    RETURN_TYPES = ("MASK", "MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("subject1", "subject2", "relation", "preview")
    FUNCTION = "run"
    CATEGORY = "DreamRelation/masks"
    DESCRIPTION = ("Masks of the two subjects on every frame (Grounding DINO boxes, SAM / SAM 2 masks), identity "
                   "kept across frames; relation = their union. The preview tints subject 1 orange, subject 2 blue.")

    def run(self, images: torch.Tensor, grounding_dino: str, sam: str, sam2: str, mode: str, prompt1: str,
            prompt2: str, order: str, box_threshold: float, text_threshold: float, detection_stride: int,
            dilation: int, max_frames_per_batch: int):
        import comfy.model_management as mm
        import comfy.utils

        from dreamrelation_core.masks.extractor import SubjectMaskExtractor, SubjectMaskOptions, as_uint8_frames
        from dreamrelation_core.masks.preview import preview

        frames = as_uint8_frames(images)
        if sam == NONE and sam2 == NONE:
            raise ValueError("choose a SAM model (models/sams/) or a SAM 2 model (models/sam2/)")
        detector, sam_m, sam2_m = get_models(grounding_dino, sam, sam2)
        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        parts = [m for m in (detector, sam_m, sam2_m) if m is not None]
        opt = SubjectMaskOptions(
            prompt1=prompt1, prompt2=prompt2, mode=mode, order=order, box_threshold=box_threshold,
            text_threshold=text_threshold, detection_stride=detection_stride, dilation=dilation,
            max_frames_per_batch=max_frames_per_batch,
        )
        bar = comfy.utils.ProgressBar(len(frames))

        def cancel() -> bool:
            mm.throw_exception_if_processing_interrupted()  # raises when the user pressed cancel
            return False

        try:
            for m in parts:
                m.to(device)
            result = SubjectMaskExtractor(detector, sam_m, sam2_m).run(
                frames, opt, progress=lambda d, t: bar.update_absolute(d, t), cancel=cancel
            )
        finally:
            # Park the models off the GPU between runs so Mochi gets its memory back.
            for m in parts:
                m.to(offload)
            mm.soft_empty_cache()
        for note in result.notes:
            log.info("DreamRelation Subject Masks: %s", note)
        view = torch.from_numpy(preview(frames, result)).float() / 255.0
        return (_tensor_masks(result.subject1), _tensor_masks(result.subject2), _tensor_masks(result.relation), view)


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


def _resolve_out(folder: str) -> Path:
    from .paths import resolve_dataset_folder

    return Path(resolve_dataset_folder(folder))


class DreamRelationSaveMasks:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subject1": ("MASK", {"tooltip": "subject 1's mask on every frame"}),
                "subject2": ("MASK", {"tooltip": "subject 2's mask on every frame (same size and frame count)"}),
                "folder": ("STRING", {"default": "dreamrelation/masks", "tooltip": "dataset folder (the video's "
                                      "folder); a relative path is inside ComfyUI's input folder (or its output "
                                      "folder where only that one has it)"}),
                "name": ("STRING", {"default": "clip", "tooltip": "the video's name without extension: "
                                    "writes <name>.masks.npz or <name>/frame{i}.png"}),
                "layout": (list(LAYOUTS), {"tooltip": "compact: one exact .masks.npz (overlaps kept); reference: "
                                           "colour PNG per frame as the original DreamRelation code reads"}),
                "overwrite": ("BOOLEAN", {"default": True, "tooltip": "replace masks already saved under this name"}),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "DreamRelation/masks"
    DESCRIPTION = "Write two subjects' masks in a layout the DreamRelation dataset reader (and trainer) reads."

    def save(self, subject1: torch.Tensor, subject2: torch.Tensor, folder: str, name: str, layout: str,
             overwrite: bool):
        name = name.strip()
        if not name or "/" in name or "\\" in name:
            raise ValueError(f"name must be a plain file name without folders, got {name!r}")
        m1, m2 = _stack(subject1, "subject1"), _stack(subject2, "subject2")
        if m1.shape != m2.shape:
            raise ValueError(f"subject1 is {m1.shape} but subject2 is {m2.shape}: both need the same frames and size")
        out = _resolve_out(folder)
        target = out / name if layout == LAYOUTS[1] else out / f"{name}{mask_io.COMPACT_SUFFIX}"
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; switch 'overwrite' on to replace it")
        if layout == LAYOUTS[1]:
            path = mask_io.save_reference_masks(target, m1, m2)
        else:
            path = mask_io.save_compact_masks(target, m1, m2)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


class DreamRelationLoadMasks:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "path": ("STRING", {"default": "", "tooltip": "a <name>.masks.npz, a folder of frame{i}.png masks, "
                                    "or a video (its masks are found beside it); relative paths are looked up in "
                                    "ComfyUI's output, then input folder"}),
            }
        }

    RETURN_TYPES = ("MASK", "MASK", "MASK")
    RETURN_NAMES = ("subject1", "subject2", "relation")
    FUNCTION = "load"
    CATEGORY = "DreamRelation/masks"
    DESCRIPTION = "Read two subjects' masks saved in the compact or the reference PNG layout."

    @staticmethod
    def _find(path: str) -> Path:
        import folder_paths

        raw = Path(path.strip()).expanduser()
        cands = [raw] if raw.is_absolute() else [
            Path(folder_paths.get_output_directory()) / raw, Path(folder_paths.get_input_directory()) / raw]
        for p in cands:
            if not p.exists():
                continue
            if (p.is_file() and p.name.endswith(mask_io.COMPACT_SUFFIX)) or (p.is_dir() and _has_frame_pngs(p)):
                return p
            found = mask_io.find_masks(p)  # a video file or frame folder: its masks beside / inside it
            if found is None:
                stem = p.name if p.is_dir() else p.stem
                raise FileNotFoundError(f"{p}: no masks for it ({stem}{mask_io.COMPACT_SUFFIX} or "
                                        f"{stem}/frame{{i}}.png beside it)")
            return found
        raise FileNotFoundError(f"masks {path!r} not found (looked at {', '.join(str(c) for c in cands)})")

    @classmethod
    def IS_CHANGED(cls, path: str):
        try:
            p = cls._find(path)
        except FileNotFoundError:
            return float("nan")
        return max([p.stat().st_mtime] + ([f.stat().st_mtime for f in p.iterdir()] if p.is_dir() else []))

    def load(self, path: str):
        m1, m2 = mask_io.load_masks(self._find(path))
        return _tensor_masks(m1), _tensor_masks(m2), _tensor_masks(m1 | m2)


NODE_CLASS_MAPPINGS = {
    "DreamRelationSubjectMasks": DreamRelationSubjectMasks,
    "DreamRelationSaveMasks": DreamRelationSaveMasks,
    "DreamRelationLoadMasks": DreamRelationLoadMasks,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamRelationSubjectMasks": "DreamRelation Subject Masks",
    "DreamRelationSaveMasks": "DreamRelation Save Masks",
    "DreamRelationLoadMasks": "DreamRelation Load Masks",
}
