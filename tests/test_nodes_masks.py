"""The mask nodes inside the real ComfyUI (in-process, CPU) with tiny models on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.mask_models import two_subject_clip, write_hf_gdino, write_sam


@pytest.fixture()
def models_dir(comfyui, tmp_path: Path, monkeypatch):
    import folder_paths

    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    for name in ("grounding-dino", "sams", "sam2", "bert-base-uncased"):
        folder_paths.folder_names_and_paths[name] = ([str(tmp_path / name)], {".pth", ".pt", ".safetensors"})
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    yield tmp_path
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


@pytest.fixture()
def nodes(comfyui, pack):
    return pack.nodes.masks


def test_nodes_are_registered_with_tooltips(comfyui, pack) -> None:
    m = pack.nodes.masks
    for key, title in (("DreamRelationSubjectMasks", "DreamRelation Subject Masks"),
                       ("DreamRelationSaveMasks", "DreamRelation Save Masks"),
                       ("DreamRelationLoadMasks", "DreamRelation Load Masks")):
        assert pack.NODE_CLASS_MAPPINGS[key] is m.NODE_CLASS_MAPPINGS[key]
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[key] == title
        cls = m.NODE_CLASS_MAPPINGS[key]
        assert cls.CATEGORY == "DreamRelation/masks"
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{key}.{name} has no tooltip"
    import folder_paths

    for name in ("grounding-dino", "sams", "sam2", "bert-base-uncased"):
        assert name in folder_paths.folder_names_and_paths


def test_subject_masks_node_runs_and_masks_round_trip(models_dir: Path, nodes) -> None:
    import comfy.model_management as mm

    gd = write_hf_gdino(models_dir / "grounding-dino" / "gdino-tiny")
    write_sam(models_dir / "sams" / "sam_vit_b_01ec64.pth")
    node = nodes.DreamRelationSubjectMasks()
    spec = node.INPUT_TYPES()["required"]
    assert spec["grounding_dino"][0] == ["gdino-tiny"] and "sam_vit_b_01ec64.pth" in spec["sam"][0]
    images = torch.from_numpy(two_subject_clip(4)).float() / 255.0
    s1, s2, rel, view = node.run(images, gd.name, "sam_vit_b_01ec64.pth", "none", "auto", "person", "person",
                                 "left_first", 0.0, 0.0, 2, 0, 4)
    assert s1.shape == (4, 64, 96) and s1.dtype == torch.float32
    assert torch.equal(rel, torch.maximum(s1, s2))
    assert view.shape == (4, 64, 96, 3) and 0 <= view.min() and view.max() <= 1
    assert nodes._CACHE  # models kept for the next run ...
    mm.unload_all_models()
    assert not nodes._CACHE  # ... until ComfyUI frees its models

    saved = nodes.DreamRelationSaveMasks().save(s1, s2, "ds", "clip", nodes.LAYOUTS[1], True)
    path = Path(saved["result"][0])
    # a new dataset folder goes where exemplar videos are uploaded: ComfyUI's input folder
    assert path == models_dir / "input" / "ds" / "clip" and (path / "frame3.png").is_file()
    l1, l2, lrel = nodes.DreamRelationLoadMasks().load(str(path))
    assert torch.equal(l1, s1) and torch.equal(l2, s2 * (1 - s1))  # PNG: overlaps go to subject 1
    assert torch.equal(lrel, rel)
    nodes.DreamRelationSaveMasks().save(s1, s2, "ds", "clip", nodes.LAYOUTS[0], True)
    (models_dir / "input" / "ds" / "clip.mp4").write_bytes(b"")
    c1, c2, _ = nodes.DreamRelationLoadMasks().load(str(models_dir / "input" / "ds" / "clip.mp4"))
    assert torch.equal(c1, s1) and torch.equal(c2, s2)  # compact layout found beside the video, exact


def test_missing_model_names_folder_and_files(models_dir: Path, nodes) -> None:
    node = nodes.DreamRelationSubjectMasks()
    assert node.INPUT_TYPES()["required"]["grounding_dino"][0] == ["groundingdino_swint_ogc.pth"]
    images = torch.zeros(2, 16, 16, 3)
    with pytest.raises(FileNotFoundError) as e:
        node.run(images, "groundingdino_swint_ogc.pth", "sam_vit_h_4b8939.pth", "none", "auto", "person",
                 "person", "left_first", 0.3, 0.25, 6, 0, 8)
    assert str(models_dir / "grounding-dino") in str(e.value) and "groundingdino_swinb_cogcoor.pth" in str(e.value)
    with pytest.raises(ValueError, match="choose a SAM model"):
        node.run(images, "x", "none", "none", "auto", "person", "person", "left_first", 0.3, 0.25, 6, 0, 8)
    with pytest.raises(ValueError, match="subject1 is"):
        nodes.DreamRelationSaveMasks().save(torch.zeros(2, 4, 4), torch.zeros(3, 4, 4), "d", "n", nodes.LAYOUTS[0], True)
