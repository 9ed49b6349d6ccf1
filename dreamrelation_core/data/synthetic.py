"""A synthetic two-subject clip with exactly known masks, for the demo and the tests.

Subject 1 is a red square entering from the left, subject 2 a blue disc entering from the right,
on a plain grey background. They move towards each other at constant speed, touch (adjacent
pixels, never overlapping) at about 60 % of the clip and stay in contact to the end: a tiny
"approaching and touching" relation. The masks are the exact pixel sets each shape is drawn on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..base_models import get_spec
from ..basemodel import BaseModelSpec
from .mask_files import save_compact_masks

BACKGROUND = (128, 128, 128)
COLOUR1 = (220, 40, 40)  # red square
COLOUR2 = (40, 60, 220)  # blue disc
CAPTION = "A red square is approaching and touching a blue circle."
VIDEO_FORMATS = ("png", "gif", "mp4")


def _positions(num_frames: int, start: float, end: float, touch_at: float) -> np.ndarray:
    """[F] positions moving start -> end linearly until frame touch_at * (F - 1), then still."""
    t = np.clip(np.arange(num_frames) / max(1.0, touch_at * (num_frames - 1)), 0.0, 1.0)
    return np.rint(start + (end - start) * t).astype(int)


def synthetic_clip(
    num_frames: int = 25, size: tuple[int, int] = (64, 64), seed: int = 0, spec: BaseModelSpec | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> frames uint8 [F, H, W, 3], mask1 bool [F, H, W] (square), mask2 bool [F, H, W] (disc).

    `seed` varies the shapes' sizes and heights; the motion is always approach-then-touch.
    """
    (spec or get_spec()).check_frame_count(num_frames)
    H, W = size
    if H < 16 or W < 32:
        raise ValueError(f"synthetic clip size {H}x{W} (HxW) too small: need H >= 16 and W >= 32")
    rng = np.random.default_rng(seed)
    half = max(2, int(round(min(H, W) * rng.uniform(0.10, 0.14))))  # square half side
    radius = max(2, int(round(min(H, W) * rng.uniform(0.10, 0.14))))
    cy1 = int(rng.integers(half, H - half))
    cy2 = int(np.clip(cy1 + rng.integers(-half // 2, half // 2 + 1), radius, H - 1 - radius))

    # The square spans columns [x1 - half, x1 + half); the disc's leftmost pixel is cx2 - radius.
    # Contact = the disc's leftmost column right after the square's rightmost: cx2 - radius = x1 + half.
    meet = W // 2
    x1 = _positions(num_frames, half, meet - half, 0.6)  # [F] square centres
    cx2 = _positions(num_frames, W - 1 - radius, meet + radius, 0.6)  # [F] disc centres

    yy, xx = np.mgrid[0:H, 0:W]  # [H, W] pixel coordinates
    mask1 = np.zeros((num_frames, H, W), bool)
    mask2 = np.zeros((num_frames, H, W), bool)
    for f in range(num_frames):
        mask1[f] = (np.abs(yy - cy1 + 0.5) < half) & (xx >= x1[f] - half) & (xx < x1[f] + half)
        mask2[f] = (yy - cy2) ** 2 + (xx - cx2[f]) ** 2 <= radius**2
    assert not (mask1 & mask2).any(), "synthetic shapes overlap"  # by construction they only touch

    frames = np.empty((num_frames, H, W, 3), np.uint8)
    frames[:] = BACKGROUND
    frames[mask1] = COLOUR1
    frames[mask2] = COLOUR2
    return frames, mask1, mask2


def write_video(path: str | os.PathLike, frames: np.ndarray, fmt: str, fps: int = 8) -> Path:
    """Write frames as a PNG frame folder `path/` (lossless), a .gif (palette-exact for few
    colours) or an .mp4 (lossy). Returns the video's path (folder or file)."""
    import imageio.v3 as iio

    path = Path(path)
    if fmt == "png":
        from PIL import Image

        path.mkdir(parents=True, exist_ok=True)
        for i, fr in enumerate(frames):
            Image.fromarray(fr).save(path / f"{i:05d}.png")
        return path
    if fmt == "gif":
        path = path.with_suffix(".gif")
        # loop=0: play forever; duration in ms per frame.
        iio.imwrite(path, frames, extension=".gif", duration=1000 / fps, loop=0)
        return path
    if fmt == "mp4":
        path = path.with_suffix(".mp4")
        iio.imwrite(path, frames, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
        return path
    raise ValueError(f"unknown synthetic video format {fmt!r}; expected one of {VIDEO_FORMATS}")


def write_synthetic_dataset(
    folder: str | os.PathLike,
    num_videos: int = 2,
    num_frames: int = 25,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    video_format: str = "png",
    caption: str = CAPTION,
    spec: BaseModelSpec | None = None,
) -> Path:
    """Write a dataset folder in our layout: `clip{i}` video (frame folder by default), `clip{i}.txt`
    caption, `clip{i}.masks.npz` compact masks. Caption words are in tiny.TINY_VOCAB."""
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"unknown synthetic video format {video_format!r}; expected one of {VIDEO_FORMATS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_videos):
        frames, m1, m2 = synthetic_clip(num_frames, size, seed + i, spec)
        name = f"clip{i}"
        write_video(folder / name, frames, video_format)
        (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        save_compact_masks(folder / f"{name}.masks.npz", m1, m2)
    return folder
