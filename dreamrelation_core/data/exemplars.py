"""Append one exemplar (frames, two subject masks, caption) to a relation dataset folder.

What is written is exactly what `dataset.scan_dataset` reads:
- the frames as a lossless PNG frame folder `<name>/frame0000.png ...` (no codec loss);
- the masks in the compact layout `<name>.masks.npz` (mask_files.save_masks, which refuses a
  subject empty on every frame);
- the caption `<name>.txt`.
The checks are the dataset's: 6k + 1 frames (the nearest valid lengths are named), masks of the
frames' count and size, a non-empty caption, a plain file name. The content hash of frames, masks
and caption is kept in a hidden index `.exemplars.json` (hidden entries are skipped by the dataset
scan), so adding the same exemplar twice finds it instead of writing a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base_models import get_spec
from ..basemodel import BaseModelSpec
from ..errors import DatasetError
from ..fileio import atomic_path, disk_full_error, is_disk_full
from . import mask_files as mask_io
from .video import VIDEO_SUFFIXES

INDEX_FILE = ".exemplars.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")
_FRAME_DIGITS = 4


@dataclass(frozen=True)
class AddedExemplar:
    """Where an exemplar is in the dataset, and whether this call wrote it."""

    folder: Path
    name: str
    digest: str
    added: bool  # False: the same content was already there under `name`
    report: str


def check_name(name: str, what: str = "clip name") -> str:
    """A plain file name (letters, digits, . _ - space; no folders, no leading dot) or DatasetError."""
    name = name.strip()
    if not name or not _NAME_RE.match(name) or name in (".", "..") or name.endswith("."):
        raise DatasetError(
            f"{what} {name!r}: use a plain name of letters, digits, '.', '_', '-' or spaces, starting with a "
            "letter or digit, without folders ('/', '\\') or other path characters"
        )
    return name


def check_dataset_name(dataset: str) -> str:
    """A dataset folder: a relative path of plain names ('relations/shaking_hands'), no '..'."""
    text = dataset.strip().replace("\\", "/")
    if text.startswith("/"):
        raise DatasetError(f"dataset {dataset!r}: give a folder name inside ComfyUI's input folder, not an absolute path")
    parts = [p for p in text.split("/") if p]
    if not parts:
        raise DatasetError("dataset name is empty: give the dataset folder's name, e.g. relations/shaking_hands")
    for p in parts:
        check_name(p, f"dataset folder part {p!r} of {dataset!r}:")
    return "/".join(parts)


def check_exemplar(frames: np.ndarray, subject1: np.ndarray, subject2: np.ndarray, caption: str,
                   spec: BaseModelSpec | None = None) -> str:
    """The dataset's checks on one exemplar; returns the caption with whitespace collapsed."""
    spec = spec or get_spec()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DatasetError(f"frames: expected uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    f = len(frames)
    try:
        spec.check_frame_count(f)
    except ValueError:
        lo, hi = spec.nearest_valid_frame_counts(f)
        raise DatasetError(
            f"frames: {f} frames; a {spec.display_name} training clip has {spec.frame_rule}: the nearest valid "
            f"lengths are {lo} and {hi}. Load {lo} or {hi} frames (the video loader's frame cap / skip)"
        ) from None
    for k, m in ((1, subject1), (2, subject2)):
        if m.shape != frames.shape[:3]:
            raise DatasetError(
                f"subject{k}_mask: shape {tuple(m.shape)} [F, H, W] does not match the frames "
                f"{tuple(frames.shape[:3])}; the masks must come from these frames"
            )
    text = " ".join(caption.split())
    if not text:
        raise DatasetError("caption is empty: describe the relation, e.g. 'a person shaking hands with a person'")
    return text


def content_hash(frames: np.ndarray, subject1: np.ndarray, subject2: np.ndarray, caption: str) -> str:
    """sha256 of the frames, both masks and the caption (shapes included, so no two layouts collide)."""
    h = hashlib.sha256()
    for a in (frames, mask_io.as_bool_mask(subject1, "subject1_mask", "subject1"),
              mask_io.as_bool_mask(subject2, "subject2_mask", "subject2")):
        h.update(f"{a.dtype}{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(caption.encode("utf-8"))
    return h.hexdigest()


def read_index(folder: Path) -> dict[str, str]:
    """digest -> exemplar name of a dataset folder (empty when there is no or no readable index)."""
    try:
        data = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_index(folder: Path, index: dict[str, str]) -> None:
    with atomic_path(folder / INDEX_FILE) as tmp:
        Path(tmp).write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")


def _taken(folder: Path, name: str) -> list[Path]:
    """Files of the dataset already using this exemplar name (video, frame folder, caption, masks)."""
    cands = [folder / name, folder / f"{name}.txt", folder / f"{name}{mask_io.COMPACT_SUFFIX}"]
    cands += [folder / f"{name}{suffix}" for suffix in VIDEO_SUFFIXES]
    return [p for p in cands if p.exists()]


def _write_frames(target: Path, frames: np.ndarray) -> None:
    """PNG frames into a hidden temporary folder, renamed into place at the end."""
    from PIL import Image

    tmp = target.parent / f".{target.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"frame{i:0{_FRAME_DIGITS}d}.png", compress_level=4)
        os.replace(tmp, target)
    except BaseException as e:
        written = sum(f.stat().st_size for f in tmp.glob("*.png")) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):  # PNGs are at most about the raw size: a fair upper bound of the need
            raise disk_full_error(target, int(frames.nbytes), written) from e
        raise


def add_exemplar(folder: str | os.PathLike, name: str | None, frames: np.ndarray, subject1: np.ndarray,
                 subject2: np.ndarray, caption: str) -> AddedExemplar:
    """Append one exemplar to `folder` (made if missing) under `name` (None / "": `clip_<hash>`).

    Refuses (DatasetError / MaskExtractionError) what the dataset would refuse, and a name already
    used by other content. The same content added again is found (by hash) and not written twice.
    """
    frames = np.asarray(frames)
    subject1 = mask_io.as_bool_mask(subject1, "subject1_mask", "subject1")
    subject2 = mask_io.as_bool_mask(subject2, "subject2_mask", "subject2")
    text = check_exemplar(frames, subject1, subject2, caption)
    digest = content_hash(frames, subject1, subject2, text)
    name = check_name(name) if name and name.strip() else f"clip_{digest[:10]}"
    folder = Path(folder)
    index = read_index(folder) if folder.is_dir() else {}
    known = index.get(digest)
    if known is not None and _taken(folder, known):
        return AddedExemplar(folder, known, digest, False,
                             f"{folder}: already in the dataset as {known!r} (same frames, masks and caption); "
                             "nothing written")
    used = _taken(folder, name)
    if used:
        raise DatasetError(
            f"{folder}: the name {name!r} is taken by other content ({', '.join(p.name for p in used)}); "
            "choose another clip_name, or leave it empty for a name from the content"
        )
    folder.mkdir(parents=True, exist_ok=True)
    cov = mask_io.mask_coverage(subject1, subject2)
    # Masks first: save_masks refuses a subject empty on every frame before anything else is written.
    masks, caption_file = folder / f"{name}{mask_io.COMPACT_SUFFIX}", folder / f"{name}.txt"
    try:
        mask_io.save_masks(masks, subject1, subject2)
        with atomic_path(caption_file) as tmp:
            Path(tmp).write_text(text + "\n", encoding="utf-8")
        _write_frames(folder / name, frames)
    except BaseException:
        # all or nothing: a clip with masks and a caption but no frames would break the dataset
        for p in (masks, caption_file):
            p.unlink(missing_ok=True)
        raise
    index[digest] = name
    _write_index(folder, index)
    f, h, w = subject1.shape
    lines = [f"{folder}: added {name!r}: {f} frames {w}x{h} as {name}/frame0000.png..., masks "
             f"{name}{mask_io.COMPACT_SUFFIX}, caption {name}.txt \"{text}\""]
    lines += ["  " + c.describe() + (" (the Dataset node refuses a clip whose subject is missing on most frames)"
                                     if c.mostly_empty else "") for c in cov]
    return AddedExemplar(folder, name, digest, True, "\n".join(lines))
