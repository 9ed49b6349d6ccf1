"""Wan's latent formats and time convention (docs/method.md "Wan 2.1 / 2.2").

Two VAEs, one rule in time. Both compress 4x in time with a causal first frame: frame 0 becomes
latent frame 0 on its own, then every group of 4 frames becomes one latent frame, so a clip has
F = 4k + 1 frames (we require k >= 1, F >= 5: a relation is a motion and the relational
contrastive loss needs two latent frames). The transformer cuts the latent grid into (1, 2, 2)
patches (one latent frame, 2x2 latent pixels).
- Wan 2.1 VAE (`wan_2.1_vae.safetensors`, also used by Wan 2.2 A14B): 16 channels, 8x in space,
  so a training clip's height and width are multiples of 16.
- Wan 2.2 VAE (`wan2.2_vae.safetensors`, used by Wan 2.2 TI2V 5B): 48 channels, 16x in space,
  so height and width are multiples of 32.

Latent values: the VAE's raw latents are normalised per channel, (z - mean) / std, with the
statistics of ComfyUI's `Wan21` / `Wan22` latent formats (scale factor 1). For 2.1 they are the
numbers diffusers' `AutoencoderKLWan` config carries by default (`latents_mean` / `latents_std`),
and diffusers' Wan pipeline normalises the same way; the parity test checks both equalities.
The channel count (16 or 48) picks the statistics.

Noise level and prediction (checked by running both models in tests/test_wan_model.py):
sigma in [0, 1], x_sigma = (1 - sigma) * z + sigma * eps (rectified flow). Unlike Mochi, both
libraries agree on Wan:
- diffusers' `WanTransformer3DModel` takes `timestep = 1000 * sigma` and predicts the velocity
  v = eps - z (its flow-matching scheduler steps x <- x + (sigma_next - sigma) * v);
- ComfyUI's Wan (`comfy.ldm.wan.model.WanModel` in a `WAN21` / `WAN22` model, model type FLOW,
  sampled through `ModelSamplingSD3`) feeds the model `1000 * sigma` and reads the same v:
  its denoised estimate is x_sigma - sigma * v.
The shift s of ComfyUI's `ModelSamplingSD3` (8: ComfyUI's Wan model config and its example
graphs) only moves where the sampler's sigmas lie, sigma = s*t / (1 + (s - 1)*t); the model call
is unchanged.
"""

from __future__ import annotations

import torch

from ..basemodel import check_causal_frame_count, nearest_causal_frame_counts
from ..errors import DatasetError

TEMPORAL_COMPRESSION = 4
PATCH_SIZE = (1, 2, 2)  # the transformer's patches on the latent grid (t, h, w)
MIN_FRAMES = 1 + TEMPORAL_COMPRESSION  # 5: at least two latent frames
WAN21_CHANNELS = 16
WAN22_CHANNELS = 48
SPATIAL_COMPRESSION = {WAN21_CHANNELS: 8, WAN22_CHANNELS: 16}  # by latent channels (= VAE)
TEXT_LEN = 512  # umT5 rows the transformer sees: real tokens, then zeros (no attention mask)
TIMESTEP_SCALE = 1000.0

# ComfyUI comfy.latent_formats.Wan21 == diffusers AutoencoderKLWan config defaults
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# ComfyUI comfy.latent_formats.Wan22 (the Wan 2.2 VAE's 48 channels)
WAN22_LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
_STATS = {
    WAN21_CHANNELS: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
    WAN22_CHANNELS: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD),
}


# ---------------------------------------------------------------- frame counts and sizes

def nearest_valid_frame_counts(num_frames: int) -> tuple[int, int]:
    """The two valid clip lengths (4k + 1, k >= 1) closest to `num_frames`, smaller first."""
    return nearest_causal_frame_counts(num_frames, TEMPORAL_COMPRESSION)


def check_frame_count(num_frames: int) -> None:
    """Raise ValueError unless num_frames = 4k + 1 with k >= 1."""
    check_causal_frame_count(num_frames, TEMPORAL_COMPRESSION, "Wan needs 4k + 1 frames with k >= 1 (5, 9, ..., 49, ..., 81)")


def latent_frame_count(num_frames: int) -> int:
    """Latent frames of a clip of `num_frames` frames: 1 + (F - 1) // 4 (after check_frame_count)."""
    check_frame_count(num_frames)
    return 1 + (num_frames - 1) // TEMPORAL_COMPRESSION


def spatial_compression(latent_channels: int = WAN21_CHANNELS) -> int:
    """Pixels per latent pixel of the VAE with this many latent channels: 8 (2.1 VAE) or 16 (2.2)."""
    if latent_channels not in SPATIAL_COMPRESSION:
        raise ValueError(f"{latent_channels} latent channels: Wan's VAEs have 16 (Wan 2.1) or 48 (Wan 2.2)")
    return SPATIAL_COMPRESSION[latent_channels]


def size_multiple(latent_channels: int = WAN21_CHANNELS) -> int:
    """Training height and width are multiples of this: VAE compression x the 2x2 patches (16 or 32)."""
    return spatial_compression(latent_channels) * PATCH_SIZE[1]


def check_training_size(size: tuple[int, int], latent_channels: int = WAN21_CHANNELS) -> None:
    """Raise DatasetError unless (H, W) are positive multiples of 16 (2.1 VAE) / 32 (2.2 VAE)."""
    h, w = size
    m = size_multiple(latent_channels)
    if h <= 0 or w <= 0 or h % m or w % m:
        raise DatasetError(
            f"training size {h}x{w} (HxW): both must be positive multiples of {m} for the Wan "
            f"{'2.1' if latent_channels == WAN21_CHANNELS else '2.2'} VAE "
            f"({spatial_compression(latent_channels)}x VAE downsampling, then the transformer's 2x2 patches)"
        )


# ---------------------------------------------------------------- latent values

def latent_stats(latent_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the Wan VAE with 16 (2.1) or 48 (2.2) latent channels."""
    if latent_channels not in _STATS:
        raise ValueError(f"{latent_channels} latent channels: Wan's VAEs have 16 (Wan 2.1) or 48 (Wan 2.2)")
    return _STATS[latent_channels]


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if z.ndim not in (4, 5) or z.shape[-4] not in _STATS:
        raise ValueError(f"expected Wan latents [B?, 16 or 48, T, h, w], got shape {tuple(z.shape)}")
    mean, std = _STATS[z.shape[-4]]
    mean_t = torch.tensor(mean, dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)
    std_t = torch.tensor(std, dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)
    return mean_t, std_t  # [C, 1, 1, 1]: broadcasts over an optional leading batch dim


def normalize_latents(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> ComfyUI's Wan latent space: (z - mean) / std per channel (16 or 48)."""
    mean, std = _stats(z)
    return (z - mean) / std


def denormalize_latents(z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Wan latent space -> raw VAE latents (inverse of normalize_latents)."""
    mean, std = _stats(z)
    return z * std + mean


# ---------------------------------------------------------------- noise level

def diffusers_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """Noise level sigma -> the `timestep` diffusers' WanTransformer3DModel takes: 1000 * sigma."""
    return TIMESTEP_SCALE * sigma


def denoised_from_velocity(x: torch.Tensor, sigma: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """ComfyUI's denoised estimate from the model's velocity v = eps - z: x_sigma - sigma * v."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim:
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    return x - sigma * v


def shift_sigma(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """ComfyUI's `ModelSamplingSD3` time shift: sigma = s*t / (1 + (s - 1)*t)."""
    return shift * t / (1 + (shift - 1) * t)
