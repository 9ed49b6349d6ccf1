"""Mochi base weights: diffusers `MochiTransformer3DModel` <-> genmo / ComfyUI keys, any depth.

diffusers ships a one-way converter that hard-codes 48 blocks and empties its input; these two
functions go both ways for any number of blocks (tiny test models included) and leave the input
alone (unless a loader asks to swap halves in place in its own copy). Layout facts (docs/method.md "Base model"):
- `qkv_x` / `qkv_y` are q, k, v stacked on rows; diffusers keeps them as separate modules;
- `proj_x -> to_out.0`, `proj_y -> to_add_out` (absent in the last block, which does not update text);
- the SwiGLU input `mlp_*.w1` holds (gate, proj) halves in the opposite order to diffusers'
  `ff.net.0.proj`; `final_layer.mod` holds (shift, scale) where diffusers' `norm_out.linear`
  holds (scale, shift): both are a swap of the two halves on dim 0, its own inverse;
- the last block's text modulation is `norm1_context.linear_1` in diffusers (`mod_y` in genmo).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import KeyLayoutError
from ..statedict import check_all_used, count_indexed, take

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# Keys outside the blocks: genmo -> diffusers.
_TOP = {
    "x_embedder.proj.weight": "patch_embed.proj.weight",
    "x_embedder.proj.bias": "patch_embed.proj.bias",
    "t_embedder.mlp.0.weight": "time_embed.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_embed.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_embed.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_embed.timestep_embedder.linear_2.bias",
    "t5_y_embedder.to_kv.weight": "time_embed.pooler.to_kv.weight",
    "t5_y_embedder.to_kv.bias": "time_embed.pooler.to_kv.bias",
    "t5_y_embedder.to_q.weight": "time_embed.pooler.to_q.weight",
    "t5_y_embedder.to_q.bias": "time_embed.pooler.to_q.bias",
    "t5_y_embedder.to_out.weight": "time_embed.pooler.to_out.weight",
    "t5_y_embedder.to_out.bias": "time_embed.pooler.to_out.bias",
    "t5_yproj.weight": "time_embed.caption_proj.weight",
    "t5_yproj.bias": "time_embed.caption_proj.bias",
    "final_layer.mod.weight": "norm_out.linear.weight",
    "final_layer.mod.bias": "norm_out.linear.bias",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
    "pos_frequencies": "pos_frequencies",
}
_HALF_SWAPPED = {"final_layer.mod.weight", "final_layer.mod.bias"}


def _block_map(i: int, last: bool) -> dict[str, str]:
    """genmo key -> diffusers key for the one-to-one tensors of block i."""
    g, d = f"blocks.{i}.", f"transformer_blocks.{i}."
    m = {
        "mod_x.weight": "norm1.linear.weight",
        "mod_x.bias": "norm1.linear.bias",
        "attn.q_norm_x.weight": "attn1.norm_q.weight",
        "attn.k_norm_x.weight": "attn1.norm_k.weight",
        "attn.q_norm_y.weight": "attn1.norm_added_q.weight",
        "attn.k_norm_y.weight": "attn1.norm_added_k.weight",
        "attn.proj_x.weight": "attn1.to_out.0.weight",
        "attn.proj_x.bias": "attn1.to_out.0.bias",
        "mlp_x.w1.weight": "ff.net.0.proj.weight",
        "mlp_x.w2.weight": "ff.net.2.weight",
    }
    ctx = "norm1_context.linear_1" if last else "norm1_context.linear"
    m["mod_y.weight"], m["mod_y.bias"] = f"{ctx}.weight", f"{ctx}.bias"
    if not last:
        m.update({
            "attn.proj_y.weight": "attn1.to_add_out.weight",
            "attn.proj_y.bias": "attn1.to_add_out.bias",
            "mlp_y.w1.weight": "ff_context.net.0.proj.weight",
            "mlp_y.w2.weight": "ff_context.net.2.weight",
        })
    return {g + k: d + v for k, v in m.items()}


def _fused(i: int) -> dict[str, tuple[str, str, str]]:
    d = f"transformer_blocks.{i}.attn1."
    return {
        f"blocks.{i}.attn.qkv_x.weight": (d + "to_q.weight", d + "to_k.weight", d + "to_v.weight"),
        f"blocks.{i}.attn.qkv_y.weight": (d + "add_q_proj.weight", d + "add_k_proj.weight", d + "add_v_proj.weight"),
    }


def _swap_halves(t: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    if not in_place:
        return torch.cat([b, a], dim=0)
    first = a.clone()  # one half as a temporary instead of a second whole tensor
    a.copy_(b)
    b.copy_(first)
    return t


def _half_swapped(genmo_key: str) -> bool:
    return genmo_key in _HALF_SWAPPED or genmo_key.endswith(".w1.weight")


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ComfyUI's `model.diffusion_model.` / `diffusion_model.` prefix where present."""
    out = {}
    for k, v in state_dict.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _key_map(n: int) -> dict[str, str]:
    m = dict(_TOP)
    for i in range(n):
        m.update(_block_map(i, last=i == n - 1))
    return m


def genmo_to_diffusers(state_dict: Mapping[str, torch.Tensor], in_place: bool = False) -> dict[str, torch.Tensor]:
    """genmo / ComfyUI Mochi DiT weights -> diffusers `MochiTransformer3DModel` state dict.

    The result shares the input's tensors (q, k, v are row views of the fused qkv). `in_place`:
    the half-swapped tensors are swapped inside the input's tensor (a loader's own copy) instead of
    copied, which changes the input."""
    sd = strip_prefix(state_dict)
    n = count_indexed(sd, "blocks.", "genmo Mochi weights")
    if n == 0:
        raise KeyLayoutError("genmo Mochi weights: no 'blocks.N.' keys found")
    out: dict[str, torch.Tensor] = {}
    for g, d in _key_map(n).items():
        t = take(sd, g, "genmo Mochi weights")
        out[d] = _swap_halves(t, in_place) if _half_swapped(g) else t
    for i in range(n):
        for g, (q, k, v) in _fused(i).items():
            t = take(sd, g, "genmo Mochi weights")
            if t.shape[0] % 3:
                raise KeyLayoutError(f"genmo Mochi weights: {g} {tuple(t.shape)} has rows not divisible into q, k, v")
            out[q], out[k], out[v] = t.chunk(3, dim=0)
    check_all_used(sd, set(_key_map(n)) | {g for i in range(n) for g in _fused(i)}, "genmo Mochi weights")
    return out


def diffusers_to_genmo(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers `MochiTransformer3DModel` weights -> genmo keys (`prefix="diffusion_model."` for
    a ComfyUI-style file). Inverse of `genmo_to_diffusers`."""
    sd = dict(state_dict)
    n = count_indexed(sd, "transformer_blocks.", "diffusers Mochi weights")
    if n == 0:
        raise KeyLayoutError("diffusers Mochi weights: no 'transformer_blocks.N.' keys found")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for g, d in _key_map(n).items():
        t = take(sd, d, "diffusers Mochi weights")
        out[prefix + g] = _swap_halves(t) if _half_swapped(g) else t
        used.add(d)
    for i in range(n):
        for g, parts in _fused(i).items():
            ts = [take(sd, p, "diffusers Mochi weights") for p in parts]
            out[prefix + g] = torch.cat(ts, dim=0)
            used.update(parts)
    check_all_used(sd, used, "diffusers Mochi weights")
    return out
