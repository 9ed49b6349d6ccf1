"""Relation accuracy: a local vision-language model is asked whether a clip shows
"<subject A> <relation> <subject B>", and its answer is read as yes / no / unclear.

The model is any image-text-to-text model of transformers loaded from a local folder
(`AutoModelForImageTextToText` + `AutoProcessor`, `local_files_only=True`), e.g. Qwen2-VL /
Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video, SmolVLM. Frames are sampled uniformly over the
clip (8 by default, or the `num_frames` the model's video processor declares), rounded up to a
multiple of the processor's temporal patch (Qwen2-VL groups frames in pairs). A processor with a
video processor gets them as one video; otherwise they go in as that many images. The prompt is
built with the model's own chat template; decoding is greedy.

Relation accuracy over a set of clips is the share of "yes" verdicts: "unclear" answers
(refusals, hedging, anything without a clear yes) count as no.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from ..errors import EvaluationError, ModelFileError, ModelFileNotFoundError

DEFAULT_JUDGE_FRAMES = 8


class Verdict(str, Enum):
    YES = "yes"
    NO = "no"
    UNCLEAR = "unclear"


# ---------------------------------------------------------------- reading the answer

_YES = {"yes", "yeah", "yep", "yup", "correct", "true", "affirmative"}
_NO = {"no", "nope", "nah", "incorrect", "false", "negative"}
_NEGATION = {"no", "not", "never", "neither", "nor", "none", "nope"}
_REFUSAL = re.compile(
    r"\b(?:cannot|can't|can ?not|unable|not (?:possible|sure|certain|clear)|unclear|impossible|sorry|"
    r"i don't know|hard to (?:say|tell)|difficult to (?:say|tell|determine)|no way to (?:tell|know)|as an ai)\b"
)
_LABEL = re.compile(r"^(?:final answer|answer|assistant|response|output|a)\s*[:\-–]\s*")
_EXPLICIT = re.compile(r"\b(?:the answer is|answer\s*[:=]|i would say|i'd say)\s*[\"'*]*\s*(yes|no)\b")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def parse_yes_no(answer: str) -> Verdict:
    """Read a free-form answer as yes / no / unclear.

    - the first word decides: "Yes, the video shows…", "**YES**", "yes." -> yes; "No." -> no
      (also yeah/yep/correct/true and nope/incorrect/false); "yes or no" / "yes and no" -> unclear;
    - otherwise an explicit "the answer is yes", "Answer: no";
    - otherwise a refusal or hedge ("I cannot tell", "sorry", "unclear") -> unclear;
    - otherwise a lone "yes" without negation words -> yes, any "no"/"not"/"n't" -> no;
    - anything else -> unclear.
    """
    text = (answer or "").strip().lower().replace("’", "'").replace("‘", "'")
    text = text.lstrip(" \t\n\"'`*_#>-–•.:")
    for _ in range(3):  # "Assistant: Answer: yes"
        stripped = _LABEL.sub("", text).lstrip(" \t\n\"'`*_#>")
        if stripped == text:
            break
        text = stripped
    words = _WORD.findall(text)
    if not words:
        return Verdict.UNCLEAR
    first = words[0]
    if first in _YES or first in _NO:
        if len(words) >= 3 and words[1] in ("or", "and") and words[2] in (_NO if first in _YES else _YES):
            return Verdict.UNCLEAR
        return Verdict.YES if first in _YES else Verdict.NO
    m = _EXPLICIT.search(text)
    if m:
        return Verdict.YES if m.group(1) == "yes" else Verdict.NO
    if _REFUSAL.search(text):
        return Verdict.UNCLEAR
    negated = any(w in _NEGATION or w.endswith("n't") for w in words)
    if "yes" in words and not negated:
        return Verdict.YES
    if negated:
        return Verdict.NO
    return Verdict.UNCLEAR


def relation_question(subject_a: str, relation: str, subject_b: str) -> str:
    """The question put to the judge for "<subject A> <relation> <subject B>"."""
    parts = [" ".join(str(s).split()) for s in (subject_a, relation, subject_b)]
    if not all(parts):
        raise EvaluationError(f"relation question: subject A, relation and subject B must be non-empty, got {parts}")
    return f"Does this video show {' '.join(parts)}? Answer with yes or no."


def prompt_question(prompt: str) -> str:
    """The question when only the whole prompt is known."""
    prompt = " ".join(str(prompt).split()).rstrip(".")
    if not prompt:
        raise EvaluationError("relation question: empty prompt")
    return f'Does this video show the following: "{prompt}"? Answer with yes or no.'


def sample_frame_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread uniformly over [0, total - 1] (first and last included; repeats
    when the clip has fewer frames than asked)."""
    if total < 1 or count < 1:
        raise EvaluationError(f"frame sampling: {total} frames, {count} asked; both must be >= 1")
    if count == 1:
        return [total // 2]
    return [int(round(i * (total - 1) / (count - 1))) for i in range(count)]


# ---------------------------------------------------------------- the judge model


@dataclass(frozen=True)
class JudgeAnswer:
    question: str
    answer: str
    verdict: Verdict

    @property
    def correct(self) -> bool:
        return self.verdict is Verdict.YES


class RelationJudge:
    """A local vision-language model that answers yes/no questions about a clip."""

    def __init__(self, model, processor, source: str, num_frames: int | None = None, mode: str = "auto",
                 max_new_tokens: int = 16) -> None:
        if mode not in ("auto", "video", "images"):
            raise ValueError(f"judge mode {mode!r}: expected auto, video or images")
        self.model = model.eval()
        self.processor = processor
        self.source = source
        self.max_new_tokens = max_new_tokens
        video_proc = getattr(processor, "video_processor", None)
        self.mode = ("video" if video_proc is not None else "images") if mode == "auto" else mode
        if self.mode == "video" and video_proc is None:
            raise ModelFileError(f"{source}: the processor has no video processor; use mode 'images'")
        if getattr(processor, "chat_template", None) is None:
            raise ModelFileError(f"{source}: the processor has no chat template (chat_template.jinja / .json); "
                                 f"an instruction-tuned vision-language model is needed")
        declared = getattr(video_proc, "num_frames", None) if video_proc is not None else None
        n = int(num_frames or declared or DEFAULT_JUDGE_FRAMES)
        group = int(getattr(video_proc, "temporal_patch_size", 1) or 1) if self.mode == "video" else 1
        self.num_frames = -(-n // group) * group  # whole temporal patches

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             **kwargs) -> RelationJudge:
        """From a local folder (save_pretrained layout). dtype None: bfloat16 on CUDA, float32 otherwise."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = Path(folder).expanduser()
        if not (p / "config.json").is_file():
            raise ModelFileNotFoundError(f"{p}: no vision-language model here (expected a Hugging Face folder with "
                                         f"config.json, weights and processor files)")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            processor = AutoProcessor.from_pretrained(p, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(p, local_files_only=True, dtype=dtype)
        except Exception as e:
            raise ModelFileError(f"{p}: cannot load as an image-text-to-text model ({type(e).__name__}: {e})") from e
        return cls(model.to(device), processor, str(p), **kwargs)

    def sample(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise EvaluationError(f"judge: expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
        return frames[sample_frame_indices(len(frames), self.num_frames)]

    def inputs(self, frames: np.ndarray, question: str):
        """The processor's tensors for one clip and one question (frames sampled here)."""
        picked = self.sample(frames)
        if self.mode == "video":
            content = [{"type": "video"}, {"type": "text", "text": question}]
        else:
            content = [{"type": "image"} for _ in picked] + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        if self.mode == "video":  # already sampled here: the video processor must not resample
            return self.processor(text=[text], videos=[picked], do_sample_frames=False, return_tensors="pt")
        from PIL import Image

        return self.processor(text=[text], images=[[Image.fromarray(f) for f in picked]], return_tensors="pt")

    @torch.no_grad()
    def ask(self, frames: np.ndarray, question: str) -> JudgeAnswer:
        inputs = self.inputs(frames, question)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
                  for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        answer = self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()
        return JudgeAnswer(question, answer, parse_yes_no(answer))


def relation_accuracy(verdicts: list[Verdict]) -> float:
    """Share of clips judged "yes" (unclear counts as no), in [0, 1]."""
    if not verdicts:
        raise EvaluationError("relation accuracy: no judged clips")
    return sum(v is Verdict.YES for v in verdicts) / len(verdicts)
