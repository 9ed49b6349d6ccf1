"""Mochi's latent format and time conventions (docs/method.md "Time and latent conventions").

Space and time: the VAE compresses 8x in space and 6x in time with a causal first frame: frame 0
becomes latent frame 0 on its own, then every group of 6 frames becomes one latent frame. A clip
must therefore have F = 6k + 1 frames. We require k >= 1 (F >= 7): a relation is a motion, a
single latent frame has none, and the relational contrastive loss needs at least two latent
frames. The transformer then cuts the latent grid into 2x2 patches, so a training clip's height
and width are multiples of 16.

Latent values: the VAE's raw latents are normalised per channel exactly as ComfyUI's Mochi latent
format does: (z - mean) / std, with diffusers' `AutoencoderKLMochi` default statistics (ComfyUI
uses the same numbers, scale factor 1).

Noise level: sigma in [0, 1], x_sigma = (1 - sigma) * z + sigma * eps. diffusers'
`MochiTransformer3DModel` takes `timestep = 1000 * (1 - sigma)` and predicts u = z - eps;
ComfyUI's Mochi (genmo's `AsymmDiTJoint`) takes sigma and predicts eps - z = -u.
"""

from __future__ import annotations

import torch

from ..basemodel import check_causal_frame_count, nearest_causal_frame_counts
from ..errors import DatasetError

TEMPORAL_COMPRESSION = 6
SPATIAL_COMPRESSION = 8
PATCH_SIZE = 2  # the transformer's patches on the latent grid
MIN_FRAMES = 1 + TEMPORAL_COMPRESSION  # 7: at least two latent frames
SIZE_MULTIPLE = SPATIAL_COMPRESSION * PATCH_SIZE  # 16: training height and width

# diffusers AutoencoderKLMochi config defaults == comfy.latent_formats.Mochi
MOCHI_LATENTS_MEAN: tuple[float, ...] = (
    -0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
    0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
    -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285,
)
MOCHI_LATENTS_STD: tuple[float, ...] = (
    0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041,
)
LATENT_CHANNELS = 12


# ---------------------------------------------------------------- frame counts and sizes

def nearest_valid_frame_counts(num_frames: int) -> tuple[int, int]:
    """The two valid clip lengths (6k + 1, k >= 1) closest to `num_frames`, smaller first."""
    return nearest_causal_frame_counts(num_frames, TEMPORAL_COMPRESSION)


def check_frame_count(num_frames: int) -> None:
    """Raise ValueError unless num_frames = 6k + 1 with k >= 1."""
    check_causal_frame_count(num_frames, TEMPORAL_COMPRESSION, "Mochi needs 6k + 1 frames with k >= 1 (7, 13, ..., 61, ..., 85)")


def latent_frame_count(num_frames: int) -> int:
    """Latent frames of a clip of `num_frames` frames: 1 + (F - 1) // 6 (after check_frame_count)."""
    check_frame_count(num_frames)
    return 1 + (num_frames - 1) // TEMPORAL_COMPRESSION


def check_training_size(size: tuple[int, int]) -> None:
    """Raise DatasetError unless (H, W) are positive multiples of 16 (8x VAE, then 2x2 patches)."""
    h, w = size
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise DatasetError(
            f"training size {h}x{w} (HxW): both must be positive multiples of {SIZE_MULTIPLE} "
            "(8x VAE downsampling, then the transformer's 2x2 patches)"
        )


# ---------------------------------------------------------------- latent values

def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if z.ndim not in (4, 5) or z.shape[-4] != LATENT_CHANNELS:
        raise ValueError(f"expected Mochi latents [B?, 12, T, h, w], got shape {tuple(z.shape)}")
    mean = torch.tensor(MOCHI_LATENTS_MEAN, dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)
    std = torch.tensor(MOCHI_LATENTS_STD, dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)
    return mean, std  # [12, 1, 1, 1]: broadcasts over an optional leading batch dim


def normalize_latents(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> ComfyUI's Mochi latent space: (z - mean) / std per channel."""
    mean, std = _stats(z)
    return (z - mean) / std


def denormalize_latents(z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Mochi latent space -> raw VAE latents (inverse of normalize_latents)."""
    mean, std = _stats(z)
    return z * std + mean


# ---------------------------------------------------------------- noise level

def diffusers_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """Noise level sigma -> the `timestep` diffusers' MochiTransformer3DModel takes: 1000 * (1 - sigma)."""
    return 1000.0 * (1.0 - sigma)
