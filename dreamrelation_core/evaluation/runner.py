"""Evaluate a folder of generated videos: per-video CLIP-T, temporal consistency, relation verdict
and appearance leakage, and the FVD of the whole set against reference videos.

Prompts file (which prompt made which video), one of:
- text, one video per line, fields separated by TABs:
      <video name>\\t<prompt>
      <video name>\\t<prompt>\\t<subject A>\\t<relation>\\t<subject B>
  blank lines and lines starting with '#' are skipped;
- JSON (`.json`): a list of objects
      {"video": "bear_raccoon_0", "prompt": "A bear is shaking hands with a raccoon.",
       "subject_a": "a bear", "relation": "shaking hands with", "subject_b": "a raccoon"}
  or an object mapping video names to a prompt string or to such an object (without "video").
A video name is the file name with or without its suffix (`clip0.mp4` or `clip0`), or a frame
folder's name. Subject A / relation / subject B are optional: with them the judge is asked whether
the video shows "<subject A> <relation> <subject B>", without them whether it shows the prompt.
Every video in the folder needs a prompt and every prompt a video.

Models are loaded one at a time (CLIP, then the judge, then the FVD network) and freed between.
"""

from __future__ import annotations

import csv
import gc
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import _video_candidates
from ..data.video import VIDEO_SUFFIXES, probe_video, read_video
from ..errors import EvaluationError, ModelFileError
from ..fileio import atomic_path
from .clip_metrics import ClipEncoder, clip_t_score, load_clip, temporal_consistency_score
from .fvd import (
    FVD_FRAMES,
    FVD_SIZE,
    check_clip_lengths,
    frames_needed,
    fvd_from_features,
    load_feature_network,
    video_features,
)
from .judge import RelationJudge, Verdict, prompt_question, relation_accuracy, relation_question
from .leakage import DEFAULT_EXEMPLAR_FRAMES, exemplar_features, leakage_scores

CSV_COLUMNS = (
    "video", "prompt", "frames", "clip_t", "temporal_consistency", "relation_question", "relation_answer",
    "relation_verdict", "relation_correct", "leakage_max", "leakage_mean",
)
Progress = Callable[[str], None]


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptEntry:
    video: str
    prompt: str
    subject_a: str | None = None
    relation: str | None = None
    subject_b: str | None = None

    def question(self) -> str:
        if self.subject_a and self.relation and self.subject_b:
            return relation_question(self.subject_a, self.relation, self.subject_b)
        return prompt_question(self.prompt)


def video_key(name: str) -> str:
    """'clip0.mp4' and 'clip0' name the same video."""
    p = Path(name.strip())
    return p.stem if p.suffix.lower() in VIDEO_SUFFIXES else p.name


def _entry_from_obj(obj: dict, video: str | None, where: str) -> PromptEntry:
    if not isinstance(obj, dict):
        raise EvaluationError(f"{where}: expected an object with 'prompt', got {type(obj).__name__}")
    video = video if video is not None else obj.get("video")
    prompt = obj.get("prompt")
    if not isinstance(video, str) or not video.strip():
        raise EvaluationError(f"{where}: missing 'video' (the generated video's name)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvaluationError(f"{where}: missing 'prompt' for video {video!r}")
    triple = [obj.get(k) for k in ("subject_a", "relation", "subject_b")]
    if any(triple) and not all(isinstance(t, str) and t.strip() for t in triple):
        raise EvaluationError(f"{where}: give all of subject_a, relation, subject_b or none, got {triple}")
    return PromptEntry(video_key(video), " ".join(prompt.split()), *[" ".join(t.split()) if t else None for t in triple])


def _read_json_prompts(path: Path) -> list[PromptEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path}: not valid UTF-8 JSON ({e})") from e
    if isinstance(data, list):
        return [_entry_from_obj(o, None, f"{path}[{i}]") for i, o in enumerate(data)]
    if isinstance(data, dict):
        return [_entry_from_obj({"prompt": v} if isinstance(v, str) else v, k, f"{path}[{k!r}]") for k, v in data.items()]
    raise EvaluationError(f"{path}: expected a JSON list of objects or an object keyed by video name")


def _read_text_prompts(path: Path) -> list[PromptEntry]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{path}: not UTF-8 text ({e})") from e
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) not in (2, 5) or not all(fields):
            raise EvaluationError(f"{path}:{n}: expected '<video>\\t<prompt>' or '<video>\\t<prompt>\\t<subject A>\\t"
                                  f"<relation>\\t<subject B>' (TAB-separated, none empty), got {len(fields)} field(s)")
        out.append(_entry_from_obj(dict(zip(("video", "prompt", "subject_a", "relation", "subject_b"), fields)),
                                   None, f"{path}:{n}"))
    return out


def read_prompts(path: str | os.PathLike) -> dict[str, PromptEntry]:
    """Prompts file (format in the module docstring) -> {video name: entry}."""
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{p}: prompts file not found")
    entries = _read_json_prompts(p) if p.suffix.lower() == ".json" else _read_text_prompts(p)
    out: dict[str, PromptEntry] = {}
    for e in entries:
        if e.video in out:
            raise EvaluationError(f"{p}: video {e.video!r} has more than one prompt")
        out[e.video] = e
    if not out:
        raise EvaluationError(f"{p}: no prompts")
    return out


# ---------------------------------------------------------------- videos


def find_videos(folder: str | os.PathLike) -> dict[str, Path]:
    """Videos of a folder (files and frame folders; hidden entries and mask folders skipped) by name."""
    d = Path(folder)
    if not d.is_dir():
        raise EvaluationError(f"{d}: not a folder of videos")
    found, _ = _video_candidates(d)
    dup = {k: v for k, v in found.items() if len(v) > 1}
    if dup:
        raise EvaluationError(f"{d}: several videos share a name: "
                              + "; ".join(f"{k}: {', '.join(p.name for p in v)}" for k, v in sorted(dup.items())))
    if not found:
        raise EvaluationError(f"{d}: no videos ({', '.join(VIDEO_SUFFIXES)} files or frame folders)")
    return {k: v[0] for k, v in sorted(found.items())}


def match_prompts(videos: dict[str, Path], prompts: dict[str, PromptEntry], where: str = "") -> list[tuple[str, Path, PromptEntry]]:
    no_prompt = sorted(set(videos) - set(prompts))
    no_video = sorted(set(prompts) - set(videos))
    problems = []
    if no_prompt:
        problems.append(f"videos without a prompt: {', '.join(no_prompt[:10])}{' ...' if len(no_prompt) > 10 else ''}")
    if no_video:
        problems.append(f"prompts without a video: {', '.join(no_video[:10])}{' ...' if len(no_video) > 10 else ''}")
    if problems:
        raise EvaluationError(f"{where}: " + "; ".join(problems))
    return [(k, videos[k], prompts[k]) for k in sorted(videos)]


def _iter_clips(paths: dict[str, Path], max_frames: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    for name, path in paths.items():
        yield name, read_video(path, max_frames)


# ---------------------------------------------------------------- the run


@dataclass
class EvalSettings:
    clip: str | None = None  # CLIP folder or file
    clip_tokenizer: str | None = None
    no_clip_t: bool = False  # an image-tower-only CLIP: temporal consistency and leakage only
    i3d: str | None = None  # FVD feature network
    reference: str | None = None  # folder of reference videos for FVD
    judge: str | None = None  # vision-language model folder
    exemplars: str | None = None  # training exemplar videos, for leakage
    device: str = "cpu"
    fvd_frames: int = FVD_FRAMES  # 0: all frames (every clip the same length)
    fvd_stride: int = 1
    fvd_size: int = FVD_SIZE
    fvd_ddof: int = 1
    judge_frames: int | None = None
    exemplar_frames: int = DEFAULT_EXEMPLAR_FRAMES


@dataclass
class EvalResult:
    rows: list[dict]
    summary: dict = field(default_factory=dict)


def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_settings(s: EvalSettings) -> None:
    if not (s.clip or s.judge or s.i3d):
        raise EvaluationError("nothing to compute: give --clip (CLIP-T, temporal consistency, leakage), "
                              "--judge (relation accuracy) and/or --i3d with --reference (FVD)")
    if s.i3d and not s.reference:
        raise EvaluationError("FVD needs reference videos: give --reference DIR with --i3d")
    if s.reference and not s.i3d:
        raise EvaluationError("--reference is for FVD: give the feature network with --i3d FILE")
    if s.exemplars and not s.clip:
        raise EvaluationError("appearance leakage uses CLIP image features: give --clip with --exemplars")


def _clip_stage(entries, rows, s: EvalSettings, progress: Progress) -> None:
    enc: ClipEncoder = load_clip(s.clip, s.clip_tokenizer, s.device)
    want_t = not s.no_clip_t
    if want_t and not enc.has_text:
        raise ModelFileError(f"{s.clip}: holds CLIP's image tower only, so CLIP-T cannot be computed. Give a full "
                             f"CLIP (a Hugging Face CLIP folder, or a file with text_model.* keys), or add --no-clip-t "
                             f"to compute only temporal consistency and leakage with it")
    texts = enc.text_features([e.prompt for _, _, e in entries]) if want_t else None
    ex = None
    if s.exemplars:
        ex_videos = find_videos(s.exemplars)
        progress(f"CLIP: {len(ex_videos)} exemplar video(s)")
        ex = exemplar_features(enc, _iter_clips(ex_videos), s.exemplar_frames)
    for i, (name, path, _) in enumerate(entries):
        frames = read_video(path)
        feats = enc.image_features(frames)
        row = rows[i]
        row["frames"] = len(frames)
        if texts is not None:
            row["clip_t"] = clip_t_score(feats, texts[i])
        if len(frames) >= 2:
            row["temporal_consistency"] = temporal_consistency_score(feats)
        if ex is not None:
            lk = leakage_scores(feats, ex)
            row["leakage_max"], row["leakage_mean"] = lk.max, lk.mean
        progress(f"CLIP: {name}")
    _free(enc, ex)


def _judge_stage(entries, rows, s: EvalSettings, progress: Progress) -> None:
    judge = RelationJudge.load(s.judge, s.device, num_frames=s.judge_frames)
    for i, (name, path, entry) in enumerate(entries):
        frames = read_video(path)
        ans = judge.ask(frames, entry.question())
        rows[i].setdefault("frames", len(frames))
        rows[i].update(relation_question=ans.question, relation_answer=ans.answer, relation_verdict=ans.verdict.value,
                       relation_correct=int(ans.correct))
        progress(f"judge: {name}: {ans.verdict.value}")
    _free(judge)


def _fvd_stage(videos: dict[str, Path], s: EvalSettings, summary: dict, progress: Progress) -> None:
    reference = find_videos(s.reference)
    lengths = {f"{k} (generated)": probe_video(p).num_frames for k, p in videos.items()}
    lengths |= {f"{k} (reference)": probe_video(p).num_frames for k, p in reference.items()}
    frames = check_clip_lengths(lengths, s.fvd_frames or None, s.fvd_stride)
    need = frames_needed(frames, s.fvd_stride)
    net = load_feature_network(s.i3d, s.device)
    fa = video_features(net, _iter_clips(videos, need), frames, s.fvd_stride, s.fvd_size,
                        progress=lambda n: progress(f"FVD: {n}"))
    fb = video_features(net, _iter_clips(reference, need), frames, s.fvd_stride, s.fvd_size,
                        progress=lambda n: progress(f"FVD reference: {n}"))
    summary["fvd"] = fvd_from_features(fa, fb, s.fvd_ddof)
    summary["fvd_settings"] = dict(network=str(s.i3d), frames=frames, stride=s.fvd_stride, size=s.fvd_size,
                                   feature_dim=int(fa.shape[1]), generated=len(fa), reference=len(fb), ddof=s.fvd_ddof)
    _free(net)


def summarize(rows: list[dict]) -> dict:
    """Means (and counts) of the per-video metrics; relation accuracy as the share of "yes"."""
    out: dict = {"videos": len(rows)}
    for col in ("clip_t", "temporal_consistency", "leakage_max", "leakage_mean"):
        vals = [r[col] for r in rows if r.get(col) not in (None, "")]
        if vals:
            out[col] = float(np.mean(vals))
            out[f"{col}_n"] = len(vals)
    verdicts = [Verdict(r["relation_verdict"]) for r in rows if r.get("relation_verdict")]
    if verdicts:
        out["relation_accuracy"] = relation_accuracy(verdicts)
        out["relation_n"] = len(verdicts)
        out["relation_unclear"] = sum(v is Verdict.UNCLEAR for v in verdicts)
    return out


def evaluate(videos_dir: str | os.PathLike, prompts_file: str | os.PathLike, settings: EvalSettings,
             progress: Progress | None = None) -> EvalResult:
    """Run every metric the settings give a model for (see the module docstring)."""
    progress = progress or (lambda _msg: None)
    _check_settings(settings)
    videos = find_videos(videos_dir)
    entries = match_prompts(videos, read_prompts(prompts_file), f"{videos_dir} vs {prompts_file}")
    rows = [{"video": name, "prompt": e.prompt} for name, _, e in entries]
    if settings.clip:
        _clip_stage(entries, rows, settings, progress)
    if settings.judge:
        _judge_stage(entries, rows, settings, progress)
    result = EvalResult(rows)
    result.summary = summarize(rows)
    if settings.i3d:
        _fvd_stage(videos, settings, result.summary, progress)
    return result


# ---------------------------------------------------------------- output


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def write_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """One row per video, columns CSV_COLUMNS (empty where a metric was not computed)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for r in rows:
                w.writerow([_cell(r.get(c)) for c in CSV_COLUMNS])
    return path


def write_summary(summary: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def summary_table(summary: dict) -> str:
    """A small aligned text table of the set-level numbers."""
    lines = [("metric", "value", "videos")]
    labels = (("clip_t", "CLIP-T (cos, x100 in papers)"), ("temporal_consistency", "temporal consistency"),
              ("leakage_max", "leakage max (mean over videos)"), ("leakage_mean", "leakage mean"))
    for key, label in labels:
        if key in summary:
            lines.append((label, f"{summary[key]:.4f}", str(summary[f"{key}_n"])))
    if "relation_accuracy" in summary:
        lines.append(("relation accuracy", f"{100 * summary['relation_accuracy']:.2f} %",
                      f"{summary['relation_n']} ({summary['relation_unclear']} unclear)"))
    if "fvd" in summary:
        fs = summary["fvd_settings"]
        lines.append((f"FVD ({fs['frames']}f, {fs['size']}px)", f"{summary['fvd']:.2f}",
                      f"{fs['generated']} vs {fs['reference']} ref"))
    widths = [max(len(row[i]) for row in lines) for i in range(3)]
    out = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)
