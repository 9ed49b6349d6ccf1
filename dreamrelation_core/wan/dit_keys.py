"""Wan transformer weights: ComfyUI / original Wan keys <-> diffusers `WanTransformer3DModel`, any depth.

ComfyUI's Wan files (`wan2.1_t2v_1.3B_fp16.safetensors`, `wan2.2_ti2v_5B_fp16.safetensors`, the
`*_fp8_scaled` ones, in `models/diffusion_models/`) use the original Wan module names, sometimes
under `model.diffusion_model.` or `diffusion_model.`. diffusers ships a one-way converter (to
diffusers); these functions go both ways, for any depth, refuse keys they do not know (VACE,
camera, S2V, Animate and other Wan offshoots are not plain Wan) and leave their input alone.
Every tensor is renamed, never reshaped (docs/method.md "Wan 2.1 / 2.2"):

| ComfyUI / original                          | diffusers                                            |
|---------------------------------------------|------------------------------------------------------|
| `patch_embedding`                           | `patch_embedding`                                    |
| `text_embedding.{0,2}`                      | `condition_embedder.text_embedder.linear_{1,2}`      |
| `time_embedding.{0,2}`                      | `condition_embedder.time_embedder.linear_{1,2}`      |
| `time_projection.1`                         | `condition_embedder.time_proj`                       |
| `head.head`, `head.modulation`              | `proj_out`, `scale_shift_table`                      |
| `img_emb.proj.{0,1,3,4}`, `img_emb.emb_pos` | `condition_embedder.image_embedder.{norm1, ff.net.0.proj, ff.net.2, norm2}`, `.pos_embed` |
| `blocks.N.self_attn.{q,k,v,o}`              | `blocks.N.attn1.{to_q,to_k,to_v,to_out.0}`           |
| `blocks.N.self_attn.norm_{q,k}`             | `blocks.N.attn1.norm_{q,k}`                          |
| `blocks.N.cross_attn.{q,k,v,o}`, `norm_{q,k}` | `blocks.N.attn2.{to_q,to_k,to_v,to_out.0}`, `norm_{q,k}` |
| `blocks.N.cross_attn.{k_img,v_img,norm_k_img}` (2.1 I2V) | `blocks.N.attn2.{add_k_proj,add_v_proj,norm_added_k}` |
| `blocks.N.norm3` (cross-attention norm)     | `blocks.N.norm2`                                     |
| `blocks.N.ffn.{0,2}`                        | `blocks.N.ffn.net.0.proj`, `blocks.N.ffn.net.2`      |
| `blocks.N.modulation`                       | `blocks.N.scale_shift_table`                         |

The per-block modulation holds (shift, scale, gate) for self-attention then for the FFN in the
same order in both, and the head's (shift, scale) too: no halves are swapped (unlike Mochi).

Configuration from the shapes, as ComfyUI's own detection reads it (`head.modulation` marks a
Wan file): dim = width of `head.modulation`, FFN width from `blocks.0.ffn.0`, depth from the
`blocks.N.` keys, input / output channels from `patch_embedding` / `head.head` (rows / 4 = the
(1, 2, 2) patch), heads = dim / 128 (ComfyUI fixes the head width at 128, so a Wan of any size
must have dim a multiple of 128; the tiny test models do too). The text width (4096: umT5-XXL)
is read from `text_embedding.0`; ComfyUI always builds 4096, so files meant for ComfyUI keep it.
Variants:
- Wan 2.1 / 2.2 T2V (1.3B, 14B, each A14B expert): in 16, out 16, no image keys;
- Wan 2.1 I2V / FLF2V: in 36 (16 noise + 4 mask + 16 image latents), `img_emb.*` and the
  `k_img` / `v_img` keys (CLIP image tokens; FLF2V adds `img_emb.emb_pos`);
- Wan 2.2 I2V A14B: in 36, out 16, no image keys;
- Wan 2.2 TI2V 5B: in 48, out 48 (the Wan 2.2 VAE's channels).
A Wan 2.2 A14B expert has exactly the shapes of Wan 2.1 14B; which expert a file is (high or low
noise) is only in its name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KeyLayoutError
from ..statedict import count_indexed
from .latents import PATCH_SIZE, WAN21_CHANNELS, WAN22_CHANNELS

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
HEAD_DIM = 128  # ComfyUI: num_heads = dim // 128
MARKER = "head.modulation"  # what ComfyUI and diffusers look for to call a file Wan

# Keys outside the blocks: ComfyUI -> diffusers. (name, required)
_TOP: dict[str, tuple[str, bool]] = {
    "patch_embedding.weight": ("patch_embedding.weight", True),
    "patch_embedding.bias": ("patch_embedding.bias", True),
    "text_embedding.0.weight": ("condition_embedder.text_embedder.linear_1.weight", True),
    "text_embedding.0.bias": ("condition_embedder.text_embedder.linear_1.bias", True),
    "text_embedding.2.weight": ("condition_embedder.text_embedder.linear_2.weight", True),
    "text_embedding.2.bias": ("condition_embedder.text_embedder.linear_2.bias", True),
    "time_embedding.0.weight": ("condition_embedder.time_embedder.linear_1.weight", True),
    "time_embedding.0.bias": ("condition_embedder.time_embedder.linear_1.bias", True),
    "time_embedding.2.weight": ("condition_embedder.time_embedder.linear_2.weight", True),
    "time_embedding.2.bias": ("condition_embedder.time_embedder.linear_2.bias", True),
    "time_projection.1.weight": ("condition_embedder.time_proj.weight", True),
    "time_projection.1.bias": ("condition_embedder.time_proj.bias", True),
    "head.head.weight": ("proj_out.weight", True),
    "head.head.bias": ("proj_out.bias", True),
    "head.modulation": ("scale_shift_table", True),
    # Wan 2.1 I2V / FLF2V: CLIP image tokens
    "img_emb.proj.0.weight": ("condition_embedder.image_embedder.norm1.weight", False),
    "img_emb.proj.0.bias": ("condition_embedder.image_embedder.norm1.bias", False),
    "img_emb.proj.1.weight": ("condition_embedder.image_embedder.ff.net.0.proj.weight", False),
    "img_emb.proj.1.bias": ("condition_embedder.image_embedder.ff.net.0.proj.bias", False),
    "img_emb.proj.3.weight": ("condition_embedder.image_embedder.ff.net.2.weight", False),
    "img_emb.proj.3.bias": ("condition_embedder.image_embedder.ff.net.2.bias", False),
    "img_emb.proj.4.weight": ("condition_embedder.image_embedder.norm2.weight", False),
    "img_emb.proj.4.bias": ("condition_embedder.image_embedder.norm2.bias", False),
    "img_emb.emb_pos": ("condition_embedder.image_embedder.pos_embed", False),
}

# Linear modules of a block: ComfyUI -> diffusers (weight and bias each). The LoRA targets.
BLOCK_LINEARS: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_IMAGE_LINEARS = {"cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj"}

# Other tensors of a block. (name, required)
_BLOCK_OTHER: dict[str, tuple[str, bool]] = {
    "self_attn.norm_q.weight": ("attn1.norm_q.weight", True),
    "self_attn.norm_k.weight": ("attn1.norm_k.weight", True),
    "cross_attn.norm_q.weight": ("attn2.norm_q.weight", True),
    "cross_attn.norm_k.weight": ("attn2.norm_k.weight", True),
    "cross_attn.norm_k_img.weight": ("attn2.norm_added_k.weight", False),
    "norm3.weight": ("norm2.weight", False),  # the cross-attention norm (cross_attn_norm)
    "norm3.bias": ("norm2.bias", False),
    "modulation": ("scale_shift_table", True),
}


def _block_map(i: int) -> dict[str, tuple[str, bool]]:
    """ComfyUI key -> (diffusers key, required) for the tensors of block i."""
    c, d = f"blocks.{i}.", f"blocks.{i}."
    m: dict[str, tuple[str, bool]] = {}
    for lin, req in ((BLOCK_LINEARS, True), (_IMAGE_LINEARS, False)):
        for cn, dn in lin.items():
            for p in ("weight", "bias"):
                m[f"{c}{cn}.{p}"] = (f"{d}{dn}.{p}", req)
    for cn, (dn, req) in _BLOCK_OTHER.items():
        m[c + cn] = (d + dn, req)
    return m


def _key_map(n: int) -> dict[str, tuple[str, bool]]:
    m = dict(_TOP)
    for i in range(n):
        m.update(_block_map(i))
    return m


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ComfyUI's `model.diffusion_model.` / `diffusion_model.` prefix where present."""
    out = {}
    for k, v in state_dict.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _convert(sd: Mapping[str, torch.Tensor], forward: bool, what: str, prefix: str = "") -> dict[str, torch.Tensor]:
    n = count_indexed(sd, "blocks.", what)
    if n == 0:
        raise KeyLayoutError(f"{what}: no 'blocks.N.' keys found")
    table = _key_map(n)
    if not forward:  # diffusers -> ComfyUI
        table = {d: (c, req) for c, (d, req) in table.items()}
    unknown = sorted(k for k in sd if k not in table)
    if unknown:
        raise KeyLayoutError(
            f"{what}: {len(unknown)} key(s) a plain Wan (T2V / I2V / TI2V) does not have, e.g. {unknown[:5]}"
            " (VACE, camera, S2V, HuMo and Animate models are not supported)"
        )
    missing = sorted(k for k, (_, req) in table.items() if req and k not in sd)
    if missing:
        raise KeyLayoutError(f"{what}: {len(missing)} key(s) missing, e.g. {missing[:5]}")
    return {prefix + table[k][0]: v for k, v in sd.items()}


def comfy_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI / original Wan DiT weights (prefix optional) -> diffusers `WanTransformer3DModel` keys."""
    return _convert(strip_prefix(state_dict), True, "ComfyUI Wan weights")


def diffusers_to_comfy(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers `WanTransformer3DModel` weights -> ComfyUI / original keys (`prefix=
    "model.diffusion_model."` for a file like ComfyUI's own). Inverse of `comfy_to_diffusers`."""
    return _convert(state_dict, False, "diffusers Wan weights", prefix)


def lora_module_names(num_layers: int) -> dict[str, str]:
    """{diffusers module path: ComfyUI module path} of every block Linear (LoRA key converters)."""
    return {f"blocks.{i}.{d}": f"blocks.{i}.{c}" for i in range(num_layers)
            for c, d in {**BLOCK_LINEARS, **_IMAGE_LINEARS}.items()}


# ---------------------------------------------------------------- detection and configuration

def _keys_of(path_or_keys: str | os.PathLike | Iterable[str] | Mapping[str, object]) -> list[str]:
    if isinstance(path_or_keys, (str, os.PathLike)):
        from safetensors import safe_open

        path = Path(path_or_keys)
        if not path.is_file() or path.suffix != ".safetensors":
            return []
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception:  # not a safetensors file at all: not Wan either
            return []
    return list(path_or_keys)


def wan_layout(path_or_keys: str | os.PathLike | Iterable[str] | Mapping[str, object]) -> str | None:
    """"comfy" (ComfyUI / original keys, any prefix), "diffusers" (WanTransformer3DModel keys) or
    None for weights that are not a Wan transformer. Takes a path, a state dict or its keys."""
    keys = set(_keys_of(path_or_keys))
    if any(p + MARKER in keys for p in ("", *PREFIXES)):
        return "comfy"
    if {"scale_shift_table", "condition_embedder.time_proj.weight", "blocks.0.attn2.to_q.weight"} <= keys:
        return "diffusers"
    return None


def is_wan_file(path_or_keys: str | os.PathLike | Iterable[str] | Mapping[str, object]) -> bool:
    """True for a Wan transformer in either key layout. Check it before Mochi's detection: both
    have `blocks.N.` keys."""
    return wan_layout(path_or_keys) is not None


@dataclass(frozen=True)
class WanVariant:
    """A Wan transformer's sizes and kind, read from its weights' shapes."""

    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    in_dim: int  # input channels: 16 (T2V), 36 (I2V: noise + mask + image), 48 (TI2V 5B)
    out_dim: int  # latent channels: 16 (Wan 2.1 VAE) or 48 (Wan 2.2 VAE)
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = PATCH_SIZE
    cross_attn_norm: bool = True
    image_dim: int | None = None  # CLIP image features (1280) of Wan 2.1 I2V / FLF2V
    pos_embed_seq_len: int | None = None  # FLF2V's image position embedding
    model_type: str = "t2v"  # "t2v", "i2v", "flf2v", "ti2v"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def latent_channels(self) -> int:
        return self.out_dim

    @property
    def version(self) -> str:
        """"2.2" for the TI2V 5B (its own VAE) and the 2.2 I2V A14B, else "2.1" (also the 2.2 T2V experts)."""
        return "2.2" if self.out_dim == WAN22_CHANNELS or (self.in_dim == 36 and self.image_dim is None) else "2.1"

    @property
    def name(self) -> str:
        """A readable name for messages: known sizes by name, others by their numbers."""
        known = {(1536, 8960, 30): "1.3B", (5120, 13824, 40): "14B", (3072, 14336, 30): "5B"}
        size = known.get((self.dim, self.ffn_dim, self.num_layers), f"dim {self.dim}, {self.num_layers} blocks")
        return f"Wan {self.version} {self.model_type.upper()} {size}"


def detect_variant(state_dict: Mapping[str, torch.Tensor], what: str = "Wan weights") -> WanVariant:
    """Sizes and kind of a Wan transformer in ComfyUI / original keys (prefix optional), read as
    ComfyUI's detection reads them (see the module docstring). Only shapes are read."""
    sd = strip_prefix(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise KeyLayoutError(f"{what}: key {key!r} missing; not a Wan transformer in ComfyUI's key layout")
        return tuple(sd[key].shape)

    dim = shape(MARKER)[-1]
    if dim % HEAD_DIM:
        raise KeyLayoutError(
            f"{what}: {MARKER} has width {dim}; Wan's attention heads are {HEAD_DIM} wide (ComfyUI reads "
            f"heads = dim / {HEAD_DIM}), so dim must be a multiple of {HEAD_DIM}"
        )
    patch = shape("patch_embedding.weight")
    in_dim, patch_size = patch[1], tuple(patch[2:])
    out_dim = shape("head.head.weight")[0] // max(1, int(torch.tensor(patch_size).prod()))
    image = "img_emb.proj.0.weight" in sd
    pos = tuple(sd["img_emb.emb_pos"].shape) if "img_emb.emb_pos" in sd else None
    if image:
        model_type = "flf2v" if pos else "i2v"
    elif out_dim == WAN22_CHANNELS:
        model_type = "ti2v"
    elif in_dim > out_dim:
        model_type = "i2v"
    else:
        model_type = "t2v"
    if out_dim not in (WAN21_CHANNELS, WAN22_CHANNELS):
        raise KeyLayoutError(f"{what}: head.head gives {out_dim} output channels; Wan's VAEs have 16 or 48")
    return WanVariant(
        dim=dim, ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_layers=count_indexed(sd, "blocks.", what),
        num_heads=dim // HEAD_DIM, in_dim=in_dim, out_dim=out_dim, text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1], patch_size=patch_size,  # type: ignore[arg-type]
        cross_attn_norm="blocks.0.norm3.weight" in sd, image_dim=shape("img_emb.proj.0.weight")[0] if image else None,
        pos_embed_seq_len=pos[1] if pos else None, model_type=model_type,
    )


def diffusers_config(variant: WanVariant) -> dict:
    """`WanTransformer3DModel(**config)` with exactly the tensors of a file of this variant."""
    return dict(
        patch_size=tuple(variant.patch_size), num_attention_heads=variant.num_heads,
        attention_head_dim=variant.head_dim, in_channels=variant.in_dim, out_channels=variant.out_dim,
        text_dim=variant.text_dim, freq_dim=variant.freq_dim, ffn_dim=variant.ffn_dim,
        num_layers=variant.num_layers, cross_attn_norm=variant.cross_attn_norm, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=variant.image_dim, added_kv_proj_dim=variant.dim if variant.image_dim else None,
        rope_max_seq_len=1024, pos_embed_seq_len=variant.pos_embed_seq_len,
    )


def variant_from_diffusers_config(config: Mapping) -> WanVariant:
    """The WanVariant of a diffusers `WanTransformer3DModel` config (e.g. model.config)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    in_dim, out_dim = config["in_channels"], config.get("out_channels") or config["in_channels"]
    image_dim, pos = config.get("image_dim"), config.get("pos_embed_seq_len")
    if image_dim:
        model_type = "flf2v" if pos else "i2v"
    elif out_dim == WAN22_CHANNELS:
        model_type = "ti2v"
    else:
        model_type = "i2v" if in_dim > out_dim else "t2v"
    return WanVariant(
        dim=dim, ffn_dim=config["ffn_dim"], num_layers=config["num_layers"], num_heads=config["num_attention_heads"],
        in_dim=in_dim, out_dim=out_dim, text_dim=config["text_dim"], freq_dim=config["freq_dim"],
        patch_size=tuple(config["patch_size"]), cross_attn_norm=bool(config["cross_attn_norm"]),
        image_dim=image_dim, pos_embed_seq_len=pos, model_type=model_type,
    )
