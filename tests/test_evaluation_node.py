"""The Score Clip node (V3 schema) inside the real ComfyUI (in-process, CPU) with tiny local models."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from dreamrelation_core.data.synthetic import write_video
from fixtures.comfyui import PACK_NAME
from fixtures.eval_models import moving_square, save_clip_file, save_clip_folder, save_tiny_qwen2vl


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("comfy_models")
    clip = save_clip_folder(root / "clip_vision" / "tiny-clip")
    save_clip_file(root / "clip_vision" / "tiny_clip_vision.safetensors", clip, vision_only=True)
    save_tiny_qwen2vl(root / "vlm" / "tiny-judge", " Yes")
    return root


@pytest.fixture()
def node(comfyui, pack, model_root, tmp_path, monkeypatch):
    import folder_paths

    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    folder_paths.folder_names_and_paths["clip_vision"] = ([str(model_root / "clip_vision")], {".safetensors"})
    folder_paths.folder_names_and_paths["vlm"] = ([str(model_root / "vlm")], {".json"})
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    yield importlib.import_module(f"{PACK_NAME}.nodes.evaluation")
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


def _images(n: int = 6) -> torch.Tensor:
    return torch.from_numpy(moving_square(n)).float() / 255.0


def test_schema_lists_local_models_and_validates(node) -> None:
    assert node.NODES == [node.ScoreClip]
    schema = node.ScoreClip.define_schema()
    schema.validate()
    inputs = {i.id: i for i in schema.inputs}
    assert inputs["clip_model"].options == ["none", "tiny_clip_vision.safetensors", "tiny-clip"]
    assert inputs["judge_model"].options == ["none", "tiny-judge"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    info = node.ScoreClip.GET_NODE_INFO_V1()
    assert info["category"] == "DreamRelation/evaluation" and info["output_node"] is True
    assert info["output"] == ["FLOAT", "FLOAT", "BOOLEAN", "FLOAT", "STRING"]


def test_score_clip_with_hf_clip_judge_and_exemplars(node, tmp_path) -> None:
    write_video(tmp_path / "input" / "exemplars" / "ex0", moving_square(8), "png")
    out = node.ScoreClip.execute(_images(), "a red square moves right", "tiny-clip", True, "tiny-judge",
                                 "a red square", "passing", "a wall", 4, "exemplars")
    clip_t, tc, yes, leak, report = out.args
    assert -1 <= clip_t <= 1 and -1 <= tc <= 1 and yes is True
    assert leak == pytest.approx(1.0, abs=1e-4)  # the clip's frames are the exemplar's
    assert "CLIP-T" in report and "judge: Does this video show a red square passing a wall?" in report
    assert out.ui.as_dict() == {"text": (report,)}


def test_clip_vision_file_needs_clip_t_off(node) -> None:
    from dreamrelation_core.errors import ModelFileError

    with pytest.raises(ModelFileError, match="image tower only.*turn compute_clip_t off"):
        node.ScoreClip.execute(_images(), "a red square", "tiny_clip_vision.safetensors", True, "none", "", "", "", 8, "")
    clip_t, tc, yes, leak, report = node.ScoreClip.execute(
        _images(), "", "tiny_clip_vision.safetensors", False, "none", "", "", "", 8, "").args
    assert math.isnan(clip_t) and -1 <= tc <= 1 and yes is False and math.isnan(leak)
    assert "temporal consistency" in report and "CLIP-T" not in report


def test_full_clip_file_uses_comfyui_tokenizer(node, comfyui, model_root) -> None:
    """A single CLIP file with a text tower in clip_vision: the node tokenizes with ComfyUI's CLIP BPE."""
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    from fixtures.eval_models import tiny_clip

    tok = CLIPTokenizer.from_pretrained(str(Path(comfyui) / "comfy" / "sd1_tokenizer"))
    model = tiny_clip(tok, seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")},
              str(model_root / "clip_vision" / "full_clip.safetensors"))
    import folder_paths

    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    prompt = "a red square moves right"
    clip_t = node.ScoreClip.execute(_images(), prompt, "full_clip.safetensors", True, "none", "", "", "", 8, "").args[0]
    # the same numbers straight from transformers
    from transformers import CLIPImageProcessor

    px = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=list(moving_square(6)), return_tensors="pt")["pixel_values"]
    ids = tok([prompt], padding=True, return_tensors="pt")
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
        txt = torch.nn.functional.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
    assert clip_t == pytest.approx(float((img @ txt[0]).mean()), abs=1e-5)
