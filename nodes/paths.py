"""Where the nodes look for dataset files and folders typed as text (shared by the dataset and mask nodes).

One lookup order for every node: an absolute path as given; a relative one in ComfyUI's input
folder first, then its output folder. Input comes first because that is where a dataset lives:
exemplar videos are uploaded there (Load Video's upload button), Save Masks writes a new dataset
folder there, and the Dataset node reads it from there. The output folder is only a fallback for
folders other nodes wrote. With one order, a name that exists in both folders means the same
folder to Save Masks, Load Masks and Dataset.
"""

from __future__ import annotations

import os
from pathlib import Path


def dataset_path_candidates(path: str) -> list[Path]:
    """The places a typed path may mean, in lookup order (one place for an absolute path)."""
    raw = Path(os.path.expanduser(path.strip()))
    if raw.is_absolute():
        return [raw]
    import folder_paths

    return [Path(folder_paths.get_input_directory()) / raw, Path(folder_paths.get_output_directory()) / raw]


def resolve_dataset_path(path: str) -> Path:
    """The first candidate that exists; for a path that exists nowhere, the input folder's
    candidate (a new dataset folder goes where exemplar videos are uploaded, and errors name it)."""
    candidates = dataset_path_candidates(path)
    for cand in candidates:
        if cand.exists():
            return cand
    return candidates[0]


def resolve_dataset_folder(folder: str) -> str:
    """`resolve_dataset_path` as text; an empty input stays empty (the caller's error names it)."""
    if not folder.strip():
        return ""
    return str(resolve_dataset_path(folder))
