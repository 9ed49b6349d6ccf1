"""Where the nodes look for dataset folders typed as text (shared by the dataset and mask nodes)."""

from __future__ import annotations

import os


def resolve_dataset_folder(folder: str) -> str:
    """An absolute folder as given; a relative one inside ComfyUI's input folder, or its output
    folder where only that one has it. A folder that exists nowhere resolves inside the input
    folder, where exemplar videos are uploaded (errors then name that path)."""
    folder = os.path.expanduser(folder.strip())
    if not folder or os.path.isabs(folder):
        return folder
    import folder_paths

    for base in (folder_paths.get_input_directory(), folder_paths.get_output_directory()):
        cand = os.path.join(base, folder)
        if os.path.isdir(cand):
            return cand
    return os.path.join(folder_paths.get_input_directory(), folder)
