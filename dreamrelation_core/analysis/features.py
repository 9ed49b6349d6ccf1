"""Q/K/V feature maps of the visual tokens for one clip at one denoising step (paper Figure 5).

The diffusers Mochi transformer runs once on x_sigma = (1 - sigma) z + sigma eps with forward
hooks on `to_q`, `to_k`, `to_v` of the joint-attention layers (`transformer_blocks.N.attn1`;
the time-embedding pooler's own `to_q` is not hooked). Each hook reduces its output [B, N, C]
over channels to one value per visual token: "mean" (mean over heads and head dims, as the paper
states), or "norm" (per-head L2 norm, averaged over heads: where the projection is strong,
regardless of sign). The values are averaged over the hooked layers, the N visual tokens
reshaped to (T, h, w) (diffusers orders them frame by frame, row by row) and averaged over T.
Hooks sit on the module at each path, so with a LoRA loaded (peft wraps the Linear) they see
the adapted output. Projections are taken before Mochi's per-head RMSNorm and RoPE.
On Wan the hooked layers are the self-attention projections (`blocks.N.attn1`, video tokens
only); the time convention is the base model spec's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..base_models import spec_of_model
from ..fileio import atomic_path
from ..lora import peft_triplet as triplet
from ..lora.layout import ADAPTERS, INFERENCE_ADAPTERS, LoraSet
from .plots import plot_feature_maps

JOINT_QKV_RE = re.compile(r"^(?:transformer_)?blocks\.(\d+)\.attn1\.(to_q|to_k|to_v)$")  # Mochi, Wan
ROLE_OF = {"to_q": "q", "to_k": "k", "to_v": "v"}
REDUCTIONS = ("mean", "norm")


def _reduce(out: torch.Tensor, heads: int, how: str) -> torch.Tensor:
    """[B, N, C] -> [B, N] (float32)."""
    out = out.float()
    if how == "mean":
        return out.mean(-1)
    b, n, c = out.shape
    return out.view(b, n, heads, c // heads).norm(dim=-1).mean(-1)


@torch.no_grad()
def qkv_feature_maps(
    model: torch.nn.Module,
    latents: torch.Tensor,  # [1, C, T, H, W] clean (normalised) latents
    y_feat: torch.Tensor,  # [1, L, D]
    y_mask: torch.Tensor,  # [1, L]
    sigma: float = 0.5,
    seed: int = 0,
    reduce: str = "mean",
    layers: Sequence[int] | None = None,
    average_time: bool = True,
) -> dict[str, torch.Tensor]:
    """{"q", "k", "v"} -> map [h, w] (or [T, h, w] with average_time=False), float32 on the CPU."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce {reduce!r}: expected one of {REDUCTIONS}")
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents: expected [1, C, T, H, W], got {tuple(latents.shape)}")
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma {sigma}: expected a noise level in [0, 1]")
    p = model.config.patch_size
    p = int(p[-1]) if isinstance(p, (tuple, list)) else int(p)  # Wan: (1, 2, 2)
    heads = int(model.config.num_attention_heads)
    _, _, t, hh, ww = latents.shape
    if hh % p or ww % p:
        raise ValueError(f"latents {tuple(latents.shape)}: height and width must be multiples of the patch size {p}")
    h, w = hh // p, ww // p
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(latents.shape, generator=g, dtype=torch.float32)
    x = ((1.0 - sigma) * latents.float() + sigma * eps).to(dev, dtype)
    spec = spec_of_model(model)
    sigma_t = torch.full((1,), float(sigma), device=dev)

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(role: str):
        def fn(_module, _inputs, out):
            r = _reduce(out, heads, reduce)[0]
            if r.shape[0] != t * h * w:
                raise ValueError(f"{role}: {r.shape[0]} visual tokens, expected T*h*w = {t}*{h}*{w}")
            sums[role] = sums.get(role, 0) + r.cpu()
            counts[role] = counts.get(role, 0) + 1
        return fn

    handles = []
    for name, module in model.named_modules():
        m = JOINT_QKV_RE.match(name)
        if m and (layers is None or int(m.group(1)) in layers):
            handles.append(module.register_forward_hook(hook(ROLE_OF[m.group(2)])))
    if not handles:
        raise ValueError(f"no joint-attention to_q/to_k/to_v modules to hook (layers {list(layers or [])})")
    try:
        spec.predict(model, x, y_feat.to(dev, dtype), y_mask.to(dev).bool(), sigma_t)
    finally:
        for hd in handles:
            hd.remove()
    maps = {role: (sums[role] / counts[role]).view(t, h, w) for role in ("q", "k", "v")}
    return {r: m.mean(0) if average_time else m for r, m in maps.items()}


def load_inference_lora(model: torch.nn.Module, lora: LoraSet, adapters: Sequence[str] = INFERENCE_ADAPTERS) -> list[str]:
    """Put `lora`'s `adapters` (default relation + ffn, as at generation) into the model's peft
    triplet (added if absent) and make exactly those active. Returns the adapters activated."""
    use = lora.only(tuple(adapters))
    if not use.adapters:
        raise ValueError(f"the LoRA has none of the adapters {list(adapters)} (it has {lora.adapters})")
    if "relation" not in (getattr(model, "peft_config", None) or {}):
        ref = use.adapters[0]
        ranks = {a: use.rank.get(a, use.rank[ref]) for a in ADAPTERS}
        alphas = {a: use.alpha.get(a, use.alpha[ref]) for a in ADAPTERS}
        triplet.add_triplet(model, rank=ranks, alpha=alphas, spec=use.spec)
    triplet.load_lora_set(model, use)
    triplet.activate(model, use.adapters)
    return use.adapters


def feature_maps_with_lora(
    model: torch.nn.Module,
    lora: LoraSet | None,
    latents: torch.Tensor,
    y_feat: torch.Tensor,
    y_mask: torch.Tensor,
    **kw,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"base": maps[, "lora": maps]} for the same clip, noise and step. The model keeps the
    adapters afterwards, switched off (no adapter active): it computes the base model again."""
    out = {"base": qkv_feature_maps(model, latents, y_feat, y_mask, **kw)}
    if lora is not None:
        load_inference_lora(model, lora)
        try:
            out["lora"] = qkv_feature_maps(model, latents, y_feat, y_mask, **kw)
        finally:
            triplet.activate(model, [])
    return out


def write_feature_report(maps: dict[str, dict[str, torch.Tensor]], out_dir, title: str = "") -> dict[str, Path]:
    """qkv_features.safetensors (`<run>.<role>` -> map) and qkv_features.png in `out_dir`."""
    from safetensors.torch import save_file


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"maps": out / "qkv_features.safetensors", "png": out / "qkv_features.png"}
    tensors = {f"{run}.{role}": m.contiguous().float() for run, ms in maps.items() for role, m in ms.items()}
    with atomic_path(paths["maps"]) as tmp:
        save_file(tensors, str(tmp), metadata={"runs": ",".join(maps)})
    plot_feature_maps(maps, paths["png"], title=title)
    return paths
