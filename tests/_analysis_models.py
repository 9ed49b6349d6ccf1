"""Small model files with planted Q/K/V structure for the analysis tests.

In every attention layer K = Q O (O orthogonal, so K has Q's left singular vectors: phi(q, k) = 1)
and V is independent (phi(q, v) ~ max(i, j) / d).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q * torch.sign(torch.diagonal(r))


def planted_qkv(out: int, inp: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(out, inp, generator=g)
    return q, q @ orthogonal(inp, g), torch.randn(out, inp, generator=g)


def plant_tiny_mochi(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite the visual and text q/k/v of a diffusers Mochi with planted weights (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.transformer_blocks:
            at = block.attn1
            for names in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
                mods = [getattr(at, n) for n in names]
                out, inp = mods[0].weight.shape
                for m, w in zip(mods, planted_qkv(out, inp, g)):
                    m.weight.copy_(w)
    return model


def tiny_mochi_state(num_layers: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers-key state dict of a tiny planted Mochi (visual and text width 64)."""
    from dreamrelation_core.mochi.tiny import tiny_transformer

    model = plant_tiny_mochi(tiny_transformer(seed=seed, num_layers=num_layers), seed)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_genmo(path: Path, diffusers_sd: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.",
                dtype: torch.dtype = torch.bfloat16) -> Path:
    from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo

    sd = diffusers_to_genmo(diffusers_sd, prefix=prefix)
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path))
    return path


def write_genmo_fp8_scaled(path: Path, diffusers_sd: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> Path:
    """ComfyUI's scaled fp8 layout: 2-D weights in e4m3fn with a float32 `scale_weight` each."""
    from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo

    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in diffusers_to_genmo(diffusers_sd, prefix=prefix).items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.float().abs().max() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(torch.bfloat16).contiguous()
    save_file(out, str(path))
    return path


def write_tiny_wan(path: Path, layers: int = 2, dim: int = 64, i2v: bool = False, seed: int = 0) -> Path:
    """ComfyUI Wan keys: blocks.N.self_attn.q/k/v, cross_attn.q/k/v (+ k_img/v_img), norms and FFN."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"model.diffusion_model.patch_embedding.weight": torch.randn(dim, 16, 1, 2, 2, generator=g)}
    for i in range(layers):
        p = f"model.diffusion_model.blocks.{i}."
        for kind in ("self_attn", "cross_attn"):
            for n, w in zip("qkv", planted_qkv(dim, dim, g)):
                sd[f"{p}{kind}.{n}.weight"] = w
                sd[f"{p}{kind}.{n}.bias"] = torch.zeros(dim)
            sd[f"{p}{kind}.o.weight"] = torch.randn(dim, dim, generator=g)
            sd[f"{p}{kind}.norm_q.weight"] = torch.ones(dim)
            sd[f"{p}{kind}.norm_k.weight"] = torch.ones(dim)
        if i2v:  # the image keys share cross_attn.q: plant K_img = Q O as well
            q = sd[f"{p}cross_attn.q.weight"]
            sd[f"{p}cross_attn.k_img.weight"] = q @ orthogonal(dim, g)
            sd[f"{p}cross_attn.v_img.weight"] = torch.randn(dim, dim, generator=g)
        sd[f"{p}ffn.0.weight"] = torch.randn(4 * dim, dim, generator=g)
        sd[f"{p}ffn.2.weight"] = torch.randn(dim, 4 * dim, generator=g)
        sd[f"{p}modulation"] = torch.randn(1, 6, dim, generator=g)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    return path


def write_tiny_hunyuan(path: Path, double: int = 2, single: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """ComfyUI HunyuanVideo keys: double_blocks.N.img_attn.qkv / txt_attn.qkv [3H, H];
    single_blocks.N.linear1 [3H + 4H, H] (q, k, v rows, then the MLP input)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"img_in.proj.weight": torch.randn(hidden, 16, 1, 2, 2, generator=g)}
    for i in range(double):
        for stream in ("img", "txt"):
            sd[f"double_blocks.{i}.{stream}_attn.qkv.weight"] = torch.cat(planted_qkv(hidden, hidden, g))
            sd[f"double_blocks.{i}.{stream}_attn.proj.weight"] = torch.randn(hidden, hidden, generator=g)
    for i in range(single):
        mlp = torch.randn(4 * hidden, hidden, generator=g)
        sd[f"single_blocks.{i}.linear1.weight"] = torch.cat([*planted_qkv(hidden, hidden, g), mlp])
        sd[f"single_blocks.{i}.linear2.weight"] = torch.randn(hidden, 5 * hidden, generator=g)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
