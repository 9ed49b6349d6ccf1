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
