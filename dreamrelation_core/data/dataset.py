"""Relation dataset folders: scan + validation, `prepare` (encode once into a cache), PreparedClip.

A dataset is one folder per relation. For every video `<name>`:
- the video: `<name>.mp4` / `.webm` / `.mkv` / `.mov` / `.gif`, or a frame folder `<name>/` of
  numbered `.png` / `.jpg` images;
- its caption `<name>.txt` (UTF-8, whitespace collapsed);
- its masks (see mask_io): compact `<name>.masks.npz`, or reference colour PNGs in `<name>/`
  beside a video file, or in `<name>/masks/` inside a frame-folder video. Masks cover every frame
  of the video at the video's own resolution.
Hidden entries (starting with "." or "_", e.g. the default cache `.dreamrelation_cache/`) are
skipped.

`prepare_dataset` checks every entry first (nothing is written if any input is bad), then fits
each clip (trim, centre-crop, resize; masks follow), encodes it with the VAE and its caption with
T5, and writes `<cache>/<name>.safetensors` atomically, plus `manifest.json`. Entries whose
sources, settings and models are unchanged are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from ..fileio import atomic_path
from . import mask_files as mask_io
from .encode import encode_captions, encode_frames, normalize_latents
from .latent_masks import check_frame_count, latent_grid, latent_mask
from .video import FRAME_SUFFIXES, VIDEO_SUFFIXES, VideoError, crop_masks, fit_clip, probe_video, read_video

CACHE_FORMAT = "dreamrelation-prepared-1"
MANIFEST = "manifest.json"
DEFAULT_CACHE = ".dreamrelation_cache"
_FRAME_MASK_RE = re.compile(r"^frame\d+\.png$", re.IGNORECASE)

Progress = Callable[[int, int, str], None]  # (entries done, total, name of the entry just done)


@dataclass(frozen=True)
class VideoEntry:
    """One training video of a dataset folder, after validation."""

    name: str
    video: Path  # file or frame folder
    caption_file: Path
    caption: str
    masks: Path  # compact .masks.npz or a reference frame{i}.png folder
    num_frames: int  # of the whole source video
    height: int
    width: int
    fps: float | None = None


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
    return VideoEntry(name, video, caption_file, caption, masks, info.num_frames, info.height, info.width, info.fps), []


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


# ---------------------------------------------------------------- prepared clips

@dataclass
class PreparedClip:
    """One encoded training clip, as the trainer consumes it."""

    name: str
    caption: str
    mean: torch.Tensor  # [12, T, h, w] raw VAE posterior mean
    logvar: torch.Tensor  # [12, T, h, w]
    y_feat: torch.Tensor  # [L, D]
    y_mask: torch.Tensor  # [L] bool
    mask1: torch.Tensor  # [T, h, w] float32 in [0, 1]
    mask2: torch.Tensor  # [T, h, w]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def relation_mask(self) -> torch.Tensor:
        return self.mask1 + self.mask2  # 2 where the subjects overlap, as the reference

    def sample_latents(self, generator: torch.Generator) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps, normalised to ComfyUI's Mochi latent space [12, T, h, w]."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=generator.device)
        z = self.mean.float() + torch.exp(0.5 * self.logvar.float()) * eps.to(self.mean.device)
        return normalize_latents(z)


def _safetensors_write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _json_write(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")


_TENSOR_KEYS = ("mean", "logvar", "y_feat", "y_mask", "mask1", "mask2")


def _check_clip_shapes(path: Path, t: dict[str, torch.Tensor]) -> None:
    mean = t["mean"]
    if mean.ndim != 4 or mean.shape[0] != 12:
        raise DatasetError(f"{path}: key 'mean' has shape {tuple(mean.shape)}, expected [12, T, h, w]")
    expect = {"logvar": tuple(mean.shape), "mask1": tuple(mean.shape[1:]), "mask2": tuple(mean.shape[1:])}
    for k, shape in expect.items():
        if tuple(t[k].shape) != shape:
            raise DatasetError(f"{path}: key {k!r} has shape {tuple(t[k].shape)}, expected {shape}")
    if t["y_feat"].ndim != 2 or t["y_mask"].shape != t["y_feat"].shape[:1]:
        raise DatasetError(
            f"{path}: y_feat {tuple(t['y_feat'].shape)} / y_mask {tuple(t['y_mask'].shape)}: expected [L, D] and [L]"
        )


def load_clip(path: str | os.PathLike) -> PreparedClip:
    """One cache file -> PreparedClip; DatasetError naming the file for anything missing or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: prepared clip missing; run `python -m dreamrelation_core prepare` again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
            missing = [k for k in _TENSOR_KEYS if k not in keys]
            if missing:
                raise DatasetError(f"{path}: not a prepared clip: missing key(s) {missing}")
            t = {k: f.get_tensor(k) for k in _TENSOR_KEYS}
    except DatasetError:
        raise
    except Exception as e:  # truncated file, bad header
        raise DatasetError(f"{path}: corrupt prepared clip ({type(e).__name__}: {e}); run prepare again") from e
    if meta.get("format") != CACHE_FORMAT:
        raise DatasetError(f"{path}: format {meta.get('format')!r}, expected {CACHE_FORMAT!r}; run prepare again")
    _check_clip_shapes(path, t)
    return PreparedClip(
        name=meta.get("name", path.stem), caption=meta.get("caption", ""), mean=t["mean"].float(),
        logvar=t["logvar"].float(), y_feat=t["y_feat"].float(), y_mask=t["y_mask"].bool(),
        mask1=t["mask1"].float(), mask2=t["mask2"].float(), meta=meta,
    )


def load_prepared(cache_dir: str | os.PathLike) -> list[PreparedClip]:
    """All clips listed in `<cache_dir>/manifest.json` (every .safetensors if there is none)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise DatasetError(f"{cache_dir}: no prepared cache here; run `python -m dreamrelation_core prepare` first")
    manifest = cache_dir / MANIFEST
    if manifest.is_file():
        try:
            files = [cache_dir / e["file"] for e in json.loads(manifest.read_text(encoding="utf-8"))["clips"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{manifest}: unreadable manifest ({type(e).__name__}: {e}); run prepare again") from e
    else:
        files = sorted(cache_dir.glob("*.safetensors"))
    if not files:
        raise DatasetError(f"{cache_dir}: no prepared clips; run `python -m dreamrelation_core prepare` first")
    return [load_clip(f) for f in files]


# ---------------------------------------------------------------- prepare

def model_tag(model: torch.nn.Module) -> str:
    """Cheap identity of a model: class, config and a few weight values (detects a swapped model)."""
    h = hashlib.sha256(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]) if params else ():
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _source_stamp(p: Path) -> list:
    """(name, size, mtime) of a file, or of every file directly inside a folder."""
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _fingerprint(entry: VideoEntry, settings: dict, model_tags: tuple[str, str]) -> str:
    stamp = {
        "video": _source_stamp(entry.video), "masks": _source_stamp(entry.masks), "caption": entry.caption,
        "settings": settings, "models": model_tags, "format": CACHE_FORMAT,
        "latent_masks": "marked from the source-resolution crop",  # clips cached before are encoded again
    }
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()


def _up_to_date(path: Path, fingerprint: str) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fingerprint
    except Exception:  # corrupt: rebuild it
        return False


def check_training_size(size: tuple[int, int]) -> None:
    h, w = size
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise DatasetError(
            f"training size {h}x{w} (HxW): both must be positive multiples of 16 "
            "(8x VAE downsampling, then the transformer's 2x2 patches)"
        )


def _load_entry_masks(entry: VideoEntry) -> tuple[np.ndarray, np.ndarray]:
    m1, m2 = mask_io.load_masks(entry.masks)  # MaskFormatError names the file and colours
    if m1.shape != (entry.num_frames, entry.height, entry.width):
        raise DatasetError(
            f"{entry.masks} does not match {entry.video}: masks {m1.shape} [F, H, W], "
            f"video {(entry.num_frames, entry.height, entry.width)}"
        )
    return m1, m2


def validate_for_training(entries: Iterable[VideoEntry], num_frames: int) -> None:
    """Every check that can fail before anything is encoded or written."""
    short = [f"{e.video}: has {e.num_frames} frames, training needs {num_frames}" for e in entries
             if e.num_frames < num_frames]
    if short:
        raise DatasetError(f"{len(short)} video(s) too short:\n  - " + "\n  - ".join(short))
    missing = []
    for e in entries:
        m1, m2 = _load_entry_masks(e)
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


@dataclass
class Encoders:
    """How `prepare` turns frames and captions into tensors. Built from a diffusers VAE and a
    transformers T5 by default (`Encoders.from_models`); the ComfyUI nodes build one from
    ComfyUI's own VAE and CLIP."""

    encode_video: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]  # uint8 [F,H,W,3] -> mean, logvar [12,T,h,w]
    encode_text: Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]  # -> [N,L,D] float, [N,L] bool
    tags: tuple[str, str]  # identities of the two models: a change re-encodes the cache

    @classmethod
    def from_models(cls, vae, text_encoder, tokenizer) -> Encoders:
        return cls(
            encode_video=lambda frames: encode_frames(vae, frames),
            encode_text=lambda captions, n: encode_captions(text_encoder, tokenizer, captions, n),
            tags=(model_tag(vae), model_tag(text_encoder)),
        )


def encode_entry(
    entry: VideoEntry, encoders: Encoders, num_frames: int, size: tuple[int, int], max_text_len: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fit, encode and turn the masks of one entry into the tensors of its cache file."""
    frames = read_video(entry.video, max_frames=num_frames)
    if frames.shape[1:3] != (entry.height, entry.width):
        raise DatasetError(f"{entry.video}: decoded frames are {frames.shape[1:3]}, probe said {(entry.height, entry.width)}")
    m1, m2 = _load_entry_masks(entry)
    frames, _ = fit_clip(frames, None, num_frames, size, source=str(entry.video))  # masks: checked against the video
    mean, logvar = encoders.encode_video(frames)  # [12, T, h, w] each
    y_feat, y_mask = encoders.encode_text([entry.caption], max_text_len)  # [1, L, D], [1, L]
    # Marked from the source-resolution masks after the frames' crop, straight onto the latent grid.
    c1, c2 = crop_masks((m1, m2), num_frames, size, source=str(entry.video))
    lm1, lm2 = latent_mask(c1, latent_grid(size)), latent_mask(c2, latent_grid(size))  # [T, h, w]
    if lm1.shape != mean.shape[1:]:
        raise DatasetError(f"{entry.video}: latent masks {tuple(lm1.shape)} do not match latents {tuple(mean.shape[1:])}")
    tensors = {"mean": mean, "logvar": logvar, "y_feat": y_feat[0], "y_mask": y_mask[0], "mask1": lm1, "mask2": lm2}
    meta = {
        "format": CACHE_FORMAT, "name": entry.name, "caption": entry.caption, "source": str(entry.video),
        "masks": str(entry.masks), "num_frames": str(num_frames), "size": f"{size[0]}x{size[1]}",
        "max_text_len": str(max_text_len), "latents": "raw VAE posterior mean/logvar (normalise after sampling)",
    }
    return tensors, meta


def prepare_dataset(
    folder: str | os.PathLike,
    cache_dir: str | os.PathLike,
    vae,
    text_encoder,
    tokenizer,
    num_frames: int,
    size: tuple[int, int],
    max_text_len: int = 256,
    progress: Progress | None = None,
    encoders: Encoders | None = None,
) -> list[Path]:
    """Encode every video of `folder` once into `<cache_dir>/<name>.safetensors`; returns those paths.

    `encoders` replaces vae / text_encoder / tokenizer (pass None for those then)."""
    if encoders is None:
        encoders = Encoders.from_models(vae, text_encoder, tokenizer)
    check_frame_count(num_frames)
    size = (int(size[0]), int(size[1]))
    check_training_size(size)
    entries = scan_dataset(folder)
    validate_for_training(entries, num_frames)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {"num_frames": num_frames, "size": list(size), "max_text_len": max_text_len}
    tags = encoders.tags
    out: list[Path] = []
    for i, entry in enumerate(entries):
        path = cache_dir / f"{entry.name}.safetensors"
        fp = _fingerprint(entry, settings, tags)
        if not _up_to_date(path, fp):
            tensors, meta = encode_entry(entry, encoders, num_frames, size, max_text_len)
            meta["fingerprint"] = fp
            _safetensors_write(path, tensors, meta)
        out.append(path)
        if progress is not None:
            progress(i + 1, len(entries), entry.name)
    _json_write(cache_dir / MANIFEST, {
        "format": CACHE_FORMAT, "dataset": str(Path(folder).resolve()), **settings,
        "clips": [{"name": e.name, "file": p.name, "caption": e.caption, "source": str(e.video)}
                  for e, p in zip(entries, out)],
    })
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset folder and the clip settings it was checked against (node output)."""

    folder: Path
    entries: tuple[VideoEntry, ...]
    num_frames: int
    size: tuple[int, int]  # (H, W)

    def report(self) -> str:
        lines = [f"{self.folder}: {len(self.entries)} video(s), clips of {self.num_frames} frames at "
                 f"{self.size[0]}x{self.size[1]} (HxW)"]
        for e in self.entries:
            lines.append(f"  {e.name}: {e.video.name}, {e.num_frames} frames {e.width}x{e.height}, "
                         f"masks {e.masks.name}; \"{e.caption}\"")
        return "\n".join(lines)


def describe_dataset(folder: str | os.PathLike, num_frames: int, size: tuple[int, int]) -> DatasetSpec:
    """Full validation for training at (num_frames, size): everything prepare checks before encoding."""
    check_frame_count(num_frames)
    size = (int(size[0]), int(size[1]))
    check_training_size(size)
    entries = scan_dataset(folder)
    validate_for_training(entries, num_frames)
    return DatasetSpec(Path(folder), tuple(entries), num_frames, size)


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
