"""Shared fixtures: the pack loaded as ComfyUI loads it, the real ComfyUI in-process, tiny models.

ComfyUI is found through COMFYUI_DIR, or because this pack sits in ComfyUI/custom_nodes/.
Tests that need it take the `comfyui` fixture and skip, with the reason, where it is absent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "dreamrelation_pack"


def find_comfyui() -> Path | None:
    env = os.environ.get("COMFYUI_DIR")
    if env and (Path(env) / "comfy").is_dir():
        return Path(env)
    # pack installed as ComfyUI/custom_nodes/<pack>
    cand = ROOT.parent.parent
    if ROOT.parent.name == "custom_nodes" and (cand / "comfy").is_dir():
        return cand
    return None


def import_comfyui() -> Path:
    """Put ComfyUI first on sys.path and force CPU before `comfy.model_management` loads."""
    path = find_comfyui()
    if path is None:
        pytest.skip("ComfyUI not found: set COMFYUI_DIR or install the pack in ComfyUI/custom_nodes")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    # A top-level `nodes` / `utils` imported before would shadow ComfyUI's own modules.
    for name in ("nodes", "utils"):
        mod = sys.modules.get(name)
        if mod is not None and not str(getattr(mod, "__file__", "") or "").startswith(str(path)):
            del sys.modules[name]
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401

    return path


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """The real ComfyUI, importable in this process (CPU). Skips with a reason where absent."""
    return import_comfyui()


def load_pack():
    """Import the repository as ComfyUI does: a package named after its folder, via __init__.py."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------
# The real ComfyUI server (tests/_e2e_server.py): one per test session, started on first use.


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyUI (CPU, `python -O`) with the pack and the tiny test loaders installed:
    an `_e2e_server.ComfyServer` (url, base folder, queue/wait/run/interrupt/cancel/watch/to_api).
    Skips without ComfyUI; fails instead in CI."""
    from _e2e_server import missing, start_server

    comfy = find_comfyui()
    if comfy is None:
        missing("ComfyUI not found: set COMFYUI_DIR")
    with start_server(tmp_path_factory.mktemp("comfy_server"), comfy) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_models(comfy_server):
    """Tiny DiT / T5 / VAE / LoRA / mask model files in the server's model folders
    (`_e2e_models.TinyModels`: their names)."""
    from _e2e_models import write_tiny_models

    return write_tiny_models(comfy_server.base / "models")
