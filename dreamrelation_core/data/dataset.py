"""Relation dataset folders: scan and validation (encoding into the training cache: see cache).

A dataset is one folder per relation. For every video `<name>`:
- the video: `<name>.mp4` / `.webm` / `.mkv` / `.mov` / `.gif`, or a frame folder `<name>/` of
  numbered `.png` / `.jpg` images;
- its caption `<name>.txt` (UTF-8, whitespace collapsed);
- its masks (see mask_files): compact `<name>.masks.npz`, or reference colour PNGs in `<name>/`
  beside a video file, or in `<name>/masks/` inside a frame-folder video. Masks cover every frame
  of the video at the video's own resolution.
Hidden entries (starting with "." or "_", e.g. the default cache `.dreamrelation_cache/`) are
skipped.

`describe_dataset` runs every check that can fail before anything is encoded or written: the clip
settings (frame count, training size), the folder's entries, and each video's length and masks.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base_models import get_spec
from ..basemodel import BaseModelSpec
from ..errors import DatasetError, VideoError
from . import mask_files as mask_io
from .video import FRAME_SUFFIXES, VIDEO_SUFFIXES, probe_video

_FRAME_MASK_RE = re.compile(r"^frame\d+\.png$", re.IGNORECASE)


@dataclass(frozen=True)
class VideoEntry:
    """One training video of a dataset folder, after validation."""

    name: str
    video: Path  # file or frame folder
    caption: str
    masks: Path  # compact .masks.npz or a reference frame{i}.png folder
    num_frames: int  # of the whole source video
    height: int
    width: int


# ---------------------------------------------------------------- scanning

def _hidden(p: Path) -> bool:
    return p.name.startswith((".", "_"))


def _has_frame_images(d: Path) -> bool:
    return any(f.is_file() and f.suffix.lower() in FRAME_SUFFIXES for f in d.iterdir())


def _video_candidates(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """name -> video paths, and folders that look like masks without a video."""
    files = [p for p in folder.iterdir() if not _hidden(p)]
    file_stems = {p.stem for p in files if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
    found: dict[str, list[Path]] = {}
    orphan_masks: list[Path] = []
    for p in sorted(files):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            found.setdefault(p.stem, []).append(p)
        elif p.is_dir() and _has_frame_images(p):
            images = [f.name for f in p.iterdir() if f.is_file() and f.suffix.lower() in FRAME_SUFFIXES]
            looks_like_masks = all(_FRAME_MASK_RE.match(n) for n in images)
            if looks_like_masks and p.name in file_stems:
                continue  # reference masks `<name>/frame{i}.png` of the video file `<name>.<ext>`
            if looks_like_masks and not (folder / f"{p.name}.txt").exists():
                orphan_masks.append(p)  # reference masks of a video that is not there
            else:
                found.setdefault(p.name, []).append(p)
    return found, orphan_masks


def read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: caption is not UTF-8 text ({e})") from e
    return " ".join(text.split())


def _mask_shape(masks: Path) -> tuple[int, int, int]:
    """(F, H, W) of a mask file/folder, reading only headers where the layout allows."""
    from PIL import Image

    if masks.is_dir():
        files = mask_io.frame_files(masks)
        with Image.open(files[0]) as im:
            w, h = im.size
        return len(files), h, w
    m1, _ = mask_io.load_compact_masks(masks)
    return tuple(m1.shape)  # type: ignore[return-value]


def _check_entry(name: str, video: Path, folder: Path, full: bool) -> tuple[VideoEntry | None, list[str]]:
    problems: list[str] = []
    caption_file = folder / f"{name}.txt"
    caption = ""
    if not caption_file.is_file():
        problems.append(f"{video}: no caption file {caption_file.name}")
    else:
        caption = read_caption(caption_file)
        if not caption:
            problems.append(f"{caption_file}: caption is empty")
    masks = mask_io.find_masks(video)
    if masks is None:
        where = f"{name}{mask_io.COMPACT_SUFFIX} or {name}/masks/frame{{i}}.png" if video.is_dir() else (
            f"{name}{mask_io.COMPACT_SUFFIX} or {name}/frame{{i}}.png"
        )
        problems.append(f"{video}: no masks ({where})")
    try:
        info = probe_video(video)
    except VideoError as e:
        problems.append(str(e))
        return None, problems
    if masks is not None:
        # MaskFormatError (unreadable file, other colours) goes through as it is: it names the file.
        mf, mh, mw = _mask_shape(masks)
        if full:
            mask_io.load_masks(masks)
        if (mf, mh, mw) != (info.num_frames, info.height, info.width):
            what = []
            if mf != info.num_frames:
                what.append(f"{mf} mask frames vs {info.num_frames} video frames")
            if (mh, mw) != (info.height, info.width):
                what.append(f"masks {mw}x{mh} vs video {info.width}x{info.height} (WxH)")
            problems.append(f"{masks} does not match {video}: {'; '.join(what)}")
    if problems:
        return None, problems
    return VideoEntry(name, video, caption, masks, info.num_frames, info.height, info.width), []


def scan_dataset(folder: str | os.PathLike, full: bool = False) -> list[VideoEntry]:
    """Validate a relation folder -> its videos, sorted by name. Raises DatasetError listing every
    problem; with full=True every mask frame is decoded too (colour check, MaskFormatError)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder; a dataset is one folder per relation")
    found, orphans = _video_candidates(folder)
    problems = [f"{p}: looks like a reference mask folder, but there is no video {p.name}.mp4/.gif/... or {p.name}.txt"
                for p in orphans]
    entries: list[VideoEntry] = []
    for name in sorted(found):
        paths = found[name]
        if len(paths) > 1:
            problems.append(f"{folder}: several videos named {name!r}: {', '.join(p.name for p in paths)}")
            continue
        entry, errs = _check_entry(name, paths[0], folder, full)
        problems += errs
        if entry is not None:
            entries.append(entry)
    if problems:
        raise DatasetError(f"{folder}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    if not entries:
        raise DatasetError(
            f"{folder}: no usable video; expected <name>{'/'.join(VIDEO_SUFFIXES)} or a frame folder <name>/, "
            f"each with <name>.txt and masks (<name>{mask_io.COMPACT_SUFFIX} or reference frame{{i}}.png)"
        )
    return entries


# ---------------------------------------------------------------- validation for training

def load_entry_masks(entry: VideoEntry) -> tuple[np.ndarray, np.ndarray]:
    """Both subjects' masks of an entry, bool [F, H, W], checked against its video's probe."""
    m1, m2 = mask_io.load_masks(entry.masks)  # MaskFormatError names the file and colours
    if m1.shape != (entry.num_frames, entry.height, entry.width):
        raise DatasetError(
            f"{entry.masks} does not match {entry.video}: masks {m1.shape} [F, H, W], "
            f"video {(entry.num_frames, entry.height, entry.width)}"
        )
    return m1, m2


def _validate_for_training(entries: Iterable[VideoEntry], num_frames: int) -> None:
    """Every check that can fail before anything is encoded or written."""
    short = [f"{e.video}: has {e.num_frames} frames, training needs {num_frames}" for e in entries
             if e.num_frames < num_frames]
    if short:
        raise DatasetError(f"{len(short)} video(s) too short:\n  - " + "\n  - ".join(short))
    missing = []
    for e in entries:
        m1, m2 = load_entry_masks(e)
        missing += _missing_subjects(e, m1[:num_frames], m2[:num_frames])
    if missing:
        raise DatasetError(f"{len(missing)} clip(s) with a subject missing on most frames:\n  - " + "\n  - ".join(missing))


def _missing_subjects(entry: VideoEntry, m1: np.ndarray, m2: np.ndarray) -> list[str]:
    """A subject whose mask is empty on most of the frames used for training cannot be learned."""
    return [
        f"{entry.masks} ({entry.video.name}): subject {c.subject} is empty on {len(c.empty)} of the {c.frames} "
        f"frames used for training ({100 * c.share:.0f} %: frames {mask_io.frame_ranges(c.empty)}); make its masks "
        "again (another prompt, a lower box threshold, per-frame mode)"
        for c in mask_io.mask_coverage(m1, m2) if c.mostly_empty
    ]


@dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset folder and the clip settings it was checked against (node output)."""

    folder: Path
    entries: tuple[VideoEntry, ...]
    num_frames: int
    size: tuple[int, int]  # (H, W)
    spec: BaseModelSpec | None = None  # the base model whose clip rules it was checked against (None: Mochi)

    def report(self) -> str:
        lines = [f"{self.folder}: {len(self.entries)} video(s), clips of {self.num_frames} frames at "
                 f"{self.size[0]}x{self.size[1]} (HxW)"]
        for e in self.entries:
            lines.append(f"  {e.name}: {e.video.name}, {e.num_frames} frames {e.width}x{e.height}, "
                         f"masks {e.masks.name}; \"{e.caption}\"")
        return "\n".join(lines)


def describe_dataset(folder: str | os.PathLike, num_frames: int, size: tuple[int, int],
                     spec: BaseModelSpec | None = None) -> DatasetSpec:
    """Full validation for training at (num_frames, size): everything prepare checks before encoding
    (the frame-count and size rules are the base model's, Mochi's by default)."""
    spec = spec or get_spec()
    spec.check_frame_count(num_frames)
    size = (int(size[0]), int(size[1]))
    spec.check_training_size(size)
    entries = scan_dataset(folder)
    _validate_for_training(entries, num_frames)
    return DatasetSpec(Path(folder), tuple(entries), num_frames, size, spec)


def folder_stamp(folder: str | os.PathLike) -> str:
    """Hash of names, sizes and times of everything in a dataset folder (changes when it changes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(_hidden(q) for q in p.relative_to(folder).parents if q.name) and not _hidden(p):
            st = p.stat()
            h.update(f"{p.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
