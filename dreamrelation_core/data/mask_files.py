"""Per-video subject masks on disk, in the two layouts the dataset accepts.

Reference layout (ali-vilab/DreamRelation): a folder `<name>/` beside the video with one
`frame{i}.png` per frame, 8-bit RGB at the video's resolution, black background, subject 1 in
(102, 221, 225) and subject 2 in (179, 62, 234). Frames are sorted by their number, not as
strings (frame10 after frame9). A PNG holds one colour per pixel: where the subjects overlap,
subject 1's colour is written, so overlaps are lost in this layout.

Compact layout (ours): one `<name>.masks.npz` holding two boolean arrays `subject1` and
`subject2` of shape [F, H, W]; exact, overlaps kept. Loaded with `allow_pickle=False`.

One rule turns any mask array into booleans, everywhere (files, the latent masks, the nodes):
`as_bool_mask` - boolean arrays as they are, numbers that are finite and in [0, 1] thresholded at
0.5 (> 0.5 is the subject); anything else (NaN, inf, -1, 255, text) is refused naming the file,
the array and the offending value.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MaskExtractionError, MaskFormatError
from ..fileio import atomic_file, disk_full_error, is_disk_full

# A subject whose mask is empty on more than this share of the frames is "missing": mask extraction
# fails, saving refuses to replace better masks with such masks, the dataset refuses the clip.
MOSTLY_EMPTY = 0.5
SUBJECT_COLOURS: tuple[tuple[int, int, int], tuple[int, int, int]] = ((102, 221, 225), (179, 62, 234))
COMPACT_SUFFIX = ".masks.npz"
_FRAME_RE = re.compile(r"^frame(\d+)\.png$", re.IGNORECASE)


MASK_THRESHOLD = 0.5


def as_bool_mask(array, where: str, name: str = "mask") -> np.ndarray:
    """The one mask rule (module docstring): bool as is; finite numbers in [0, 1] -> value > 0.5.
    Raises MaskFormatError naming `where` (file / input), the array `name` and the first bad value."""
    a = np.asarray(array)
    if a.dtype == bool:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise MaskFormatError(f"{where}: mask array {name!r} holds {a.dtype} values; expected booleans, or numbers "
                              "in [0, 1]")
    if a.size:
        bad = ~np.isfinite(a) | (a < 0) | (a > 1) if np.issubdtype(a.dtype, np.floating) else (a < 0) | (a > 1)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            value = a[idx].item()
            hint = " (a 0-255 mask? divide it by 255)" if np.isfinite(value) and value > 1 and a.max() <= 255 else ""
            raise MaskFormatError(
                f"{where}: mask array {name!r} ({a.dtype}, shape {tuple(a.shape)}) holds {value!r} at {list(idx)} "
                f"({int(bad.sum())} such value(s)); masks are booleans, or finite numbers in [0, 1] read as the "
                f"subject where > {MASK_THRESHOLD}{hint}"
            )
    return a > MASK_THRESHOLD


def _check_stacks(m1: np.ndarray, m2: np.ndarray, where: str) -> None:
    if m1.ndim != 3 or m1.shape != m2.shape:
        raise MaskFormatError(
            f"{where}: expected two mask stacks of the same shape [F, H, W], got {m1.shape} and {m2.shape}"
        )


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """`frame{i}.png` files of a reference mask folder, sorted by i as a number."""
    folder = Path(folder)
    found = []
    for p in folder.iterdir():
        m = _FRAME_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise MaskFormatError(f"{folder}: no frame{{i}}.png mask files in this folder")
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def decode_colour_mask(rgb: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 colour-coded mask -> (subject1, subject2) boolean [H, W]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise MaskFormatError(f"{where}: expected an RGB image, got array of shape {rgb.shape}")
    m1 = np.all(rgb == SUBJECT_COLOURS[0], axis=-1)
    m2 = np.all(rgb == SUBJECT_COLOURS[1], axis=-1)
    bg = np.all(rgb == 0, axis=-1)
    other = ~(m1 | m2 | bg)
    if other.any():
        colours = np.unique(rgb[other].reshape(-1, 3), axis=0)
        shown = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:8])
        more = f" and {len(colours) - 8} more" if len(colours) > 8 else ""
        raise MaskFormatError(
            f"{where}: {int(other.sum())} pixels have colours other than black and the two subject "
            f"colours {SUBJECT_COLOURS[0]} / {SUBJECT_COLOURS[1]}: found {shown}{more}"
        )
    return m1, m2


def load_reference_masks(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reference layout folder -> (subject1, subject2) boolean [F, H, W]."""
    files = frame_files(folder)
    s1, s2 = [], []
    size = None
    for f in files:
        with Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB"))
        if size is None:
            size = rgb.shape[:2]
        elif rgb.shape[:2] != size:
            raise MaskFormatError(f"{f}: mask is {rgb.shape[1]}x{rgb.shape[0]}, earlier frames are {size[1]}x{size[0]}")
        a, b = decode_colour_mask(rgb, str(f))
        s1.append(a)
        s2.append(b)
    return np.stack(s1), np.stack(s2)


def save_reference_masks(folder: str | os.PathLike, subject1: np.ndarray, subject2: np.ndarray) -> Path:
    """Write `frame{i}.png` (i from 0) into `folder`; overlaps get subject 1's colour.

    The new frames are written into a temporary folder beside it first and moved in only when all
    are written: a failed write (a full disk: DiskFullError) leaves the old frames as they were."""
    subject1, subject2 = as_bool_mask(subject1, str(folder), "subject1"), as_bool_mask(subject2, str(folder), "subject2")
    _check_stacks(subject1, subject2, str(folder))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        for i in range(subject1.shape[0]):
            rgb = np.zeros(subject1.shape[1:] + (3,), np.uint8)
            rgb[subject2[i]] = SUBJECT_COLOURS[1]
            rgb[subject1[i]] = SUBJECT_COLOURS[0]
            Image.fromarray(rgb).save(staging / f"frame{i}.png")
        for old in folder.glob("frame*.png"):
            if _FRAME_RE.match(old.name):
                old.unlink()
        for new in staging.iterdir():
            os.replace(new, folder / new.name)
    except OSError as e:
        if is_disk_full(e):
            written = sum(p.stat().st_size for p in staging.iterdir())
            raise disk_full_error(folder, None, written) from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_compact_masks(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """`<name>.masks.npz` -> (subject1, subject2) boolean [F, H, W]."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("subject1", "subject2") if k not in z.files]
            if missing:
                raise MaskFormatError(f"{path}: missing array(s) {missing}; found {z.files}")
            m1, m2 = z["subject1"], z["subject2"]
    except MaskFormatError:
        raise
    except Exception as e:  # zip/npy corruption, pickled objects
        raise MaskFormatError(f"{path}: not a readable mask file ({type(e).__name__}: {e})") from e
    _check_stacks(m1, m2, str(path))
    return as_bool_mask(m1, str(path), "subject1"), as_bool_mask(m2, str(path), "subject2")


def save_compact_masks(path: str | os.PathLike, subject1: np.ndarray, subject2: np.ndarray) -> Path:
    """Write `<name>.masks.npz` atomically (temp file, then rename; a full disk: DiskFullError)."""
    subject1, subject2 = as_bool_mask(subject1, str(path), "subject1"), as_bool_mask(subject2, str(path), "subject2")
    _check_stacks(subject1, subject2, str(path))
    with atomic_file(path, subject1.nbytes + subject2.nbytes) as f:  # hint: at most, uncompressed
        np.savez_compressed(f, subject1=subject1, subject2=subject2)
    return Path(path)


def find_masks(video: str | os.PathLike) -> Path | None:
    """Masks belonging to a video file or frame folder: compact file first, then reference folder."""
    video = Path(video)
    stem = video.name if video.is_dir() else video.stem
    compact = video.parent / f"{stem}{COMPACT_SUFFIX}"
    if compact.is_file():
        return compact
    if video.is_dir():
        # A frame-folder video keeps its reference masks in `<name>/masks/`.
        ref = video / "masks"
    else:
        ref = video.parent / stem
    if ref.is_dir() and any(_FRAME_RE.match(p.name) for p in ref.iterdir()):
        return ref
    return None


def load_masks(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Either layout -> (subject1, subject2) boolean [F, H, W]."""
    path = Path(path)
    return load_reference_masks(path) if path.is_dir() else load_compact_masks(path)


# ---------------------------------------------------------------------------------------------
# empty masks


def frame_ranges(frames: list[int] | tuple[int, ...] | np.ndarray, limit: int = 6) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (at most `limit` ranges, then '...')."""
    runs: list[list[int]] = []
    for f in (int(x) for x in frames):
        if runs and f == runs[-1][1] + 1:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    parts = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit]]
    return ", ".join(parts) + (", ..." if len(runs) > limit else "")


@dataclass(frozen=True)
class SubjectCoverage:
    """On which frames one subject's mask is empty."""

    subject: int  # 1 or 2
    frames: int  # frames in all
    empty: tuple[int, ...]  # indices of the frames where the mask has no pixel

    @property
    def share(self) -> float:
        return len(self.empty) / self.frames if self.frames else 0.0

    @property
    def mostly_empty(self) -> bool:
        return self.share > MOSTLY_EMPTY

    @property
    def all_empty(self) -> bool:
        return self.frames > 0 and len(self.empty) == self.frames

    def describe(self, label: str = "") -> str:
        """'subject 2 ('person'): empty on 40 of 61 frames (66 %): 0-12, 20-46'."""
        who = f"subject {self.subject}" + (f" ({label!r})" if label else "")
        if not self.empty:
            return f"{who}: present on all {self.frames} frames"
        return (f"{who}: empty on {len(self.empty)} of {self.frames} frames ({100 * self.share:.0f} %): "
                f"{frame_ranges(self.empty)}")


def mask_coverage(subject1: np.ndarray, subject2: np.ndarray) -> tuple[SubjectCoverage, SubjectCoverage]:
    """Per subject, the frames of a [F, H, W] mask stack that hold no pixel."""
    out = []
    for k, m in enumerate((subject1, subject2), 1):
        m = np.asarray(m)
        empty = np.flatnonzero(~m.reshape(len(m), -1).any(axis=1)) if m.ndim == 3 else np.array([], int)
        out.append(SubjectCoverage(k, len(m), tuple(int(i) for i in empty)))
    return out[0], out[1]


def save_masks(path: str | os.PathLike, subject1: np.ndarray, subject2: np.ndarray, overwrite: bool = False) -> Path:
    """Save masks in the layout the path names (`<name>.masks.npz` compact, else a reference
    `frame{i}.png` folder), refusing masks that would spoil a dataset:

    - a subject empty on every frame is never saved (MaskExtractionError);
    - existing masks are kept unless `overwrite` (FileExistsError), and even then are never
      replaced by masks that miss a subject on most frames where the saved ones did not
      (MaskExtractionError saying how many frames each covers).
    """
    path = Path(path)
    subject1, subject2 = as_bool_mask(subject1, str(path), "subject1"), as_bool_mask(subject2, str(path), "subject2")
    _check_stacks(subject1, subject2, str(path))
    new = mask_coverage(subject1, subject2)
    empty = [c for c in new if c.all_empty]
    if empty:
        raise MaskExtractionError(
            f"{path}: not saved: " + "; ".join(f"subject {c.subject}'s mask is empty on all {c.frames} frames"
                                                 for c in empty)
            + ". Make the masks again: another prompt, a lower box threshold, or per-frame mode"
        )
    compact = path.name.endswith(COMPACT_SUFFIX)
    exists = path.is_file() if compact else (path.is_dir() and any(_FRAME_RE.match(p.name) for p in path.iterdir()))
    if exists:
        if not overwrite:
            raise FileExistsError(f"{path} already holds masks; turn overwrite on to replace them")
        _refuse_worse(path, new)
    if compact:
        return save_compact_masks(path, subject1, subject2)
    return save_reference_masks(path, subject1, subject2)


def _refuse_worse(path: Path, new: tuple[SubjectCoverage, SubjectCoverage]) -> None:
    try:
        old = mask_coverage(*load_masks(path))
    except MaskFormatError:
        return  # unreadable masks are no good masks to keep
    worse = [(o, n) for o, n in zip(old, new) if n.mostly_empty and not o.mostly_empty]
    if worse:
        raise MaskExtractionError(
            f"{path}: not overwritten: the new masks miss "
            + "; ".join(f"subject {n.subject} on {len(n.empty)} of {n.frames} frames ({frame_ranges(n.empty)}), "
                        f"the saved ones on {len(o.empty)} of {o.frames}" for o, n in worse)
            + ". Keep the saved masks, or delete them first to replace them anyway"
        )
