"""The analysis nodes (V3 schema) inside the real ComfyUI (in-process, CPU) on tiny model files."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from dreamrelation_core.lora.files import save_triplet
from fixtures.analysis_models import tiny_mochi_state, write_genmo
from fixtures.comfy_nodes import fingerprint, run_node
from fixtures.loras import random_lora_set


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("comfy_models")
    (root / "diffusion_models").mkdir()
    write_genmo(root / "diffusion_models" / "mochi_tiny_bf16.safetensors", tiny_mochi_state(num_layers=2))
    (root / "loras").mkdir()
    save_triplet(root / "loras" / "handshake.safetensors", random_lora_set(2, 64, 64, rank=4, gain=0.1))
    return root


@pytest.fixture()
def node(comfyui, pack, model_root, tmp_path, monkeypatch):
    import folder_paths

    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    for name in ("diffusion_models", "loras"):
        folder_paths.folder_names_and_paths[name] = ([str(model_root / name)], {".safetensors"})
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    yield importlib.import_module(f"{pack.__name__}.nodes.analysis")
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


def test_schemas_list_local_files_and_validate(node) -> None:
    assert node.NODES == [node.DreamRelationQKVAnalysis, node.DreamRelationLoraAnalysis]
    for cls in node.NODES:
        schema = cls.define_schema()
        schema.validate()
        assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
        info = cls.GET_NODE_INFO_V1()
        assert info["category"] == "DreamRelation/analysis" and info["output_node"] is True
        assert info["output"] == ["IMAGE", "STRING"]
    inputs = {i.id: i for i in node.DreamRelationQKVAnalysis.define_schema().inputs}
    assert inputs["model_name"].options == ["mochi_tiny_bf16.safetensors"]


def test_qkv_node_shows_heat_map_and_saves_report(node, tmp_path: Path, monkeypatch) -> None:
    inputs = dict(model_name="mochi_tiny_bf16.safetensors", rank=8, side="left", save_report=True)
    ran = run_node(node.DreamRelationQKVAnalysis, **inputs)  # through ComfyUI's executor
    image, summary = ran.outputs
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert image.shape[1] > 300 and image.shape[2] > 600  # a readable picture
    assert "visual: 3 layers" not in summary and "visual: 2 layers" in summary and "q-k 1.00" in summary
    report = tmp_path / "output" / "dreamrelation_analysis" / "mochi_tiny_bf16"
    js = json.loads((report / "qkv_similarity.json").read_text())
    assert js["phi"]["text"]["q-k"] == pytest.approx(1.0, abs=0.02)
    shown = ran.ui["images"]
    assert len(shown) == 1 and shown[0]["type"] == "temp"
    assert (tmp_path / "temp" / shown[0]["subfolder"] / shown[0]["filename"]).is_file()
    # a changed file runs the node again
    before = fingerprint(monkeypatch, node.DreamRelationQKVAnalysis, **inputs)
    model = node_model_path(tmp_path)
    import os

    os.utime(model, (model.stat().st_atime, model.stat().st_mtime + 10))
    assert fingerprint(monkeypatch, node.DreamRelationQKVAnalysis, **inputs) != before


def test_lora_node_picture_without_saving(node, tmp_path: Path) -> None:
    image, summary = run_node(node.DreamRelationLoraAnalysis, lora_name="handshake.safetensors",
                              model_name="mochi_tiny_bf16.safetensors", rank=8, side="left", save_report=False).outputs
    assert image.shape[0] == 1 and image.shape[-1] == 3
    for adapter in ("relation", "subject1", "subject2", "ffn"):
        assert f"\n{adapter}: " in summary
    assert not (tmp_path / "output" / "dreamrelation_analysis").exists()


def node_model_path(tmp_path: Path) -> Path:
    import folder_paths

    return Path(folder_paths.get_full_path("diffusion_models", "mochi_tiny_bf16.safetensors"))


def test_missing_model_is_named(node) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        node.DreamRelationQKVAnalysis.execute("nothere.safetensors", 8, "left", False)
