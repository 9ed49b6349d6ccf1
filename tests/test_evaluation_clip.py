"""CLIP-T, temporal consistency and appearance leakage on a tiny random CLIP, loaded the ways users
have CLIP: a Hugging Face folder, a full .safetensors, a ComfyUI-style image-tower-only file and an
open_clip state dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreamrelation_core.errors import DreamRelationError, EvaluationError, ModelFileError, ModelFileNotFoundError
from dreamrelation_core.evaluation.clip_metrics import (
    clip_t,
    clip_t_score,
    load_clip,
    temporal_consistency,
    temporal_consistency_score,
)
from dreamrelation_core.evaluation.leakage import exemplar_features, leakage, leakage_scores
from fixtures.eval_models import moving_square, save_clip_file, save_clip_folder, to_open_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def enc(clip_dir):
    return load_clip(clip_dir)


def test_folder_clip_features_shapes_norms_and_processor_geometry(enc) -> None:
    frames = moving_square(5)
    f = enc.image_features(frames)
    assert f.shape == (5, 32) and f.dtype == torch.float32
    assert torch.allclose(f.norm(dim=-1), torch.ones(5), atol=1e-5)
    t = enc.text_features(["a red square moves right", "a bear hugs a raccoon"])
    assert t.shape == (2, 32) and not torch.allclose(t[0], t[1])
    # resize shortest side to 32, centre crop: a 32x48 frame keeps only its middle 32 columns
    core = np.random.default_rng(1).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    wide = np.random.default_rng(2).integers(0, 255, (1, 32, 48, 3), dtype=np.uint8)
    wide[:, :, 8:40] = core
    assert torch.allclose(enc.image_features(wide), enc.image_features(core), atol=1e-5)
    wide[:, :, :8] = 0  # only the cropped-away margin changes
    assert torch.allclose(enc.image_features(wide), enc.image_features(core), atol=1e-5)


def test_clip_t_and_temporal_consistency_ranges_and_definitions(enc) -> None:
    frames = moving_square(6)
    ct = clip_t(enc, frames, "a red square moves right")
    tc = temporal_consistency(enc, frames)
    assert -1.0 <= ct <= 1.0 and -1.0 <= tc <= 1.0
    feats = enc.image_features(frames)
    text = enc.text_features(["a red square moves right"])[0]
    assert ct == pytest.approx(float(np.mean([float(feats[i] @ text) for i in range(6)])), abs=1e-6)
    assert tc == pytest.approx(float(np.mean([float(feats[i] @ feats[i + 1]) for i in range(5)])), abs=1e-6)
    # a still clip is perfectly consistent; playing a clip backwards does not change the score
    still = np.repeat(frames[:1], 4, axis=0)
    assert temporal_consistency(enc, still) == pytest.approx(1.0, abs=1e-5)
    assert temporal_consistency(enc, frames[::-1].copy()) == pytest.approx(tc, abs=1e-6)
    # cutting in unrelated frames lowers consistency
    noise = np.random.default_rng(0).integers(0, 255, frames.shape, dtype=np.uint8)
    mixed = frames.copy()
    mixed[1::2] = noise[1::2]
    assert temporal_consistency(enc, mixed) < tc


def test_score_functions_check_shapes() -> None:
    with pytest.raises(EvaluationError, match=r"F >= 2"):
        temporal_consistency_score(torch.randn(1, 8))
    with pytest.raises(EvaluationError, match="embedding size"):
        clip_t_score(torch.randn(3, 8), torch.randn(4))
    assert clip_t_score(torch.ones(3, 4), torch.ones(4)) == pytest.approx(1.0)
    assert clip_t_score(torch.ones(3, 4), -torch.ones(4)) == pytest.approx(-1.0)


def test_single_safetensors_with_text_tower_matches_the_folder(enc, clip_dir, tmp_path) -> None:
    path = save_clip_file(tmp_path / "clip_full.safetensors", clip_dir, vision_only=False)
    with pytest.raises(ModelFileError, match="no tokenizer"):
        load_clip(path).text_features(["x"])
    enc2 = load_clip(path, tokenizer_dir=clip_dir)
    frames = moving_square(4)
    assert torch.allclose(enc2.image_features(frames), enc.image_features(frames), atol=1e-5)
    assert torch.allclose(enc2.text_features(["a bear hugs a raccoon"]), enc.text_features(["a bear hugs a raccoon"]),
                          atol=1e-5)


def test_comfyui_clip_vision_file_has_no_text_tower(enc, clip_dir, tmp_path) -> None:
    path = save_clip_file(tmp_path / "clip_vision" / "tiny_clip_vision.safetensors", clip_dir, vision_only=True)
    vis = load_clip(path)
    assert not vis.has_text
    frames = moving_square(4)
    assert torch.allclose(vis.image_features(frames), enc.image_features(frames), atol=1e-5)
    assert temporal_consistency(vis, frames) == pytest.approx(temporal_consistency(enc, frames), abs=1e-5)
    with pytest.raises(ModelFileError, match="image tower only.*CLIP-T needs CLIP's text tower"):
        clip_t(vis, frames, "a red square")


def test_open_clip_state_dict_loads_to_the_same_model(enc, clip_dir, tmp_path) -> None:
    from transformers import CLIPModel

    sd = to_open_clip(CLIPModel.from_pretrained(clip_dir, local_files_only=True).state_dict())
    path = tmp_path / "open_clip_model.bin"
    torch.save(sd, path)
    oc = load_clip(path, tokenizer_dir=clip_dir)
    frames = moving_square(3)
    assert torch.allclose(oc.image_features(frames), enc.image_features(frames), atol=1e-5)
    assert torch.allclose(oc.text_features(["a hug"]), enc.text_features(["a hug"]), atol=1e-5)
    sd["visual.attnpool.weight"] = torch.zeros(2)  # a modified ResNet CLIP part: refused, not dropped
    torch.save(sd, path)
    with pytest.raises(ModelFileError, match="attnpool"):
        load_clip(path)


def test_clip_loading_and_input_errors(enc, tmp_path) -> None:
    with pytest.raises(DreamRelationError, match=r"uint8 \[F, H, W, 3\]"):
        enc.image_features(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(EvaluationError, match="uint8"):
        enc.image_features(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ModelFileNotFoundError, match="CLIP model not found"):
        load_clip(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"vision_model.encoder.layers.0.layer_norm1.weight": torch.ones(4)}, str(tmp_path / "siglip.safetensors"))
    with pytest.raises(ModelFileError, match="patch_embedding"):
        load_clip(tmp_path / "siglip.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="config.json"):
        load_clip(tmp_path / "empty")


def test_leakage_scores_and_exemplars(enc) -> None:
    exemplar = moving_square(8, colour=(40, 200, 40), seed=3)
    other = moving_square(6, colour=(40, 40, 220), seed=7, background=200)
    ex = exemplar_features(enc, [("ex0", exemplar)], frames_per_video=4)
    assert ex.shape == (4, 32)
    copied = leakage(enc, exemplar[[0, 7]], ex)  # frames 0 and 7 are among the 4 sampled
    assert copied.max == pytest.approx(1.0, abs=1e-5) and copied.mean == pytest.approx(1.0, abs=1e-5)
    fresh = leakage(enc, other, ex)
    assert -1.0 <= fresh.mean <= fresh.max <= 1.0 and fresh.max < copied.max
    g = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    lk = leakage_scores(g, e)
    nearest = (g @ e.T).max(1).values
    assert lk.max == pytest.approx(float(nearest.max()), abs=1e-6) and lk.mean == pytest.approx(float(nearest.mean()), abs=1e-6)
    with pytest.raises(EvaluationError, match="one D"):
        leakage_scores(g, torch.randn(3, 7))
