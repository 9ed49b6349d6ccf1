"""Flow matching as the Mochi trainer uses it, and the mask-weighted loss (docs/method.md "Hybrid mask training").

Noise level sigma in [0, 1]:  x_sigma = (1 - sigma) * z + sigma * eps,  target u = z - eps
(docs/method.md "Time and latent conventions"; the model's timestep is mochi.latents.diffusers_timestep).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def noisy(z: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, target u) for latents z [B, C, T, h, w] and sigma [B]."""
    s = sigma.view(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    return (1 - s) * z + s * eps, z - eps


def masked_flow_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mask_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_rec = MSE(pred, u) + mask_weight * MSE(pred*M, u*M); both means over all elements.

    pred, target [B, C, T, h, w]; mask [B, T, h, w] (broadcast over channels).
    Returns (L_rec, plain MSE, masked MSE).
    """
    pred, target = pred.float(), target.float()
    m = mask.float().unsqueeze(1)  # [B, 1, T, h, w]
    mse = F.mse_loss(pred, target)
    masked = F.mse_loss(pred * m, target * m)
    return mse + mask_weight * masked, mse, masked
