"""Relation accuracy: the answer parser on a table of answers, frame sampling, and the judge end to
end on a tiny random Qwen2-VL built from its config, saved and loaded back from a local folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dreamrelation_core.errors import EvaluationError, ModelFileError, ModelFileNotFoundError
from dreamrelation_core.evaluation.judge import (
    RelationJudge,
    Verdict,
    parse_yes_no,
    prompt_question,
    relation_accuracy,
    relation_question,
    sample_frame_indices,
)
from fixtures.eval_models import moving_square, save_tiny_qwen2vl

Y, N, U = Verdict.YES, Verdict.NO, Verdict.UNCLEAR
ANSWERS = [
    ("Yes", Y), ("yes", Y), ("YES", Y), ("Yes.", Y), ("yes!", Y), ("  Yes\n", Y), ("**Yes**", Y), ('"Yes"', Y),
    ("Yes, the video shows a bear shaking hands with a raccoon.", Y), ("Yes - they shake hands.", Y),
    ("Yeah, clearly.", Y), ("Correct.", Y), ("Answer: Yes", Y), ("Assistant: yes", Y), ("A: yes", Y),
    ("The answer is yes.", Y), ("Based on the frames, I would say yes.", Y),
    ("The video shows them hugging, so yes", Y),
    ("No", N), ("no.", N), ("NO", N), ("No, the video shows two people walking.", N), ("Nope", N),
    ("Answer: No", N), ("The answer is: no", N), ("Incorrect, they are dancing.", N),
    ("The bear does not touch the raccoon.", N), ("They don't hug.", N),
    ("", U), ("   ", U), ("...", U), ("I'm sorry, I can't determine that from these frames.", U),
    ("I cannot tell whether they shake hands.", U), ("It is unclear from the video.", U),
    ("Yes or no: hard to say.", U), ("yes and no", U), ("The video shows a bear and a raccoon.", U),
    ("Maybe", U), ("Yesterday they met.", U),
]


@pytest.mark.parametrize("answer,verdict", ANSWERS)
def test_parse_yes_no_table(answer: str, verdict: Verdict) -> None:
    assert parse_yes_no(answer) is verdict


def test_accuracy_counts_unclear_as_no() -> None:
    assert relation_accuracy([Y, N, U, Y]) == 0.5
    with pytest.raises(EvaluationError, match="no judged clips"):
        relation_accuracy([])


def test_questions_and_frame_sampling() -> None:
    q = relation_question(" a bear", "shaking   hands with", "a raccoon ")
    assert q == "Does this video show a bear shaking hands with a raccoon? Answer with yes or no."
    assert prompt_question("A bear hugs a raccoon.") == (
        'Does this video show the following: "A bear hugs a raccoon"? Answer with yes or no.')
    with pytest.raises(EvaluationError, match="non-empty"):
        relation_question("a bear", "", "a raccoon")
    assert sample_frame_indices(163, 8) == [0, 23, 46, 69, 93, 116, 139, 162]
    assert sample_frame_indices(4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sample_frame_indices(10, 1) == [5]
    with pytest.raises(EvaluationError):
        sample_frame_indices(0, 8)


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {"yes": save_tiny_qwen2vl(root / "judge-yes", " Yes"), "no": save_tiny_qwen2vl(root / "judge-no", " No")}


def test_judge_end_to_end_video_input(judge_dirs) -> None:
    judge = RelationJudge.load(judge_dirs["yes"], max_new_tokens=4)
    assert judge.mode == "video" and judge.num_frames == 8
    frames = moving_square(30)
    inputs = judge.inputs(frames, relation_question("a red square", "passing", "the wall"))
    # 8 frames in temporal pairs of the video processor -> 4 temporal patches, placed in the prompt
    assert inputs["video_grid_thw"].tolist()[0][0] == 4
    pad = judge.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == int(inputs["video_grid_thw"].prod()) // 4  # 2x2 merge
    ans = judge.ask(frames, relation_question("a red square", "passing", "the wall"))
    assert ans.answer.startswith("Yes") and ans.verdict is Verdict.YES and ans.correct
    no = RelationJudge.load(judge_dirs["no"], max_new_tokens=4).ask(frames, "Does this video show a hug?")
    assert no.answer.startswith("No") and no.verdict is Verdict.NO and not no.correct


def test_judge_image_input_and_odd_frame_counts(judge_dirs) -> None:
    base = RelationJudge.load(judge_dirs["yes"], max_new_tokens=2)
    images = RelationJudge(base.model, base.processor, base.source, num_frames=3, mode="images", max_new_tokens=2)
    assert images.num_frames == 3  # images are not grouped in time
    inputs = images.inputs(moving_square(12), "Does this video show a hug?")
    assert inputs["image_grid_thw"].shape[0] == 3 and "pixel_values_videos" not in inputs
    assert images.ask(moving_square(12), "Does this video show a hug?").verdict is Verdict.YES
    video = RelationJudge(base.model, base.processor, base.source, num_frames=5, mode="video")
    assert video.num_frames == 6  # rounded up to whole temporal patches of 2 frames


def test_judge_errors(tmp_path, judge_dirs) -> None:
    with pytest.raises(ModelFileNotFoundError, match="no vision-language model here"):
        RelationJudge.load(tmp_path / "missing")
    base = RelationJudge.load(judge_dirs["yes"])
    with pytest.raises(EvaluationError, match="uint8 frames"):
        base.ask(np.zeros((4, 8, 8, 3), np.float32), "q?")
    base.processor.chat_template = None  # a base model's processor: nothing to build the prompt with
    with pytest.raises(ModelFileError, match="no chat template"):
        RelationJudge(base.model, base.processor, "tiny")
