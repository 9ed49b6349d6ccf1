"""Text-to-video sampling with a relation LoRA on the diffusers Mochi transformer (core side).

Relation + ffn adapters only; subject LoRAs are never loaded. Classifier-free guidance with an
empty (all-masked) negative prompt, Mochi's linear-quadratic sigma schedule, Euler steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base_models import spec_of_model
from .errors import LoraFormatError
from .lora import peft_triplet as triplet
from .lora.layout import ADAPTERS, INFERENCE_ADAPTERS, LoraSet


def add_relation_lora(model: torch.nn.Module, lora: LoraSet) -> torch.nn.Module:
    """Add the triplet to a frozen base model and load the relation + ffn weights of `lora`.

    Subject adapters exist in the model (zero B) but stay inactive and empty. The relation
    adapter goes where the file has it (Q/K, or an ablation's placement)."""
    rel = lora.only(INFERENCE_ADAPTERS)
    if "relation" not in rel.adapters:
        raise LoraFormatError("the LoRA has no 'relation' adapter")
    spec = rel.spec  # the placements it was trained with, relation placement included
    if spec.relation_placement_of(rel.weights["relation"]) is None:
        raise LoraFormatError(f"the relation adapter sits on modules of no known {spec.name} relation placement "
                              f"{sorted(spec.relation_placements) or [spec.relation_placement]}")
    ranks = {a: rel.rank.get(a, rel.rank["relation"]) for a in ADAPTERS}
    alphas = {a: rel.alpha.get(a, rel.alpha["relation"]) for a in ranks}
    triplet.add_triplet(model, rank=ranks, alpha=alphas, spec=spec)
    triplet.load_lora_set(model, rel)
    triplet.activate_inference(model)
    return model.eval()


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


@torch.no_grad()
def generate_latents(
    model: torch.nn.Module,
    y_feat: torch.Tensor,  # [1, L, D]
    y_mask: torch.Tensor,  # [1, L] bool
    shape: tuple[int, int, int],  # latent (T, h, w)
    steps: int = 64,
    cfg: float = 6.0,
    seed: int = 0,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Normalised latents [1, C, T, h, w] (the latent space ComfyUI samples the base model in)."""
    spec = spec_of_model(model)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, spec.latent_channels, *shape), generator=g).to(dev)
    y = torch.cat([torch.zeros_like(y_feat), y_feat]).to(dev)  # [2, L, D]: uncond, cond
    ym = torch.cat([torch.zeros_like(y_mask), y_mask]).bool().to(dev)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        u = spec.predict(model, torch.cat([x, x]), y, ym, torch.full((2,), sigma, device=dev)).float()
        uncond, cond = u.chunk(2)
        return uncond + cfg * (cond - uncond)

    return sample(velocity, noise, linear_quadratic_sigmas(steps), callback)
