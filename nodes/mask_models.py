"""The mask models of the mask nodes: their folders, and the loaded models kept under ComfyUI's
model management.

Models come from the folders ComfyUI users already have (registered here where missing):
`models/grounding-dino/` (original .pth [+ .cfg.py] or Hugging Face folders), `models/sams/`,
`models/sam2/`, and `models/bert-base-uncased/` (vocab.txt, for original .pth detectors).
Loaded models are kept between runs under ComfyUI's model management (see "Models under
ComfyUI's model management" below) and dropped when ComfyUI unloads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODEL_FOLDERS = {
    "grounding-dino": {".pth", ".pt", ".safetensors"},
    "sams": {".pth", ".pt", ".safetensors"},
    "sam2": {".pt", ".pth", ".safetensors"},
    "bert-base-uncased": {".txt", ".json"},
}
NONE = "none"  # the choice for "no SAM" / "no SAM 2"


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
