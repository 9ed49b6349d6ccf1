"""VAE encoding of training clips and T5 embedding of captions (the models come from the base model's loading).

Latents: the VAE's raw posterior mean/logvar are cached; the trainer samples z from them and
normalises it (the base model spec's `normalize_latents`) into the latent space ComfyUI samples in.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..base_models import get_spec
from ..basemodel import BaseModelSpec


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray, spec: BaseModelSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [F, H, W, 3] -> (mean, logvar), each float32 [C, T, H/s, W/s] on the CPU (raw VAE space;
    C, s and the frame rule are the base model's: Mochi 12, 8, 6k + 1)."""
    spec = spec or get_spec()
    s = spec.spatial_compression
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    spec.check_frame_count(frames.shape[0])
    if frames.shape[1] % s or frames.shape[2] % s:
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]} (HxW); the VAE needs multiples of {s}")
    device, dtype = _module_device_dtype(vae)
    x = torch.from_numpy(frames).to(device).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    x = x.to(dtype) / 127.5 - 1.0  # VAE input range [-1, 1]
    dist = vae.encode(x).latent_dist
    mean, logvar = dist.mean[0].float().cpu(), dist.logvar[0].float().cpu()  # [C, T, h, w]
    return mean.contiguous(), logvar.contiguous()


@torch.no_grad()
def encode_captions(
    text_encoder, tokenizer, captions: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y_feat float32 [N, L, D], y_mask bool [N, L]) with L = max_length, padded as Mochi does."""
    if isinstance(captions, str):
        captions = [captions]
    tok = tokenizer(
        list(captions), padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )
    full = tokenizer(list(captions), add_special_tokens=True)["input_ids"]
    for c, ids in zip(captions, full):
        if len(ids) > max_length:
            warnings.warn(f"caption truncated to {max_length} tokens (has {len(ids)}): {c[:80]!r}", stacklevel=2)
    device, _ = _module_device_dtype(text_encoder)
    ids = tok["input_ids"].to(device)  # [N, L]
    mask = tok["attention_mask"].to(device).bool()  # [N, L]
    feat = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [N, L, D]
    return feat.float().cpu(), mask.cpu()
