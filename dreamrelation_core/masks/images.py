"""Video frames as the mask models take them: uint8 RGB batches, ImageNet normalisation."""

from __future__ import annotations

import numpy as np
import torch

# Grounding DINO and SAM 2 were trained on images normalised with ImageNet's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_uint8_frames(frames: np.ndarray) -> None:
    """ValueError unless frames are uint8 [N, H, W, 3]."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], channels third from last ([3, H, W] or [N, 3, H, W]) -> (x - mean) / std."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std
