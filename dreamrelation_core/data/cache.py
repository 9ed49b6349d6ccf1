"""The training cache: `prepare_dataset` encodes a dataset folder once; `load_prepared` reads it.

`prepare_dataset` checks every entry first (dataset.describe_dataset: nothing is written if any
input is bad), then fits each clip (trim, centre-crop, resize; masks follow), encodes it with the
VAE and its caption with T5, and writes `<cache>/<name>.safetensors` atomically, plus
`manifest.json`. Entries whose sources, settings and models are unchanged are skipped.

A cache file holds the VAE's raw posterior mean/logvar [C, T, h, w] (Mochi: C = 12), the caption's
text-encoder features and mask, and both subjects' latent masks [T, h, w]; `PreparedClip` is one
file read back. Its `base_model` metadata names the base model whose VAE made it (absent: Mochi).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..base_models import get_spec
from ..basemodel import BaseModelSpec
from ..errors import DatasetError
from ..fileio import remove_stale_temps, save_safetensors, write_text
from .dataset import VideoEntry, describe_dataset, load_entry_masks
from .encode import encode_captions, encode_frames
from .latent_masks import latent_grid, latent_mask
from .video import crop_masks, fit_clip, read_video

CACHE_FORMAT = "dreamrelation-prepared-1"
MANIFEST = "manifest.json"
DEFAULT_CACHE = ".dreamrelation_cache"  # inside the dataset folder; hidden, so scans skip it

Progress = Callable[[int, int, str], None]  # (entries done, total, name of the entry just done)


# ---------------------------------------------------------------- reading the cache

@dataclass
class PreparedClip:
    """One encoded training clip, as the trainer consumes it."""

    name: str
    caption: str
    mean: torch.Tensor  # [C, T, h, w] raw VAE posterior mean
    logvar: torch.Tensor  # [C, T, h, w]
    y_feat: torch.Tensor  # [L, D]
    y_mask: torch.Tensor  # [L] bool
    mask1: torch.Tensor  # [T, h, w] float32 in [0, 1]
    mask2: torch.Tensor  # [T, h, w]
    meta: dict[str, str] = field(default_factory=dict)
    spec: BaseModelSpec = field(default_factory=get_spec)  # the base model whose latents these are

    def sample_latents(self, generator: torch.Generator) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps, normalised to the latent space ComfyUI samples in [C, T, h, w]."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=generator.device)
        z = self.mean.float() + torch.exp(0.5 * self.logvar.float()) * eps.to(self.mean.device)
        return self.spec.normalize_latents(z)


_TENSOR_KEYS = ("mean", "logvar", "y_feat", "y_mask", "mask1", "mask2")


def _check_clip_shapes(path: Path, t: dict[str, torch.Tensor], spec: BaseModelSpec) -> None:
    mean, c = t["mean"], spec.latent_channels
    if mean.ndim != 4 or mean.shape[0] != c:
        raise DatasetError(f"{path}: key 'mean' has shape {tuple(mean.shape)}, expected [{c}, T, h, w]")
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
    try:
        spec = get_spec(meta.get("base_model", "mochi"))
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from None
    _check_clip_shapes(path, t, spec)
    return PreparedClip(
        name=meta.get("name", path.stem), caption=meta.get("caption", ""), mean=t["mean"].float(),
        logvar=t["logvar"].float(), y_feat=t["y_feat"].float(), y_mask=t["y_mask"].bool(),
        mask1=t["mask1"].float(), mask2=t["mask2"].float(), meta=meta, spec=spec,
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


# ---------------------------------------------------------------- writing the cache

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


def _json_write(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


@dataclass
class Encoders:
    """How `prepare` turns frames and captions into tensors. Built from a diffusers VAE and a
    transformers text encoder by default (`Encoders.from_models`); the ComfyUI nodes build one from
    ComfyUI's own VAE and CLIP. `spec` is the base model the VAE belongs to: its frame and size
    rules, latent grid and latent normalisation apply."""

    encode_video: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]  # uint8 [F,H,W,3] -> mean, logvar [C,T,h,w]
    encode_text: Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]  # -> [N,L,D] float, [N,L] bool
    tags: tuple[str, str]  # identities of the two models: a change re-encodes the cache
    spec: BaseModelSpec = field(default_factory=get_spec)
    # called once between the text pass (every caption to encode) and the video pass: the place to
    # unload the text encoder so that the VAE has the memory to itself
    after_text: Callable[[], None] | None = None

    @classmethod
    def from_models(cls, vae, text_encoder, tokenizer, spec: BaseModelSpec | None = None) -> Encoders:
        spec = spec or get_spec()
        return cls(
            encode_video=lambda frames: encode_frames(vae, frames, spec),
            encode_text=lambda captions, n: encode_captions(text_encoder, tokenizer, captions, n),
            tags=(model_tag(vae), model_tag(text_encoder)),
            spec=spec,
        )


def encode_entry(
    entry: VideoEntry, encoders: Encoders, num_frames: int, size: tuple[int, int], max_text_len: int,
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fit, encode and turn the masks of one entry into the tensors of its cache file (`text`: its
    caption already encoded, [1, L, D] and [1, L])."""
    frames = read_video(entry.video, max_frames=num_frames)
    if frames.shape[1:3] != (entry.height, entry.width):
        raise DatasetError(f"{entry.video}: decoded frames are {frames.shape[1:3]}, probe said {(entry.height, entry.width)}")
    m1, m2 = load_entry_masks(entry)
    spec = encoders.spec
    frames, _ = fit_clip(frames, None, num_frames, size, source=str(entry.video), spec=spec)  # masks: checked against the video
    mean, logvar = encoders.encode_video(frames)  # [C, T, h, w] each
    y_feat, y_mask = text if text is not None else encoders.encode_text([entry.caption], max_text_len)  # [1, L, D], [1, L]
    # Marked from the source-resolution masks after the frames' crop, straight onto the latent grid
    # (docs/method.md "Latent masks").
    c1, c2 = crop_masks((m1, m2), num_frames, size, source=str(entry.video))
    grid = latent_grid(size, spec)
    lm1, lm2 = latent_mask(c1, grid, spec), latent_mask(c2, grid, spec)  # [T, h, w]
    if lm1.shape != mean.shape[1:]:
        raise DatasetError(f"{entry.video}: latent masks {tuple(lm1.shape)} do not match latents {tuple(mean.shape[1:])}")
    tensors = {"mean": mean, "logvar": logvar, "y_feat": y_feat[0], "y_mask": y_mask[0], "mask1": lm1, "mask2": lm2}
    meta = {
        "format": CACHE_FORMAT, "name": entry.name, "caption": entry.caption, "source": str(entry.video),
        "masks": str(entry.masks), "num_frames": str(num_frames), "size": f"{size[0]}x{size[1]}",
        "max_text_len": str(max_text_len), "latents": "raw VAE posterior mean/logvar (normalise after sampling)",
        "base_model": spec.name,
    }
    return tensors, meta


def prepare_dataset(
    folder: str | os.PathLike,
    cache_dir: str | os.PathLike,
    encoders: Encoders,
    num_frames: int,
    size: tuple[int, int],
    max_text_len: int = 256,
    *,
    progress: Progress | None = None,
) -> list[Path]:
    """Encode every video of `folder` once into `<cache_dir>/<name>.safetensors`; returns those paths.

    `encoders` (e.g. `Encoders.from_models(vae, text_encoder, tokenizer, spec)`, or ComfyUI's own VAE
    and CLIP in the nodes) also names the base model whose rules apply."""
    described = describe_dataset(folder, num_frames, size, encoders.spec)
    entries, size = described.entries, described.size
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Temporary files of a prepare that was killed mid-write (an hour old: not one running now).
    remove_stale_temps(cache_dir, older_than_s=3600)
    settings = {"num_frames": num_frames, "size": list(size), "max_text_len": max_text_len}
    tags = encoders.tags
    out = [cache_dir / f"{entry.name}.safetensors" for entry in entries]
    prints = [_fingerprint(entry, settings, tags) for entry in entries]
    todo = [i for i, (path, fp) in enumerate(zip(out, prints)) if not _up_to_date(path, fp)]
    # Two passes, so that the text encoder and the VAE never need memory at the same time.
    texts = {i: encoders.encode_text([entries[i].caption], max_text_len) for i in todo}  # [1, L, D], [1, L]
    if todo and encoders.after_text is not None:
        encoders.after_text()
    for i, (entry, path) in enumerate(zip(entries, out)):
        if i in texts:
            tensors, meta = encode_entry(entry, encoders, num_frames, size, max_text_len, texts.pop(i))
            meta["fingerprint"] = prints[i]
            save_safetensors(path, tensors, meta)
        if progress is not None:
            progress(i + 1, len(entries), entry.name)
    _json_write(cache_dir / MANIFEST, {
        "format": CACHE_FORMAT, "dataset": str(Path(folder).resolve()), **settings,
        "clips": [{"name": e.name, "file": p.name, "caption": e.caption, "source": str(e.video)}
                  for e, p in zip(entries, out)],
    })
    return out
