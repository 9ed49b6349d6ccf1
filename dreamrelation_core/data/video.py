"""Read training videos and fit them (with their masks) to the training clip size.

Accepted videos:
- `.mp4` / `.webm` / `.mkv` / `.mov` files, decoded with PyAV (FFmpeg);
- `.gif` files, decoded with Pillow. GIF writers merge identical consecutive frames into one
  frame with a longer duration (Pillow does), so a GIF is expanded back to a constant frame
  rate: each frame is repeated round(duration / base) times, base being its most common
  frame duration. A GIF written frame by frame therefore reads back with its frame count;
- frame folders: `.png` / `.jpg` / `.jpeg` images directly inside one folder, ordered by the
  last number in their file name (`frame2.png` before `frame10.png`, never string order).

`fit_clip` trims to the first `num_frames` frames, centre-crops to the target aspect ratio and
resizes. Masks get exactly the same crop and resize geometry as their frames (nearest pixel
centres for masks, area/bilinear for frames), which the reference implementation forgets.
`crop_masks` gives the masks after the same trim and crop but still at the source resolution:
the latent masks are marked from those, straight onto the latent grid (see latent_masks).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..base_models import get_spec
from ..basemodel import BaseModelSpec
from ..errors import VideoError
from .mask_files import as_bool_mask

STREAM_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov")
GIF_SUFFIXES = (".gif",)
VIDEO_SUFFIXES = STREAM_SUFFIXES + GIF_SUFFIXES
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
_NUMBER_RE = re.compile(r"(\d+)")


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds, found without decoding every frame where the format allows."""

    num_frames: int
    height: int
    width: int
    fps: float | None


def is_video_path(path: str | os.PathLike) -> bool:
    """A file with a video suffix, or a folder holding at least one frame image."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() in VIDEO_SUFFIXES
    return p.is_dir() and any(f.is_file() and f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir())


def frame_folder_files(folder: str | os.PathLike) -> list[Path]:
    """Frame images of a frame-folder video, sorted by the last number in each file name."""
    folder = Path(folder)
    numbered: list[tuple[int, Path]] = []
    for p in folder.iterdir():
        if not (p.is_file() and p.suffix.lower() in FRAME_SUFFIXES):
            continue
        nums = _NUMBER_RE.findall(p.stem)
        if not nums:
            raise VideoError(f"{p}: frame image without a frame number in its name (expected e.g. frame12.png)")
        numbered.append((int(nums[-1]), p))
    if not numbered:
        raise VideoError(f"{folder}: no {'/'.join(FRAME_SUFFIXES)} frame images in this folder")
    numbered.sort(key=lambda t: t[0])
    for (a, pa), (b, pb) in zip(numbered, numbered[1:]):
        if a == b:
            raise VideoError(f"{folder}: {pa.name} and {pb.name} carry the same frame number {a}")
    return [p for _, p in numbered]


def _gif_repeats(durations: list[int | None]) -> list[int]:
    """How many constant-rate frames each GIF frame stands for (missing/0 duration = 1)."""
    known = [d for d in durations if d]
    if not known:
        return [1] * len(durations)
    base = Counter(known).most_common(1)[0][0]
    return [max(1, round(d / base)) if d else 1 for d in durations]


def _gif_base_duration(durations: list[int | None]) -> int | None:
    known = [d for d in durations if d]
    return Counter(known).most_common(1)[0][0] if known else None


def _gif_durations(path: Path) -> list[int | None]:
    from PIL import Image

    out = []
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            out.append(im.info.get("duration"))
    return out


def _read_gif(path: Path, max_frames: int | None) -> np.ndarray:
    from PIL import Image, ImageSequence

    frames: list[np.ndarray] = []
    with Image.open(path) as im:
        durations = []
        for fr in ImageSequence.Iterator(im):
            durations.append(fr.info.get("duration"))
            frames.append(np.asarray(fr.convert("RGB")))
            if max_frames is not None and len(frames) >= max_frames:
                break  # each frame repeats >= 1 time: enough source frames already
    reps = _gif_repeats(durations)
    out = np.repeat(np.stack(frames), reps, axis=0)  # [F, H, W, 3]
    return out if max_frames is None else out[:max_frames]


def _open_stream(path: Path):
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # FFmpeg errors: unreadable or not a video
        raise VideoError(f"{path}: cannot open as a video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream")
    return container


def _read_stream(path: Path, max_frames: int | None) -> np.ndarray:
    container = _open_stream(path)
    frames: list[np.ndarray] = []
    try:
        for fr in container.decode(video=0):
            frames.append(fr.to_ndarray(format="rgb24"))  # [H, W, 3] uint8
            if max_frames is not None and len(frames) >= max_frames:
                break
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"{path}: decoding failed after {len(frames)} frames ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if not frames:
        raise VideoError(f"{path}: no frames could be decoded")
    return np.stack(frames)


def _read_frame_folder(folder: Path, max_frames: int | None) -> np.ndarray:
    from PIL import Image

    files = frame_folder_files(folder)
    if max_frames is not None:
        files = files[:max_frames]
    frames = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if frames and a.shape != frames[0].shape:
            raise VideoError(
                f"{f}: frame is {a.shape[1]}x{a.shape[0]}, earlier frames are {frames[0].shape[1]}x{frames[0].shape[0]}"
            )
        frames.append(a)
    return np.stack(frames)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Video file or frame folder -> uint8 [F, H, W, 3] RGB (only the first max_frames if given)."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such video file or frame folder")
    if p.is_dir():
        return _read_frame_folder(p, max_frames)
    suffix = p.suffix.lower()
    if suffix in GIF_SUFFIXES:
        try:
            return _read_gif(p, max_frames)
        except Exception as e:
            raise VideoError(f"{p}: cannot read as a GIF ({type(e).__name__}: {e})") from e
    if suffix in STREAM_SUFFIXES:
        return _read_stream(p, max_frames)
    raise VideoError(f"{p}: unsupported video type {suffix!r}; expected {', '.join(VIDEO_SUFFIXES)} or a frame folder")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and frame rate, decoding as little as the format allows."""
    from PIL import Image

    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such video file or frame folder")
    if p.is_dir():
        files = frame_folder_files(p)
        with Image.open(files[0]) as im:
            w, h = im.size
        return VideoInfo(len(files), h, w, None)
    suffix = p.suffix.lower()
    if suffix in GIF_SUFFIXES:
        try:
            durations = _gif_durations(p)
            with Image.open(p) as im:
                w, h = im.size
        except Exception as e:
            raise VideoError(f"{p}: cannot read as a GIF ({type(e).__name__}: {e})") from e
        base = _gif_base_duration(durations)
        return VideoInfo(sum(_gif_repeats(durations)), h, w, 1000.0 / base if base else None)
    if suffix not in STREAM_SUFFIXES:
        raise VideoError(f"{p}: unsupported video type {suffix!r}; expected {', '.join(VIDEO_SUFFIXES)} or a frame folder")
    container = _open_stream(p)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        w, h = stream.codec_context.width, stream.codec_context.height
        # Container frame counts are missing in WebM (0) and can be wrong elsewhere: count packets.
        n = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
    except Exception as e:
        raise VideoError(f"{p}: cannot read the video stream ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    return VideoInfo(n, h, w, fps)


def crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Centred (top, left, crop_h, crop_w) with the aspect ratio of size (H, W)."""
    th, tw = size
    if width * th > height * tw:  # source wider than target: crop columns
        cw = max(1, round(height * tw / th))
        return 0, (width - cw) // 2, height, cw
    ch = max(1, round(width * th / tw))
    return (height - ch) // 2, 0, ch, width


def _resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [F, h, w, 3] -> uint8 [F, H, W, 3]: area when shrinking, bilinear when enlarging."""
    if frames.shape[1:3] == tuple(size):
        return frames
    out = []
    shrinking = frames.shape[1] >= size[0] and frames.shape[2] >= size[1]
    for chunk in np.array_split(frames, max(1, len(frames) // 16)):  # bounded float memory
        x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float()  # [f, 3, h, w]
        if shrinking:
            y = F.interpolate(x, size=size, mode="area")
        else:
            y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [F, h, w] -> bool [F, H, W], nearest pixel centre (same geometry as the frames)."""
    if mask.shape[1:] == tuple(size):
        return mask
    x = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.uint8)[:, None]  # [F, 1, h, w]
    return F.interpolate(x, size=size, mode="nearest-exact")[:, 0].bool().numpy()


def crop_masks(
    masks: tuple[np.ndarray, np.ndarray], num_frames: int, size: tuple[int, int], source: str = "video"
) -> tuple[np.ndarray, np.ndarray]:
    """The first num_frames of bool [F, H0, W0] masks, centre-cropped to size's aspect ratio exactly
    as fit_clip crops the frames, at the source resolution (no resize)."""
    m1, m2 = (as_bool_mask(m, source, f"subject{k}") for k, m in enumerate(masks, 1))
    if m1.ndim != 3 or m1.shape != m2.shape:
        raise VideoError(f"{source}: subject masks have shapes {m1.shape} and {m2.shape}, expected two [F, H, W]")
    if m1.shape[0] < num_frames:
        raise VideoError(f"{source}: masks cover {m1.shape[0]} frames, training needs {num_frames}")
    top, left, ch, cw = crop_box(m1.shape[1], m1.shape[2], size)
    return tuple(m[:num_frames, top : top + ch, left : left + cw] for m in (m1, m2))  # type: ignore[return-value]


def fit_clip(
    frames: np.ndarray,
    masks: tuple[np.ndarray, np.ndarray] | None,
    num_frames: int,
    size: tuple[int, int],
    source: str = "video",
    spec: BaseModelSpec | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Trim to the first num_frames, centre-crop to size's aspect ratio, resize to size (H, W).

    num_frames and (H, W) follow the base model's training clip rules (`spec`, Mochi's by default:
    6k + 1 frames, multiples of 16).

    frames uint8 [F, H0, W0, 3]; masks bool [F, H0, W0] each (same F, H0, W0 as frames).
    Returns frames uint8 [num_frames, H, W, 3] and masks bool [num_frames, H, W].
    """
    spec = spec or get_spec()
    spec.check_frame_count(num_frames)
    spec.check_training_size(size)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"{source}: expected frames [F, H, W, 3], got shape {frames.shape}")
    if frames.shape[0] < num_frames:
        raise VideoError(f"{source}: has {frames.shape[0]} frames, training needs {num_frames}")
    if masks is not None:
        for k, m in enumerate(masks, 1):
            if m.shape != frames.shape[:3]:
                raise VideoError(
                    f"{source}: subject {k} masks have shape {m.shape} [F, H, W], frames are {frames.shape[:3]}"
                )
    top, left, ch, cw = crop_box(frames.shape[1], frames.shape[2], size)
    out = _resize_frames(frames[:num_frames, top : top + ch, left : left + cw], size)
    if masks is None:
        return out, None
    fitted = tuple(_resize_mask(m, size) for m in crop_masks(masks, num_frames, size, source))
    return out, fitted  # type: ignore[return-value]
