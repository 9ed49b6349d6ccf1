"""Appearance leakage: how much generated frames look like the training exemplars.

A relation LoRA should carry the interaction, not the people or the room of its few training
videos; hybrid mask training (docs/method.md "Hybrid mask training") exists to keep subject
appearance out of the relation LoRA. Leakage is measured with CLIP image embeddings: for every generated frame, its cosine
similarity to the nearest exemplar frame;
- leakage_max: the largest of these (the single most copied-looking frame),
- leakage_mean: their mean over the generated frames.
Both lie in [-1, 1]; compare them between runs with the same CLIP and exemplars (e.g. with and
without HMT, or against the CLIP similarity of unrelated videos), not as absolute numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import EvaluationError
from .clip_metrics import ClipEncoder
from .judge import sample_frame_indices

DEFAULT_EXEMPLAR_FRAMES = 16


@dataclass(frozen=True)
class Leakage:
    max: float
    mean: float


def leakage_scores(generated: torch.Tensor, exemplars: torch.Tensor) -> Leakage:
    """generated [F, D], exemplars [E, D] CLIP image embeddings -> nearest-exemplar similarity max/mean."""
    if generated.ndim != 2 or exemplars.ndim != 2 or generated.shape[1] != exemplars.shape[1]:
        raise EvaluationError(f"leakage: features {tuple(generated.shape)} and exemplar features "
                              f"{tuple(exemplars.shape)} must be [N, D] with one D")
    if not len(generated) or not len(exemplars):
        raise EvaluationError("leakage: needs at least one generated frame and one exemplar frame")
    g = torch.nn.functional.normalize(generated.float(), dim=-1)
    e = torch.nn.functional.normalize(exemplars.float(), dim=-1)
    nearest = (g @ e.T).max(dim=1).values
    return Leakage(float(nearest.max()), float(nearest.mean()))


def exemplar_features(encoder: ClipEncoder, videos: Iterable[tuple[str | os.PathLike, np.ndarray]],
                      frames_per_video: int = DEFAULT_EXEMPLAR_FRAMES) -> torch.Tensor:
    """CLIP embeddings [E, D] of `frames_per_video` frames spread over each exemplar video."""
    feats = []
    for _name, frames in videos:
        idx = sorted(set(sample_frame_indices(len(frames), frames_per_video)))
        feats.append(encoder.image_features(np.asarray(frames)[idx]))
    if not feats:
        raise EvaluationError("leakage: no exemplar videos")
    return torch.cat(feats)


def leakage(encoder: ClipEncoder, frames: np.ndarray, exemplars: torch.Tensor) -> Leakage:
    """Leakage of one generated clip against precomputed exemplar embeddings (`exemplar_features`)."""
    return leakage_scores(encoder.image_features(frames), exemplars)
