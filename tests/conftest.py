"""Shared fixtures: the pack loaded as ComfyUI loads it, the real ComfyUI in-process (fixtures.comfyui).

ComfyUI is found through COMFYUI_DIR, or because this pack sits in ComfyUI/custom_nodes/.
Tests that need it take the `comfyui` fixture and skip, with the reason, where it is absent
(and fail where CI is set: CI installs ComfyUI, so its tests must run there).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fixtures.comfyui import PACK_NAME, ROOT, ComfyUINotFound, find_comfyui, load_pack  # noqa: F401 (re-exported)
from fixtures.comfyui import import_comfyui as _import_comfyui


def import_comfyui() -> Path:
    """The real ComfyUI on CPU (fixtures.comfyui); skips the test, with the reason, where it is absent
    (in CI, which installs ComfyUI, its tests must run: there it fails instead)."""
    try:
        return _import_comfyui()
    except ComfyUINotFound as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the ComfyUI tests: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """The real ComfyUI, importable in this process (CPU). Skips with a reason where absent."""
    return import_comfyui()


@pytest.fixture(scope="session")
def pack(comfyui):
    """The pack as ComfyUI imports it (its nodes use ComfyUI's API, so ComfyUI comes first)."""
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


@pytest.fixture(scope="session")
def tiny_wan_models(comfy_server):
    """Tiny Wan DiT (two experts) / umT5 / VAE / relation LoRA (ours and its ComfyUI export) in the
    server's model folders (`_e2e_models.TinyWanModels`: their names)."""
    from _e2e_models import write_tiny_wan_models

    return write_tiny_wan_models(comfy_server.base / "models")
