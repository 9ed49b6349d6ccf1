"""The mask nodes inside the real ComfyUI (in-process, CPU) with tiny models on disk."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamrelation_core.data import mask_files
from fixtures.comfy_nodes import fingerprint, node_classes, run_node
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


@pytest.fixture()
def models(comfyui, pack):
    """The mask models' folders and ComfyUI-managed cache."""
    return pack.nodes.mask_models


@pytest.fixture()
def classes(pack):
    return node_classes(pack)


def test_nodes_are_registered_with_tooltips(comfyui, pack, classes) -> None:
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # else ComfyUI would not call comfy_entrypoint
    assert list(classes) == [  # every family's nodes, in menu order, ids as saved workflows name them
        "DreamRelationSubjectMasks", "DreamRelationSaveMasks", "DreamRelationLoadMasks", "DreamRelationDataset",
        "DreamRelationAddToDataset", "DreamRelationPrepareDataset", "DreamRelationTrain", "DreamRelationRelationLoraLoader",
        "DreamRelationExportRelationLora", "DreamRelationMochiSamplerPatch", "DreamRelationAttentionMaps",
        "DreamRelationQKVAnalysis", "DreamRelationLoraAnalysis", "DreamRelationScoreClip"]
    for key, title in (("DreamRelationSubjectMasks", "DreamRelation Subject Masks"),
                       ("DreamRelationSaveMasks", "DreamRelation Save Masks"),
                       ("DreamRelationLoadMasks", "DreamRelation Load Masks")):
        cls = classes[key]
        assert cls in pack.nodes.masks.NODES
        schema = cls.GET_SCHEMA()
        assert schema.display_name == title and schema.category == "DreamRelation/masks"
        for inp in schema.inputs:
            assert inp.tooltip, f"{key}.{inp.id} has no tooltip"
    import folder_paths

    for name in ("grounding-dino", "sams", "sam2", "bert-base-uncased"):
        assert name in folder_paths.folder_names_and_paths


def test_subject_masks_node_runs_and_masks_round_trip(models_dir: Path, nodes, models, classes) -> None:
    import comfy.model_management as mm

    unload_all = mm.unload_all_models
    gd = write_hf_gdino(models_dir / "grounding-dino" / "gdino-tiny")
    write_sam(models_dir / "sams" / "sam_vit_b_01ec64.pth")
    masks_node = classes["DreamRelationSubjectMasks"]
    spec = masks_node.INPUT_TYPES()["required"]
    assert spec["grounding_dino"][1]["options"] == ["gdino-tiny"] and "sam_vit_b_01ec64.pth" in spec["sam"][1]["options"]
    images = torch.from_numpy(two_subject_clip(4)).float() / 255.0
    args = dict(images=images, grounding_dino=gd.name, sam="sam_vit_b_01ec64.pth", sam2="none", mode="auto",
                prompt1="person", prompt2="person", order="left_first", box_threshold=0.0, text_threshold=0.0,
                detection_stride=2, dilation=0, max_frames_per_batch=4)
    s1, s2, rel, view, notes = run_node(masks_node, **args).outputs
    assert s1.shape == (4, 64, 96) and s1.dtype == torch.float32
    assert "subject 1 ('person'): present on all 4 frames" in notes and "subject 2 ('person')" in notes
    assert torch.equal(rel, torch.maximum(s1, s2))
    assert view.shape == (4, 64, 96, 3) and 0 <= view.min() and view.max() <= 1

    # The models are ComfyUI's to manage: loaded through model_management, kept for the next run ...
    cached = dict(models._CACHE)
    assert {k[0] for k in cached} == {"gdino", "sam"}
    assert all(any(e.patcher is m for m in mm.loaded_models()) for e in cached.values())
    again = run_node(masks_node, **args).outputs
    assert torch.equal(again[0], s1) and all(models._CACHE[k] is cached[k] for k in cached)  # not read again
    # ... until ComfyUI unloads them ("Free model and node cache", OOM retry, memory for another model).
    mm.unload_all_models()
    assert not models._CACHE
    assert not any(e.patcher is m for e in cached.values() for m in mm.loaded_models())
    assert mm.unload_all_models is unload_all  # ComfyUI's own function, not replaced

    saved = run_node(classes["DreamRelationSaveMasks"], subject1=s1, subject2=s2, folder="ds", name="clip",
                     layout=nodes.LAYOUTS[1], overwrite=True)
    path = Path(saved.outputs[0])
    assert saved.ui == {"text": [str(path)]}
    # a new dataset folder goes where exemplar videos are uploaded: ComfyUI's input folder
    assert path == models_dir / "input" / "ds" / "clip" and (path / "frame3.png").is_file()
    load = classes["DreamRelationLoadMasks"]
    l1, l2, lrel = run_node(load, path=str(path)).outputs
    assert torch.equal(l1, s1) and torch.equal(l2, s2 * (1 - s1))  # PNG: overlaps go to subject 1
    assert torch.equal(lrel, rel)
    run_node(classes["DreamRelationSaveMasks"], subject1=s1, subject2=s2, folder="ds", name="clip",
             layout=nodes.LAYOUTS[0], overwrite=True)
    (models_dir / "input" / "ds" / "clip.mp4").write_bytes(b"")
    c1, c2, _ = run_node(load, path=str(models_dir / "input" / "ds" / "clip.mp4")).outputs
    assert torch.equal(c1, s1) and torch.equal(c2, s2)  # compact layout found beside the video, exact


def test_subject_masks_node_with_sam2(models_dir: Path, models, classes) -> None:
    """SAM 2 propagation under ComfyUI's model management (the predictor moved as ComfyUI loads it)."""
    import comfy.model_management as mm

    from fixtures.mask_models import write_sam2_seeing_objects

    gd = write_hf_gdino(models_dir / "grounding-dino" / "gdino-tiny")
    path = models_dir / "sam2" / "sam2.1_hiera_tiny.pt"
    # random SAM 2 weights see no object anywhere, and all-empty masks are an error now
    write_sam2_seeing_objects(path)
    s1, s2, rel, view, _ = run_node(
        classes["DreamRelationSubjectMasks"], images=torch.from_numpy(two_subject_clip(4)).float() / 255.0,
        grounding_dino=gd.name, sam="none", sam2=path.name, mode="auto", prompt1="person", prompt2="person",
        order="left_first", box_threshold=0.0, text_threshold=0.0, detection_stride=2, dilation=0,
        max_frames_per_batch=4).outputs
    assert s1.shape == s2.shape == rel.shape == (4, 64, 96) and view.shape == (4, 64, 96, 3)
    assert {k[0] for k in models._CACHE} == {"gdino", "sam2"}
    mm.unload_all_models()
    assert not models._CACHE


def test_models_reloaded_when_the_file_changes(models_dir: Path, models) -> None:
    import comfy.model_management as mm

    gd = write_hf_gdino(models_dir / "grounding-dino" / "gdino-tiny")
    first, _, _ = models.get_models(gd.name, "none", "none")
    models.load_on_device([first])
    assert models.get_models(gd.name, "none", "none")[0] is first
    first_patcher = weakref.ref(first.patcher)
    del first
    os.utime(gd, (gd.stat().st_atime, gd.stat().st_mtime + 10))
    second, _, _ = models.get_models(gd.name, "none", "none")
    assert list(models._CACHE.values()) == [second]
    gc.collect()
    # the stale model is let go, and ComfyUI's list of loaded models forgets it
    assert first_patcher() is None and None not in mm.loaded_models()
    models.load_on_device([second])
    mm.unload_all_models()
    assert not models._CACHE


def test_relative_paths_look_in_input_then_output(models_dir: Path, monkeypatch, pack, classes) -> None:
    """Save Masks, Load Masks and Dataset resolve a relative name the same way: input folder first."""
    both = np.zeros((2, 8, 8), bool)
    left, right = both.copy(), both.copy()
    left[:, :, :4], right[:, :, 4:] = True, True
    for where, (m1, m2) in (("input", (left, right)), ("output", (right, left))):
        mask_files.save_compact_masks(models_dir / where / "ds" / f"clip{mask_files.COMPACT_SUFFIX}", m1, m2)
    load = classes["DreamRelationLoadMasks"]
    s1, _, _ = run_node(load, path=f"ds/clip{mask_files.COMPACT_SUFFIX}").outputs
    assert torch.equal(s1, torch.from_numpy(left).float())  # input's copy, not output's
    paths = pack.nodes.paths
    assert paths.resolve_dataset_folder("ds") == str(models_dir / "input" / "ds")
    only_out = models_dir / "output" / "made_elsewhere"
    only_out.mkdir()
    assert paths.resolve_dataset_folder("made_elsewhere") == str(only_out)  # output where only it has it
    assert paths.resolve_dataset_folder("new") == str(models_dir / "input" / "new")
    assert paths.resolve_dataset_folder(str(only_out)) == str(only_out)

    # Load Masks runs again when the masks on disk change, not otherwise
    name = f"ds/clip{mask_files.COMPACT_SUFFIX}"
    before = fingerprint(monkeypatch, load, path=name)
    assert fingerprint(monkeypatch, load, path=name) == before
    target = models_dir / "input" / name
    os.utime(target, (target.stat().st_atime, target.stat().st_mtime + 5))
    assert fingerprint(monkeypatch, load, path=name) != before


def test_missing_model_names_folder_and_files(models_dir: Path, nodes, classes) -> None:
    masks_node = classes["DreamRelationSubjectMasks"]
    assert masks_node.INPUT_TYPES()["required"]["grounding_dino"][1]["options"] == ["groundingdino_swint_ogc.pth"]
    images = torch.zeros(2, 16, 16, 3)
    args = dict(images=images, grounding_dino="groundingdino_swint_ogc.pth", sam="sam_vit_h_4b8939.pth", sam2="none",
                mode="auto", prompt1="person", prompt2="person", order="left_first", box_threshold=0.3,
                text_threshold=0.25, detection_stride=6, dilation=0, max_frames_per_batch=8)
    with pytest.raises(FileNotFoundError) as e:
        run_node(masks_node, **args)
    assert str(models_dir / "grounding-dino") in str(e.value) and "groundingdino_swinb_cogcoor.pth" in str(e.value)
    with pytest.raises(ValueError, match="choose a SAM model"):
        run_node(masks_node, **{**args, "grounding_dino": "x", "sam": "none"})
    with pytest.raises(ValueError, match="subject1 is"):
        run_node(classes["DreamRelationSaveMasks"], subject1=torch.zeros(2, 4, 4), subject2=torch.zeros(3, 4, 4),
                 folder="d", name="n", layout=nodes.LAYOUTS[0], overwrite=True)
    with pytest.raises(FileNotFoundError, match=r"masks 'nowhere' not found \(looked at .*input.*output"):
        run_node(classes["DreamRelationLoadMasks"], path="nowhere")


def test_add_to_dataset_node(models_dir: Path, classes) -> None:
    """IMAGE + two MASKs + caption -> an exemplar in input/<dataset>/ the Dataset node accepts; added once."""
    from dreamrelation_core.data.synthetic import synthetic_clip
    from dreamrelation_core.errors import DatasetError

    frames, m1, m2 = synthetic_clip(7, (32, 48))
    add = classes["DreamRelationAddToDataset"]
    args = dict(images=torch.from_numpy(frames).float() / 255.0, subject1_mask=torch.from_numpy(m1).float(),
                subject2_mask=torch.from_numpy(m2).float(), caption="a square meets a disc",
                dataset="rel/shake", clip_name="")
    ran = run_node(add, **args)
    name, report = ran.outputs
    assert name == "rel/shake" and "added" in report and ran.ui == {"text": [report]}
    folder = models_dir / "input" / "rel" / "shake"
    spec = run_node(classes["DreamRelationDataset"], folder=name, frames=7, height=32, width=48).outputs[0]
    assert len(spec.entries) == 1 and spec.entries[0].caption == "a square meets a disc"
    assert (spec.entries[0].video / "frame0006.png").is_file() and spec.folder == folder
    again = run_node(add, **args).outputs[1]
    assert "already in the dataset" in again and len(list(folder.glob("*.txt"))) == 1
    with pytest.raises(DatasetError, match="nearest valid lengths are 7 and 13"):
        run_node(add, **{**args, "images": args["images"][:6], "subject1_mask": args["subject1_mask"][:6],
                         "subject2_mask": args["subject2_mask"][:6]})
    # the one mask rule: > 0.5 is the subject, NaN / out-of-range values are refused naming the input
    soft = args["subject1_mask"] * 0.9 + 0.4 * (1 - args["subject1_mask"])  # 0.4 background, 0.9 subject
    assert "already in the dataset" in run_node(add, **{**args, "subject1_mask": soft}).outputs[1]
    nan = args["subject2_mask"].clone()
    nan[3, 5, 7] = float("nan")
    with pytest.raises(DatasetError, match=r"the subject2_mask input: mask array 'subject2_mask' .* holds nan at "
                                           r"\[3, 5, 7\]"):
        run_node(add, **{**args, "subject2_mask": nan, "clip_name": "other"})
    assert len(list(folder.glob("*.txt"))) == 1
