"""A look at extracted subject masks: each subject tinted, its box and score drawn, notes shown."""

from __future__ import annotations

import numpy as np

from .extractor import SubjectMasks, as_uint8_frames

SUBJECT_TINTS = ((255, 140, 0), (0, 160, 255))  # orange, blue (the preview only)


def preview(frames: np.ndarray, result: SubjectMasks, alpha: float = 0.45) -> np.ndarray:
    """uint8 [F,H,W,3]: masks tinted in two colours, boxes and labels drawn, notes on the frame."""
    from PIL import Image, ImageDraw

    frames = as_uint8_frames(frames)
    out = frames.astype(np.float32)
    for s, m in enumerate((result.subject1, result.subject2)):
        tint = np.array(SUBJECT_TINTS[s], np.float32)
        out[m] = out[m] * (1 - alpha) + tint * alpha
    out = out.round().astype(np.uint8)
    extra = {}
    for note in result.notes:
        if note.startswith("frame ") and "ignored" in note:
            extra[int(note.split()[1].rstrip(":"))] = note.split(": ", 1)[1]
    for f in range(len(out)):
        im = Image.fromarray(out[f])
        draw = ImageDraw.Draw(im)
        for s in range(2):
            b = result.boxes[f, s]
            if np.isnan(b).any():
                continue
            label = f"subject {s + 1}"
            if not np.isnan(result.scores[f, s]):
                label += f" {result.scores[f, s]:.2f}"
            draw.rectangle([float(v) for v in b], outline=SUBJECT_TINTS[s], width=2)
            draw.text((float(b[0]) + 3, float(b[1]) + 2), label, fill=SUBJECT_TINTS[s])
        if f in extra:
            draw.text((4, im.height - 14), extra[f], fill=(255, 255, 0))
        out[f] = np.asarray(im)
    return out
