"""Our LoRAs -> the LoRA files ComfyUI's stock loader applies, for whichever base model they are on.

Mochi: genmo keys with Q and K stacked into one LoRA per fused `qkv_x` / `qkv_y` (`genmo`).
Wan: one plain LoRA per ComfyUI module, `diffusion_model.blocks.{i}.self_attn.q.lora_A.weight` /
`.lora_B.weight` / `.alpha` (the base model spec names the module). Only the inference adapters
(relation + ffn) are written, with their scale folded into B and alpha = rank, so ComfyUI's
alpha / rank factor is 1. Two adapters on one module become one LoRA of the summed rank
(A stacked, B side by side), which is exact: [B1 B2] @ [A1; A2] = B1 A1 + B2 A2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LoraFormatError
from ..fileio import save_safetensors
from . import genmo
from .layout import INFERENCE_ADAPTERS, LoraSet

FORMAT_COMFY = genmo.FORMAT_COMFY


def comfy_state_dict(lora: LoraSet, *, dtype: torch.dtype = torch.float32, source: str = "LoRA") -> dict[str, torch.Tensor]:
    """The relation + ffn adapters of `lora` in ComfyUI's LoRA keys for its base model."""
    spec = lora.spec
    if spec.family == "mochi":
        return genmo.comfy_state_dict(lora, dtype=dtype, source=source)
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for adapter in INFERENCE_ADAPTERS:
        for path, (a, b) in sorted(lora.weights.get(adapter, {}).items()):
            per_module.setdefault(path, []).append((a.float(), b.float() * lora.scales[adapter]))
    if not per_module:
        raise LoraFormatError(f"{source}: no relation / ffn LoRA weights to export (adapters present: {lora.adapters})")
    pairs = {p: (torch.cat([a for a, _ in ab]).to(dtype).contiguous(), torch.cat([b for _, b in ab], 1).to(dtype).contiguous())
             for p, ab in per_module.items()}  # A [R, in], B [out, R]
    return spec.comfy_lora_state_dict(pairs)


def save_comfy_lora(path: str | Path, lora: LoraSet, *, dtype: torch.dtype = torch.float32,
                    source: str | None = None) -> Path:
    """Write relation + ffn of `lora` as a stock ComfyUI LoRA for its base model (atomic)."""
    if lora.spec.family == "mochi":
        return genmo.save_comfy_lora(path, lora, dtype=dtype, source=source)
    source = source or lora.metadata.get("source", "LoRA")
    sd = comfy_state_dict(lora, dtype=dtype, source=source)
    kept = [a for a in INFERENCE_ADAPTERS if a in lora.weights]
    meta = {
        "format": FORMAT_COMFY, "base_model": lora.spec.name, "placement": lora.spec.placement,
        "adapters": json.dumps(kept), "dropped_adapters": json.dumps([a for a in lora.adapters if a not in kept]),
        "num_blocks": str(lora.num_blocks()), "source": Path(str(source)).name,
    }
    return save_safetensors(path, sd, meta)
