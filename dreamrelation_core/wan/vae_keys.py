"""Wan VAE weights: ComfyUI / original keys <-> diffusers `AutoencoderKLWan`, any size, 2.1 and 2.2.

ComfyUI users have the Wan 2.1 VAE as `models/vae/wan_2.1_vae.safetensors` and the Wan 2.2 VAE
as `wan2.2_vae.safetensors`, in the original Wan layouts (the modules of ComfyUI's
`comfy/ldm/wan/vae.py` and `vae2_2.py`). This module renames the keys both ways
and reads the diffusers config (base width, channel multipliers, residual blocks per stage,
which stages halve time, latent channels) from the tensors, so tiny test VAEs convert like the
real one. Every tensor keeps its shape. No ComfyUI import: it only reads and renames tensors.

Layout (original -> diffusers), read from both model definitions:
- `conv1` / `conv2` (the 1x1x1 convs around the latent) -> `quant_conv` / `post_quant_conv`;
- `encoder.conv1` / `decoder.conv1` -> `conv_in`; `*.head.0` / `*.head.2` -> `norm_out` / `conv_out`;
- residual blocks `residual.{0,2,3,6}` -> `norm1`, `conv1`, `norm2`, `conv2`; `shortcut` -> `conv_shortcut`;
- `*.middle.{0,1,2}` -> `mid_block.resnets.0`, `mid_block.attentions.0`, `mid_block.resnets.1`;
- `encoder.downsamples.N` -> `encoder.down_blocks.N` (one flat list in both: the residual blocks
  of a stage, then its resample; a resample with `time_conv` also halves time);
- `decoder.upsamples.N` is flat, diffusers groups it: the residual blocks of stage b are
  `decoder.up_blocks.b.resnets.r`, the resample that closes the stage `up_blocks.b.upsamplers.0`.
The Wan 2.2 VAE (48 channels, 16x in space: frames are cut into 2x2 pixel patches before the
encoder, so it sees 12 channels) nests its stages instead: `encoder.downsamples.i.downsamples.j`
-> `encoder.down_blocks.i.resnets.j`, or `.downsampler` for the resample that ends the stage;
`decoder.upsamples.i.upsamples.j` -> `decoder.up_blocks.i.resnets.j` / `.upsampler`; its decoder
has its own base width (`decoder_base_dim`); diffusers builds it with `is_residual=True`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import KeyLayoutError
from ..statedict import indices

_VAE_PREFIXES = ("first_stage_model.", "vae.")
_RES = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
        "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
        "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_ATTN = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_RESAMPLE = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # ComfyUI's own test for the 2.2 VAE


def strip_vae_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without a checkpoint's `first_stage_model.` / `vae.` prefix, when every key has it."""
    for p in _VAE_PREFIXES:
        if state_dict and all(k.startswith(p) for k in state_dict):
            return {k[len(p):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def is_comfy_wan_vae(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A Wan VAE in the original / ComfyUI layout (2.1 or 2.2): ComfyUI's own marker key."""
    return "decoder.middle.0.residual.0.gamma" in strip_vae_prefix(state_dict)


def is_wan22_vae(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return WAN22_MARKER in strip_vae_prefix(state_dict)


def _is_resample(sd: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return f"{prefix}resample.1.weight" in sd


def _decoder_groups(sd: Mapping[str, torch.Tensor]) -> dict[int, str]:
    """Flat `decoder.upsamples.N` -> diffusers prefix (`up_blocks.b.resnets.r.` / `up_blocks.b.upsamplers.0.`)."""
    out, b, r = {}, 0, 0
    for n in indices(sd, "decoder.upsamples."):
        if _is_resample(sd, f"decoder.upsamples.{n}."):
            out[n] = f"decoder.up_blocks.{b}.upsamplers.0."
            b, r = b + 1, 0
        else:
            out[n] = f"decoder.up_blocks.{b}.resnets.{r}."
            r += 1
    return out


def _rename(key: str, groups: dict[int, str]) -> str | None:
    """diffusers name of one original-layout key, or None if the layout has no such key."""
    fixed = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
             "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    part, rest = m.groups()
    if rest in ("conv1.weight", "conv1.bias"):
        return f"{part}.conv_in.{rest.split('.')[1]}"
    if rest in ("head.0.gamma",):
        return f"{part}.norm_out.gamma"
    if rest in ("head.2.weight", "head.2.bias"):
        return f"{part}.conv_out.{rest.split('.')[-1]}"
    if (mm := re.fullmatch(r"middle\.([02])\.(.+)", rest)) and mm.group(2) in _RES:
        return f"{part}.mid_block.resnets.{int(mm.group(1)) // 2}.{_RES[mm.group(2)]}"
    if (mm := re.fullmatch(r"middle\.1\.(.+)", rest)) and mm.group(1) in _ATTN:
        return f"{part}.mid_block.attentions.0.{mm.group(1)}"
    if part == "encoder" and (mm := re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest)):
        suffix = mm.group(2)
        if suffix in _RES:
            return f"encoder.down_blocks.{mm.group(1)}.{_RES[suffix]}"
        if suffix in _RESAMPLE:
            return f"encoder.down_blocks.{mm.group(1)}.{suffix}"
    if part == "decoder" and (mm := re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest)):
        n, suffix = int(mm.group(1)), mm.group(2)
        new = groups.get(n)
        if new is not None and new.endswith(".upsamplers.0.") and suffix in _RESAMPLE:
            return new + suffix
        if new is not None and ".resnets." in new and suffix in _RES:
            return new + _RES[suffix]
    return None


def comfy_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan 2.1 VAE in the original / ComfyUI layout -> diffusers `AutoencoderKLWan` keys."""
    sd = strip_vae_prefix(state_dict)
    if is_wan22_vae(sd):
        return _convert22(sd, forward=True)
    groups = _decoder_groups(sd)
    out, unknown = {}, []
    for k, v in sd.items():
        new = _rename(k, groups)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise KeyLayoutError(f"Wan VAE: {len(unknown)} key(s) outside the Wan 2.1 VAE layout, e.g. {sorted(unknown)[:5]}")
    return out


def diffusers_to_comfy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLWan` (Wan 2.1 layout) -> the original / ComfyUI keys. Inverse of
    `comfy_to_diffusers`: the flat decoder list is rebuilt from the diffusers groups in order."""
    sd = dict(state_dict)
    if any(".upsampler." in k or ".downsampler." in k for k in sd):
        return _convert22(sd, forward=False)
    flat, n = {}, 0  # diffusers decoder prefix -> flat original index
    for b in indices(sd, "decoder.up_blocks."):
        for r in indices(sd, f"decoder.up_blocks.{b}.resnets."):
            flat[f"decoder.up_blocks.{b}.resnets.{r}."] = n
            n += 1
        if any(k.startswith(f"decoder.up_blocks.{b}.upsamplers.0.") for k in sd):
            flat[f"decoder.up_blocks.{b}.upsamplers.0."] = n
            n += 1
    groups = {i: p for p, i in flat.items()}
    # the inverse of _rename over every key the forward direction could produce
    inverse: dict[str, str] = {}
    candidates = set()
    for k in sd:
        candidates.update(_original_candidates(k, flat))
    for c in candidates:
        new = _rename(c, groups)
        if new is not None:
            inverse[new] = c
    out, unknown = {}, []
    for k, v in sd.items():
        if k in inverse:
            out[inverse[k]] = v
        else:
            unknown.append(k)
    if unknown:
        raise KeyLayoutError(f"diffusers Wan VAE: {len(unknown)} key(s) outside the Wan 2.1 VAE layout, "
                             f"e.g. {sorted(unknown)[:5]}")
    return out


def _original_candidates(key: str, flat: dict[str, int]) -> list[str]:
    """Original-layout keys that may rename to the diffusers `key` (checked by `_rename`)."""
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, tail = key.partition(".")
    if head in fixed:
        return [f"{fixed[head]}.{tail}"]
    part, _, rest = key.partition(".")
    res_inv = {v: k for k, v in _RES.items()}
    out = []
    if rest.startswith("conv_in."):
        out.append(f"{part}.conv1.{rest.split('.')[-1]}")
    elif rest == "norm_out.gamma":
        out.append(f"{part}.head.0.gamma")
    elif rest.startswith("conv_out."):
        out.append(f"{part}.head.2.{rest.split('.')[-1]}")
    elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
        out.append(f"{part}.middle.{2 * int(m.group(1))}.{res_inv.get(m.group(2), m.group(2))}")
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        out.append(f"{part}.middle.1.{m.group(1)}")
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        out.append(f"encoder.downsamples.{m.group(1)}.{res_inv.get(m.group(2), m.group(2))}")
    else:
        for prefix, n in flat.items():
            if key.startswith(prefix):
                suffix = key[len(prefix):]
                out.append(f"decoder.upsamples.{n}.{res_inv.get(suffix, suffix)}")
    return out


def config_from_comfy(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """`AutoencoderKLWan(**config)` for Wan 2.1- or 2.2-layout weights, read from their shapes."""
    sd = strip_vae_prefix(state_dict)
    if is_wan22_vae(sd):
        return _config22(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise KeyLayoutError(f"Wan VAE: key {key!r} missing")
        return tuple(sd[key].shape)

    base = shape("encoder.conv1.weight")[0]
    z_dim = shape("conv2.weight")[0]
    stages: list[tuple[int, int]] = []  # (residual blocks, out channels) per encoder stage
    temporal: list[bool] = []
    blocks, out_ch = 0, base
    for n in indices(sd, "encoder.downsamples."):
        p = f"encoder.downsamples.{n}."
        if _is_resample(sd, p):
            stages.append((blocks, out_ch))
            temporal.append(f"{p}time_conv.weight" in sd)
            blocks = 0
        else:
            blocks += 1
            out_ch = shape(f"{p}residual.6.weight")[0]
    stages.append((blocks, out_ch))
    counts = {b for b, _ in stages}
    if len(counts) != 1:
        raise KeyLayoutError(f"Wan VAE: encoder stages have different numbers of residual blocks {[b for b, _ in stages]}")
    return dict(
        base_dim=base, z_dim=z_dim, dim_mult=[c // base for _, c in stages], num_res_blocks=counts.pop(),
        attn_scales=[], temperal_downsample=temporal, dropout=0.0,
    )


# ---------------------------------------------------------------- the Wan 2.2 VAE


def _rename22(key: str) -> str | None:
    """diffusers name of one Wan 2.2-layout key (nested stages), or None."""
    for part, inner, block, sampler in (("encoder", "downsamples", "down_blocks", "downsampler"),
                                        ("decoder", "upsamples", "up_blocks", "upsampler")):
        m = re.fullmatch(rf"{part}\.{inner}\.(\d+)\.{inner}\.(\d+)\.(.+)", key)
        if m:
            i, j, suffix = m.groups()
            if suffix in _RES:
                return f"{part}.{block}.{i}.resnets.{j}.{_RES[suffix]}"
            if suffix in _RESAMPLE:
                return f"{part}.{block}.{i}.{sampler}.{suffix}"
            return None
    if re.match(r"(encoder|decoder)\.(downsamples|upsamples)\.", key):
        return None
    return _rename(key, {})


def _convert22(sd: Mapping[str, torch.Tensor], forward: bool) -> dict[str, torch.Tensor]:
    what = "Wan 2.2 VAE" if forward else "diffusers Wan 2.2 VAE"
    table = {k: (_rename22(k) if forward else _original22(k, sd)) for k in sd}
    if not forward:  # keep only names that rename back to the same key: a true inverse
        table = {k: (v if v is not None and _rename22(v) == k else None) for k, v in table.items()}
    unknown = sorted(k for k, v in table.items() if v is None)
    if unknown:
        raise KeyLayoutError(f"{what}: {len(unknown)} key(s) outside the Wan 2.2 VAE layout, e.g. {unknown[:5]}")
    return {table[k]: v for k, v in sd.items()}


def _original22(key: str, sd: Mapping[str, torch.Tensor]) -> str | None:
    """The original-layout name of one diffusers Wan 2.2 VAE key (None if it has none)."""
    res_inv = {v: k for k, v in _RES.items()}
    for part, inner, block, sampler in (("encoder", "downsamples", "down_blocks", "downsampler"),
                                        ("decoder", "upsamples", "up_blocks", "upsampler")):
        if m := re.fullmatch(rf"{part}\.{block}\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            i, j, suffix = m.groups()
            return f"{part}.{inner}.{i}.{inner}.{j}.{res_inv.get(suffix, suffix)}"
        if m := re.fullmatch(rf"{part}\.{block}\.(\d+)\.{sampler}\.(.+)", key):
            i, suffix = m.groups()  # the resample closes its stage: its index follows the residual blocks
            last = len(indices(sd, f"{part}.{block}.{i}.resnets."))
            return f"{part}.{inner}.{i}.{inner}.{last}.{suffix}"
    cands = _original_candidates(key, {})
    return cands[0] if cands else None


def _config22(sd: Mapping[str, torch.Tensor]) -> dict:
    from .latents import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise KeyLayoutError(f"Wan 2.2 VAE: key {key!r} missing")
        return tuple(sd[key].shape)

    base, in_ch = shape("encoder.conv1.weight")[:2]
    stages = indices(sd, "encoder.downsamples.")
    mult, temporal, res_blocks = [], [], set()
    for i in stages:
        p = f"encoder.downsamples.{i}.downsamples."
        inner = indices(sd, p)
        resnets = [j for j in inner if f"{p}{j}.residual.6.weight" in sd]
        if not resnets:
            raise KeyLayoutError(f"Wan 2.2 VAE: no residual blocks under {p}N. (keys {p}...)")
        res_blocks.add(len(resnets))
        mult.append(shape(f"{p}{resnets[-1]}.residual.6.weight")[0] // base)
        if i != stages[-1]:
            temporal.append(f"{p}{inner[-1]}.time_conv.weight" in sd)
    if len(res_blocks) != 1:
        raise KeyLayoutError(f"Wan 2.2 VAE: encoder stages have different numbers of residual blocks {sorted(res_blocks)}")
    patch = round((in_ch / 3) ** 0.5)
    return dict(
        base_dim=base, decoder_base_dim=shape("decoder.conv1.weight")[0] // mult[-1], z_dim=shape("conv2.weight")[0],
        dim_mult=mult, num_res_blocks=res_blocks.pop(), attn_scales=[], temperal_downsample=temporal, dropout=0.0,
        is_residual=True, in_channels=in_ch, out_channels=shape("decoder.head.2.weight")[0], patch_size=patch,
        scale_factor_temporal=4, scale_factor_spatial=patch * 2 ** (len(mult) - 1),
        latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
    )
