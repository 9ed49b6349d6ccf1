"""Grounding DINO on transformers 5: original-checkpoint converter, HF folders, tokenizer, detect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreamrelation_core.masks.grounding_dino import (
    DetectorOptions,
    GroundingDino,
    ModelFileError,
    convert_original_state_dict,
    load_bert_tokenizer,
    load_grounding_dino,
)
from dreamrelation_core.statedict import read_state_dict
from fixtures.mask_models import (
    bert_vocab,
    tiny_gdino,
    tiny_tokenizer,
    two_subject_clip,
    write_hf_gdino,
    write_original_gdino,
    write_vocab,
)

OPT = DetectorOptions(box_threshold=0.0, text_threshold=0.0, short_side=64, max_side=128)


def _outputs(model, det: GroundingDino, clip: np.ndarray):
    text, _ = det.encode_prompts(["person"])
    px = det.preprocess(clip, OPT)
    with torch.no_grad():
        return model(pixel_values=px, **{k: v.expand(len(clip), -1) for k, v in text.items()})


@pytest.mark.parametrize("heads,cfg_py", [(2, True), (8, False)])
def test_original_checkpoint_converts_to_same_outputs(tmp_path: Path, heads: int, cfg_py: bool) -> None:
    # heads=2 needs the .cfg.py (nheads); heads=8 is the original default read without one.
    model, path = write_original_gdino(tmp_path / "groundingdino_swint_ogc.pth", heads=heads, cfg_py=cfg_py)
    det = load_grounding_dino(path, write_vocab(tmp_path / "bert"))
    assert det.model.config.encoder_attention_heads == heads
    clip = two_subject_clip(2)
    a, b = _outputs(model, det, clip), _outputs(det.model, det, clip)
    assert torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-5)
    n = a.input_ids.shape[1]  # logits are padded to max_text_len, which the .cfg.py may not give
    assert torch.allclose(a.logits[..., :n], b.logits[..., :n], atol=1e-4)


def test_every_original_key_is_accounted_for(tmp_path: Path) -> None:
    model, path = write_original_gdino(tmp_path / "g.pth")
    sd = read_state_dict(path)
    converted, unused, unknown = convert_original_state_dict(sd)
    assert unknown == []
    assert sorted(unused) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    target = model.state_dict()
    for k, v in converted.items():
        assert torch.equal(target[k], v), k
    # Every original tensor went somewhere: fused ones into three parts.
    assert len(converted) == len(sd) - len(unused) + 2 * sum("qkv" in k or "in_proj" in k for k in sd)


def test_unknown_key_and_wrong_kind_are_reported(tmp_path: Path) -> None:
    _, path = write_original_gdino(tmp_path / "g.pth")
    sd = torch.load(path, weights_only=True)
    sd["model"]["module.transformer.mystery.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ModelFileError, match=r"keys this converter does not know: \['transformer.mystery.weight'\]"):
        load_grounding_dino(tmp_path / "bad.pth", write_vocab(tmp_path / "bert"))
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(2)}, tmp_path / "sam.pth")
    with pytest.raises(ModelFileError, match="not an original Grounding DINO checkpoint"):
        load_grounding_dino(tmp_path / "sam.pth", tmp_path / "bert")


def test_missing_files_name_folder_and_expected_names(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError) as e:
        load_grounding_dino(tmp_path / "groundingdino_swint_ogc.pth")
    assert str(tmp_path) in str(e.value) and "groundingdino_swinb_cogcoor.pth" in str(e.value)
    with pytest.raises(ModelFileError, match="vocab.txt"):
        load_bert_tokenizer(tmp_path)
    (tmp_path / "hf").mkdir()
    with pytest.raises(ModelFileError, match="config.json"):
        load_grounding_dino(tmp_path / "hf")


def test_tokenizer_must_have_bert_ids(tmp_path: Path) -> None:
    tok = load_bert_tokenizer(write_vocab(tmp_path / "ok"))
    assert tok.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vocab.txt").write_text("\n".join(bert_vocab()[1:]) + "\n")  # every id shifted by one
    with pytest.raises(ModelFileError, match="not bert-base-uncased's"):
        GroundingDino(tiny_gdino(), load_bert_tokenizer(bad))


def test_hf_folder_loads_offline_with_its_vocab(tmp_path: Path) -> None:
    folder = write_hf_gdino(tmp_path / "grounding-dino-tiny")
    det = load_grounding_dino(folder)
    ref = tiny_gdino()
    clip = two_subject_clip(1)
    assert torch.allclose(_outputs(ref, det, clip).pred_boxes, _outputs(det.model, det, clip).pred_boxes, atol=1e-5)


def test_prompts_reach_the_text_encoder_and_boxes_are_in_pixels() -> None:
    det = GroundingDino(tiny_gdino(), tiny_tokenizer())
    seen = []
    det.model.model.text_backbone.register_forward_hook(lambda m, args, kw, out: seen.append(kw.get("input_ids", args[0] if args else None).clone()),
                                                          with_kwargs=True)
    clip = two_subject_clip(3, h=64, w=96)
    res = det.detect(clip, ["Person", "dog."], OPT, frame_indices=[4, 5, 6])
    ids = tiny_tokenizer().convert_tokens_to_ids(["[CLS]", "person", ".", "dog", ".", "[SEP]"])
    assert seen and seen[0].shape[0] == 3
    assert seen[0][0].tolist() == ids
    assert [r.frame for r in res] == [4, 5, 6]
    for r in res:
        assert len(r.boxes) >= 2
        assert (r.boxes[:, [0, 2]] <= 96).all() and (r.boxes[:, [1, 3]] <= 64).all() and (r.boxes >= 0).all()
        assert set(np.unique(r.labels)) <= {0, 1}
        assert (np.diff(r.scores) <= 0).all()  # NMS keeps best first
    # One shared prompt: no labels; a high threshold keeps exactly the boxes above it. Greedy NMS
    # keeps a box unless a better one suppresses it, so those are the unthresholded run's boxes
    # scoring above 0.9 (some, not all: the threshold must find boxes and drop some).
    def shared(threshold: float):
        return det.detect(clip[:1], ["person", "person"], DetectorOptions(
            box_threshold=threshold, text_threshold=0.0, short_side=64, max_side=128))[0]

    everything, same = shared(0.0), shared(0.9)
    above = everything.scores > 0.9
    assert same.labels is None
    assert 0 < above.sum() < len(above)
    assert len(same.boxes) == above.sum() and (same.scores > 0.9).all()
    np.testing.assert_allclose(same.boxes, everything.boxes[above], atol=1e-5)


def test_detect_rejects_bad_frames() -> None:
    det = GroundingDino(tiny_gdino(), tiny_tokenizer())
    with pytest.raises(ValueError, match=r"expected uint8 frames \[N, H, W, 3\], got float32"):
        det.detect(np.zeros((1, 8, 8, 3), np.float32), ["person"], OPT)
    with pytest.raises(ValueError, match="empty subject prompt"):
        det.encode_prompts(["person", " . "])
