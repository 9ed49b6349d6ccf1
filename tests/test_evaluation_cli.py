"""`python -m dreamrelation_core evaluate` end to end on tiny local models, and the prompts file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dreamrelation_core.cli import main
from dreamrelation_core.data.synthetic import write_video
from dreamrelation_core.errors import EvaluationError
from dreamrelation_core.evaluation.runner import CSV_COLUMNS, find_videos, match_prompts, read_prompts
from fixtures.eval_models import (
    StyleGanVLikeI3D,
    moving_square,
    save_clip_file,
    save_clip_folder,
    save_tiny_qwen2vl,
    save_torchscript,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    clip = save_clip_folder(root / "clip")
    torch.manual_seed(0)
    return {
        "clip": clip,
        "clip_vision": save_clip_file(root / "clip_vision" / "tiny.safetensors", clip, vision_only=True),
        "judge": save_tiny_qwen2vl(root / "judge", " Yes"),
        "i3d": save_torchscript(StyleGanVLikeI3D(12), root / "i3d_torchscript.pt"),
    }


def _video_dir(root: Path, names_frames: dict[str, int], seed: int, brightness: int = 30) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, n) in enumerate(names_frames.items()):
        frames = moving_square(n, size=(32, 40), seed=seed + i, background=brightness)
        write_video(root / name, frames, "gif" if i % 2 else "png")
    return root


@pytest.fixture()
def data(tmp_path) -> dict[str, Path]:
    videos = _video_dir(tmp_path / "generated", {"bear_raccoon": 18, "cat_dog": 16, "fox_owl": 20}, seed=0)
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text(
        "# video\tprompt\tsubject A\trelation\tsubject B\n"
        "bear_raccoon\tA bear is shaking hands with a raccoon.\ta bear\tshaking hands with\ta raccoon\n"
        "\n"
        "cat_dog.gif\tA cat hugs a dog.\n"
        "fox_owl\tA fox high-fives an owl.\ta fox\thigh-fiving\tan owl\n",
        encoding="utf-8",
    )
    return {
        "videos": videos,
        "prompts": prompts,
        "reference": _video_dir(tmp_path / "reference", {"r0": 16, "r1": 17, "r2": 16}, seed=10, brightness=120),
        "exemplars": _video_dir(tmp_path / "exemplars", {"ex0": 10}, seed=0),
    }


def test_evaluate_writes_csv_and_summary(models, data, tmp_path, capsys) -> None:
    out = tmp_path / "scores.csv"
    rc = main(["evaluate", "--videos", str(data["videos"]), "--prompts", str(data["prompts"]), "--out", str(out),
               "--clip", str(models["clip"]), "--exemplars", str(data["exemplars"]), "--judge", str(models["judge"]),
               "--i3d", str(models["i3d"]), "--reference", str(data["reference"]), "--fvd-size", "32",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["video"] for r in rows] == ["bear_raccoon", "cat_dog", "fox_owl"]
    assert [int(r["frames"]) for r in rows] == [18, 16, 20]
    for r in rows:
        for col in ("clip_t", "temporal_consistency", "leakage_max", "leakage_mean"):
            assert -1.0 <= float(r[col]) <= 1.0, (col, r[col])
        assert float(r["leakage_mean"]) <= float(r["leakage_max"])
        assert r["relation_verdict"] == "yes" and r["relation_correct"] == "1" and r["relation_answer"].startswith("Yes")
    assert rows[0]["relation_question"] == "Does this video show a bear shaking hands with a raccoon? Answer with yes or no."
    assert rows[1]["relation_question"].startswith('Does this video show the following: "A cat hugs a dog"')
    # bear_raccoon's first frames are the exemplar's own (same seed and size): leakage at its maximum
    assert float(rows[0]["leakage_max"]) == pytest.approx(1.0, abs=1e-4)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["videos"] == 3 and summary["relation_accuracy"] == 1.0
    assert summary["fvd"] > 0 and summary["fvd_settings"]["frames"] == 16 and summary["fvd_settings"]["reference"] == 3
    assert summary["clip_t"] == pytest.approx(sum(float(r["clip_t"]) for r in rows) / 3, abs=1e-5)
    printed = capsys.readouterr().out
    assert "relation accuracy" in printed and "100.00 %" in printed and "FVD (16f, 32px)" in printed
    assert f"wrote {out}" in printed


def test_evaluate_with_a_clip_vision_file(models, data, tmp_path, capsys) -> None:
    out = tmp_path / "s.csv"
    args = ["evaluate", "--videos", str(data["videos"]), "--prompts", str(data["prompts"]), "--out", str(out),
            "--clip", str(models["clip_vision"]), "--quiet", "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "image tower only" in err and "--no-clip-t" in err and not out.exists()
    assert main([*args, "--no-clip-t"]) == 0
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    assert all(r["clip_t"] == "" and r["temporal_consistency"] for r in rows)


def test_evaluate_argument_and_input_errors(models, data, tmp_path, capsys) -> None:
    base = ["evaluate", "--videos", str(data["videos"]), "--prompts", str(data["prompts"]), "--out",
            str(tmp_path / "x.csv"), "--quiet", "--device", "cpu"]
    assert main(base) == 1 and "nothing to compute" in capsys.readouterr().err
    assert main([*base, "--i3d", str(models["i3d"])]) == 1 and "--reference" in capsys.readouterr().err
    assert main([*base, "--clip", str(tmp_path / "nope.safetensors")]) == 1
    assert "CLIP model not found" in capsys.readouterr().err
    assert main([*base, "--i3d", str(models["i3d"]), "--reference", str(data["reference"]), "--fvd-frames", "0"]) == 1
    assert "different lengths" in capsys.readouterr().err
    assert main([*base, "--i3d", str(models["i3d"]), "--reference", str(data["reference"]), "--fvd-frames", "17"]) == 1
    assert "shorter than the 17 frames" in capsys.readouterr().err
    (data["videos"] / "extra.gif").write_bytes((data["videos"] / "cat_dog.gif").read_bytes())
    assert main([*base, "--clip", str(models["clip"])]) == 1
    assert "videos without a prompt: extra" in capsys.readouterr().err


def test_prompts_file_formats(tmp_path) -> None:
    tsv = tmp_path / "p.txt"
    tsv.write_text("a.mp4\tA bear  hugs a raccoon.\n# comment\nb\tB\ta cat\thugging\ta dog\n", encoding="utf-8")
    p = read_prompts(tsv)
    assert set(p) == {"a", "b"} and p["a"].prompt == "A bear hugs a raccoon." and p["a"].subject_a is None
    assert p["b"].question() == "Does this video show a cat hugging a dog? Answer with yes or no."
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"video": "a.gif", "prompt": "x", "subject_a": "a cat", "relation": "hugging",
                                "subject_b": "a dog"}]), encoding="utf-8")
    assert read_prompts(js)["a"].relation == "hugging"
    js.write_text(json.dumps({"a": "A cat.", "b": {"prompt": "B", "subject_a": "s", "relation": "r", "subject_b": "t"}}))
    assert read_prompts(js)["b"].subject_b == "t" and read_prompts(js)["a"].prompt == "A cat."
    bad = [("c\tprompt\tonly one\n", r"p\.txt:1: expected"), ("c\tone\nc\ttwo\n", "more than one prompt"),
           ("# nothing\n", "no prompts")]
    for text, msg in bad:
        tsv.write_text(text, encoding="utf-8")
        with pytest.raises(EvaluationError, match=msg):
            read_prompts(tsv)
    js.write_text(json.dumps([{"video": "a", "prompt": "p", "subject_a": "x"}]))
    with pytest.raises(EvaluationError, match="all of subject_a, relation, subject_b or none"):
        read_prompts(js)
    js.write_text("{not json")
    with pytest.raises(EvaluationError, match="not valid UTF-8 JSON"):
        read_prompts(js)


def test_find_and_match_videos(tmp_path) -> None:
    d = _video_dir(tmp_path / "v", {"a": 4, "b": 4}, seed=0)
    (d / ".hidden").mkdir()
    vids = find_videos(d)
    assert list(vids) == ["a", "b"]
    prompts = read_prompts_from(tmp_path, "a\tA\nc\tC\n")
    with pytest.raises(EvaluationError, match="videos without a prompt: b; prompts without a video: c"):
        match_prompts(vids, prompts, "here")
    with pytest.raises(EvaluationError, match="no videos"):
        find_videos(d / ".hidden")


def read_prompts_from(tmp_path: Path, text: str):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return read_prompts(path)
