"""Text-to-video sampling with a relation LoRA on the diffusers Mochi transformer (core side).

Relation + ffn adapters only; subject LoRAs are never loaded. Classifier-free guidance with an
empty (all-masked) negative prompt, Mochi's linear-quadratic sigma schedule, Euler steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .lora import peft_triplet as triplet
from .lora.layout import INFERENCE_ADAPTERS, LoraSet
from .training.flow import diffusers_timestep, linear_quadratic_sigmas, sample


def apply_relation_lora(model: torch.nn.Module, lora: LoraSet) -> torch.nn.Module:
    """Add the triplet to a frozen base model and load the relation + ffn weights of `lora`.

    Subject adapters exist in the model (zero B) but stay inactive and empty."""
    rel = lora.only(INFERENCE_ADAPTERS)
    if "relation" not in rel.adapters:
        raise ValueError("the LoRA has no 'relation' adapter")
    ranks = {a: rel.rank.get(a, rel.rank["relation"]) for a in ("relation", "subject1", "subject2", "ffn")}
    alphas = {a: rel.alpha.get(a, rel.alpha["relation"]) for a in ranks}
    triplet.add_triplet(model, rank=ranks, alpha=alphas)
    triplet.load_lora_set(model, rel)
    triplet.activate_inference(model)
    return model.eval()


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
    """Normalised latents [1, 12, T, h, w] (ComfyUI's Mochi latent space)."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 12, *shape), generator=g).to(dev)
    y = torch.cat([torch.zeros_like(y_feat), y_feat]).to(dev)  # [2, L, D]: uncond, cond
    ym = torch.cat([torch.zeros_like(y_mask), y_mask]).bool().to(dev)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = diffusers_timestep(torch.full((2,), sigma, device=dev))
        u = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=y, timestep=t,
                  encoder_attention_mask=ym, return_dict=False)[0].float()
        uncond, cond = u.chunk(2)
        return uncond + cfg * (cond - uncond)

    return sample(velocity, noise, linear_quadratic_sigmas(steps), callback)
