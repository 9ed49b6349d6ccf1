"""Flow matching as the Mochi trainer uses it, the mask-weighted loss, and a small sampler.

Noise level sigma in [0, 1]:  x_sigma = (1 - sigma) * z + sigma * eps,  target u = z - eps.
diffusers' MochiTransformer3DModel takes `timestep = 1000 * (1 - sigma)` and predicts u.
(ComfyUI's AsymmDiTJoint takes sigma and predicts eps - z = -u; see comfy_keys.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def noisy(z: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, target u) for latents z [B, C, T, h, w] and sigma [B]."""
    s = sigma.view(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    return (1 - s) * z + s * eps, z - eps


def diffusers_timestep(sigma: torch.Tensor) -> torch.Tensor:
    return 1000.0 * (1.0 - sigma)


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


def linear_quadratic_sigmas(num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> list[float]:
    """Mochi's sampling schedule: num_steps + 1 sigmas from 1 to 0.

    In t = 1 - sigma: linear from 0 to `threshold_noise` over the first `linear_steps` (default
    half), then the quadratic that continues with the same slope and reaches 1 at num_steps.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    lin = num_steps // 2 if linear_steps is None else linear_steps
    if num_steps == 1 or lin <= 0:
        return [1.0, 0.0]
    slope = threshold_noise / lin
    q = num_steps - lin
    a = (1.0 - threshold_noise - slope * q) / (q * q)
    ts = [i * slope for i in range(lin)] + [a * (i - lin) ** 2 + slope * (i - lin) + threshold_noise for i in range(lin, num_steps)]
    return [1.0 - t for t in ts] + [0.0]


@torch.no_grad()
def sample(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    sigmas: list[float],
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Euler integration of dx/dsigma = -u from sigma = sigmas[0] to sigmas[-1].

    `velocity(x, sigma)` returns the model's u = z - eps prediction (CFG already applied).
    """
    if sigmas[0] < 1.0:
        raise ValueError("sampling starts from pure noise: sigmas[0] must be 1")
    x = noise.clone()
    for i in range(len(sigmas) - 1):
        u = velocity(x, sigmas[i])
        x = x + (sigmas[i] - sigmas[i + 1]) * u
        if callback:
            callback(i + 1, len(sigmas) - 1)
    return x
