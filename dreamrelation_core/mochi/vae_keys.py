"""Mochi VAE weights: genmo / ComfyUI keys <-> diffusers `AutoencoderKLMochi`, any size.

ComfyUI users have the Mochi VAE as `models/vae/mochi_vae.safetensors` in genmo's layout (the
modules of ComfyUI's `comfy/ldm/genmo/vae/model.py`); diffusers ships no converter for it. This
module maps the keys both ways and derives the diffusers config (block counts, channels,
expansions, attention) from the tensors, so tiny test models convert like the real one.
No ComfyUI import: it only reads and renames tensors.

Layout facts (genmo -> diffusers), read from both model definitions:
- encoder: `layers.0` (a 1x1 conv stored as a Linear) -> `proj_in`; then the first ResBlocks
  -> `block_in.resnets.*`, one `DownsampleBlock` per stage (`layers.K.layers.0` the strided conv
  -> `down_blocks.i.conv_in.conv`, `layers.K.layers.1..` its ResBlocks), then the last ResBlocks
  -> `block_out.resnets.*`; `output_norm` -> `norm_out.norm_layer`, `output_proj` -> `proj_out`.
- decoder: `blocks.0.0` (1x1x1 Conv3d) -> `conv_in`, `blocks.0.1..` -> `block_in.resnets.*`;
  `blocks.i.blocks.*` / `blocks.i.proj` -> `up_blocks.(i-1).resnets.*` / `.proj`; the last
  `blocks.L.*` -> `block_out.resnets.*`; `output_proj` -> `proj_out`. Both unpatchify the proj
  output as channels (C, t, h, w), so proj weights are copied unchanged.
- ResBlock `stack.{0,2,3,5}` -> `norm1.norm_layer`, `conv1.conv`, `norm2.norm_layer`, `conv2.conv`.
- attention `attn_block.norm` -> `norms.j.norm_layer`; `attn_block.attn.qkv` (q, k, v stacked on
  rows, no bias) -> `attentions.j.to_q/to_k/to_v`; `attn_block.attn.out` -> `attentions.j.to_out.0`.
- diffusers has one `layers_per_block` for encoder and decoder, one attention flag per encoder
  stage and no decoder attention: weights outside that family are refused with the reason.
- Files: ComfyUI's `mochi_vae.safetensors` has `encoder.` / `decoder.` keys; genmo's separate
  `encoder.safetensors` / `decoder.safetensors` have none (`layers.*` / `blocks.*`, as ComfyUI's
  own loader accepts); all-in-one checkpoints hold the VAE under `first_stage_model.`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KeyLayoutError
from ..statedict import check_all_used, count_indexed, take

# Defaults of diffusers' AutoencoderKLMochi == genmo's VideoVAE.
MOCHI_TEMPORAL_EXPANSIONS: tuple[int, ...] = (1, 2, 3)
MOCHI_SPATIAL_EXPANSIONS: tuple[int, ...] = (2, 2, 2)
MOCHI_ENCODER_CHANNELS: tuple[int, ...] = (64, 128, 256, 384)
MOCHI_DECODER_CHANNELS: tuple[int, ...] = (128, 256, 512, 768)

# Prefixes under which a VAE sits inside a bigger file (ComfyUI all-in-one checkpoints use the first).
_VAE_PREFIXES = ("first_stage_model.", "vae.")

_RES = {  # genmo ResBlock suffix -> diffusers MochiResnetBlock3D suffix
    "stack.0.weight": "norm1.norm_layer.weight",
    "stack.0.bias": "norm1.norm_layer.bias",
    "stack.2.weight": "conv1.conv.weight",
    "stack.2.bias": "conv1.conv.bias",
    "stack.3.weight": "norm2.norm_layer.weight",
    "stack.3.bias": "norm2.norm_layer.bias",
    "stack.5.weight": "conv2.conv.weight",
    "stack.5.bias": "conv2.conv.bias",
}


@dataclass
class GenmoVaeConversion:
    """Result of `convert_genmo_vae`: diffusers weights, the config they fit, what was found."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # AutoencoderKLMochi(**config) has exactly these tensors for `parts`
    parts: tuple[str, ...]  # ("encoder",), ("decoder",) or both
    prefix: str = ""  # the VAE prefix that was stripped, e.g. "first_stage_model."
    ignored: int = 0  # keys outside that prefix (other models of an all-in-one checkpoint)

    def describe(self) -> str:
        s = f"Mochi VAE in genmo layout: {' + '.join(self.parts)} found"
        if "encoder" not in self.parts:
            s += " (no encoder)"
        if "decoder" not in self.parts:
            s += " (no decoder)"
        if self.prefix:
            s += f"; keys under {self.prefix!r}"
        if self.ignored:
            s += f"; {self.ignored} other keys ignored"
        return s


# ---------------------------------------------------------------- key helpers

def _has(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def is_genmo_vae(keys: Iterable[str]) -> bool:
    """Keys in genmo's VAE layout (with or without `encoder.`/`decoder.` or a checkpoint prefix)."""
    heads = ("encoder.layers.", "decoder.blocks.", "layers.", "blocks.")
    return any(k.startswith(p + h) for k in keys for p in ("",) + _VAE_PREFIXES for h in heads)


# Pairs: list of (genmo key, diffusers key) one-to-one; fused: (genmo qkv key, (q, k, v) diffusers keys).
_Pairs = list[tuple[str, str]]
_Fused = list[tuple[str, tuple[str, str, str]]]


def _res_pairs(g: str, d_stage: str, j: int, attention: bool, pairs: _Pairs, fused: _Fused) -> None:
    """ResBlock at genmo prefix `g` == resnet j of diffusers stage `d_stage` (+ its attention)."""
    for gs, ds in _RES.items():
        pairs.append((g + gs, f"{d_stage}resnets.{j}.{ds}"))
    if attention:
        a = f"{d_stage}attentions.{j}."
        pairs += [
            (g + "attn_block.norm.weight", f"{d_stage}norms.{j}.norm_layer.weight"),
            (g + "attn_block.norm.bias", f"{d_stage}norms.{j}.norm_layer.bias"),
            (g + "attn_block.attn.out.weight", a + "to_out.0.weight"),
            (g + "attn_block.attn.out.bias", a + "to_out.0.bias"),
        ]
        fused.append((g + "attn_block.attn.qkv.weight", (a + "to_q.weight", a + "to_k.weight", a + "to_v.weight")))


def _encoder_layout(counts: list[int], attention: list[bool]) -> tuple[_Pairs, _Fused]:
    """counts / attention per stage: block_in, each down block, block_out (diffusers order)."""
    pairs: _Pairs = [("encoder.layers.0.weight", "encoder.proj_in.weight"), ("encoder.layers.0.bias", "encoder.proj_in.bias")]
    fused: _Fused = []
    idx = 1
    for j in range(counts[0]):
        _res_pairs(f"encoder.layers.{idx}.", "encoder.block_in.", j, attention[0], pairs, fused)
        idx += 1
    for i in range(len(counts) - 2):
        g, d = f"encoder.layers.{idx}.", f"encoder.down_blocks.{i}."
        pairs += [(g + "layers.0.weight", d + "conv_in.conv.weight"), (g + "layers.0.bias", d + "conv_in.conv.bias")]
        for j in range(counts[i + 1]):
            _res_pairs(f"{g}layers.{j + 1}.", d, j, attention[i + 1], pairs, fused)
        idx += 1
    for j in range(counts[-1]):
        _res_pairs(f"encoder.layers.{idx}.", "encoder.block_out.", j, attention[-1], pairs, fused)
        idx += 1
    pairs += [
        ("encoder.output_norm.weight", "encoder.norm_out.norm_layer.weight"),
        ("encoder.output_norm.bias", "encoder.norm_out.norm_layer.bias"),
        ("encoder.output_proj.weight", "encoder.proj_out.weight"),
    ]
    return pairs, fused


def _decoder_layout(counts: list[int]) -> tuple[_Pairs, _Fused]:
    """counts per stage: block_in, each up block, block_out (diffusers order)."""
    pairs: _Pairs = [("decoder.blocks.0.0.weight", "decoder.conv_in.weight"), ("decoder.blocks.0.0.bias", "decoder.conv_in.bias")]
    fused: _Fused = []
    for j in range(counts[0]):
        _res_pairs(f"decoder.blocks.0.{j + 1}.", "decoder.block_in.", j, False, pairs, fused)
    n_up = len(counts) - 2
    for i in range(n_up):
        g, d = f"decoder.blocks.{i + 1}.", f"decoder.up_blocks.{i}."
        for j in range(counts[i + 1]):
            _res_pairs(f"{g}blocks.{j}.", d, j, False, pairs, fused)
        pairs += [(g + "proj.weight", d + "proj.weight"), (g + "proj.bias", d + "proj.bias")]
    for j in range(counts[-1]):
        _res_pairs(f"decoder.blocks.{n_up + 1}.{j}.", "decoder.block_out.", j, False, pairs, fused)
    pairs += [("decoder.output_proj.weight", "decoder.proj_out.weight"), ("decoder.output_proj.bias", "decoder.proj_out.bias")]
    return pairs, fused


# ---------------------------------------------------------------- structure from genmo keys

def _stage_attention(keys: set[str], blocks: list[str], where: str) -> bool:
    flags = {_has(keys, b + "attn_block.") for b in blocks}
    if len(flags) > 1:
        raise KeyLayoutError(
            f"{where}: some ResBlocks have attention and some not ({', '.join(blocks)}); "
            "diffusers' AutoencoderKLMochi has one attention flag per stage"
        )
    return flags.pop() if flags else False


def _genmo_encoder_stages(keys: set[str]) -> tuple[list[int], list[bool]]:
    n_top = count_indexed(keys, "encoder.layers.", "genmo VAE encoder")
    if "encoder.layers.0.weight" not in keys:
        raise KeyLayoutError("genmo VAE encoder: key 'encoder.layers.0.weight' (input projection) missing")
    kinds = []
    for k in range(1, n_top):
        p = f"encoder.layers.{k}."
        if _has(keys, p + "layers."):
            kinds.append("down")
        elif _has(keys, p + "stack.") or _has(keys, p + "attn_block."):
            kinds.append("res")
        else:
            odd = sorted(x for x in keys if x.startswith(p))[:3]
            raise KeyLayoutError(f"genmo VAE encoder: {p[:-1]} is neither a ResBlock nor a DownsampleBlock (keys {odd})")
    pattern = "".join("D" if x == "down" else "r" for x in kinds)
    if not re.fullmatch(r"r*D+r*", pattern):
        raise KeyLayoutError(
            f"genmo VAE encoder: layers 1..{n_top - 1} are {pattern or 'empty'} (r = ResBlock, D = DownsampleBlock); "
            "expected ResBlocks, one or more DownsampleBlocks, ResBlocks"
        )
    first = pattern.index("D")
    last = pattern.rindex("D")
    if "r" in pattern[first:last]:
        raise KeyLayoutError(f"genmo VAE encoder: a ResBlock between DownsampleBlocks ({pattern})")
    stages: list[list[str]] = [[f"encoder.layers.{1 + j}." for j in range(first)]]
    for k in range(first, last + 1):
        p = f"encoder.layers.{1 + k}."
        n = count_indexed(keys, p + "layers.", "genmo VAE encoder", start=1)
        stages.append([f"{p}layers.{j + 1}." for j in range(n)])
    stages.append([f"encoder.layers.{1 + k}." for k in range(last + 1, len(kinds))])
    attention = [_stage_attention(keys, s, "genmo VAE encoder") for s in stages]
    return [len(s) for s in stages], attention


def _genmo_decoder_stages(keys: set[str]) -> list[int]:
    n_top = count_indexed(keys, "decoder.blocks.", "genmo VAE decoder")
    if n_top < 2:
        raise KeyLayoutError(f"genmo VAE decoder: {n_top} top-level block(s) under 'decoder.blocks.'; expected an input block, up blocks and an output block")
    attn = sorted(k for k in keys if k.startswith("decoder.") and ".attn_block." in k)
    if attn:
        raise KeyLayoutError(f"genmo VAE decoder has attention blocks ({attn[:2]}); diffusers' AutoencoderKLMochi decoder has none")
    if "decoder.blocks.0.0.weight" not in keys:
        raise KeyLayoutError("genmo VAE decoder: key 'decoder.blocks.0.0.weight' (input conv) missing")
    counts = [count_indexed(keys, "decoder.blocks.0.", "genmo VAE decoder", start=1)]
    for i in range(1, n_top - 1):
        counts.append(count_indexed(keys, f"decoder.blocks.{i}.blocks.", "genmo VAE decoder"))
    counts.append(count_indexed(keys, f"decoder.blocks.{n_top - 1}.", "genmo VAE decoder"))
    return counts


# ---------------------------------------------------------------- structure from diffusers keys

def _diffusers_stage_prefixes(keys: set[str], part: str, middle: str) -> list[str]:
    mids = count_indexed(keys, f"{part}.{middle}.", f"diffusers VAE {part}")
    return [f"{part}.block_in."] + [f"{part}.{middle}.{i}." for i in range(mids)] + [f"{part}.block_out."]


def _diffusers_encoder_stages(keys: set[str]) -> tuple[list[int], list[bool]]:
    stages = _diffusers_stage_prefixes(keys, "encoder", "down_blocks")
    counts = [count_indexed(keys, s + "resnets.", "diffusers VAE encoder") for s in stages]
    attention = [_has(keys, s + "attentions.") for s in stages]
    return counts, attention


def _diffusers_decoder_stages(keys: set[str]) -> list[int]:
    stages = _diffusers_stage_prefixes(keys, "decoder", "up_blocks")
    return [count_indexed(keys, s + "resnets.", "diffusers VAE decoder") for s in stages]


# ---------------------------------------------------------------- normalising the input

def _strip_vae_prefix(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, int]:
    """-> (VAE keys without a checkpoint prefix, that prefix, number of other keys ignored)."""
    for p in _VAE_PREFIXES:
        inside = {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
        if inside and is_genmo_vae(inside):
            return inside, p, len(state_dict) - len(inside)
    return dict(state_dict), "", 0


def _add_part_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """genmo's separate encoder/decoder files have no `encoder.`/`decoder.` (ComfyUI adds it the same way)."""
    if _has(set(sd), "encoder.") or _has(set(sd), "decoder."):
        return sd
    enc, dec = _has(set(sd), "layers."), _has(set(sd), "blocks.")
    if enc and dec:
        raise KeyLayoutError(
            "genmo VAE: keys 'layers.*' (encoder) and 'blocks.*' (decoder) without 'encoder.'/'decoder.' prefixes "
            "in one file: cannot tell which 'output_proj' belongs to which part"
        )
    if enc:
        return {"encoder." + k: v for k, v in sd.items()}
    if dec:
        return {"decoder." + k: v for k, v in sd.items()}
    return sd


def _split_qkv(t: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
    if t.ndim != 2 or t.shape[0] != 3 * t.shape[1]:
        raise KeyLayoutError(f"genmo VAE: {key} has shape {tuple(t.shape)}; expected [3*C, C] (q, k, v stacked)")
    return tuple(c.contiguous() for c in t.chunk(3, dim=0))  # chunk views share storage: save_file refuses those


# ---------------------------------------------------------------- config from diffusers tensors

def _expansions_from_ratios(ratios: list[int], where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A decoder alone gives t*s*s per up block: Mochi's factors where they fit, else refuse."""
    mochi = [t * s * s for t, s in zip(MOCHI_TEMPORAL_EXPANSIONS, MOCHI_SPATIAL_EXPANSIONS)][::-1]  # innermost first
    if ratios == mochi:
        return MOCHI_TEMPORAL_EXPANSIONS, MOCHI_SPATIAL_EXPANSIONS
    raise KeyLayoutError(
        f"{where}: up-block factors t*s*s = {ratios} (innermost first) are not Mochi's {mochi}; without the "
        "encoder the temporal and spatial expansions cannot be told apart"
    )


def diffusers_vae_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """AutoencoderKLMochi config fitting diffusers-named VAE weights (encoder and/or decoder).

    A part absent from the weights gets placeholder sizes (Mochi's where the stage count fits):
    the caller must not use that part (load_vae replaces it with a stub that says so).
    """
    keys = set(state_dict)
    has_enc, has_dec = _has(keys, "encoder."), _has(keys, "decoder.")
    if not (has_enc or has_dec):
        raise KeyLayoutError("diffusers VAE: no 'encoder.' or 'decoder.' keys")
    sd = state_dict
    cfg: dict[str, Any] = {}
    enc_lpb = dec_lpb = None
    if has_enc:
        counts, attention = _diffusers_encoder_stages(keys)
        n_down = len(counts) - 2
        w_in = take(sd, "encoder.proj_in.weight", "diffusers VAE encoder")
        channels = [int(w_in.shape[0])]
        te, se = [], []
        for i in range(n_down):
            w = take(sd, f"encoder.down_blocks.{i}.conv_in.conv.weight", "diffusers VAE encoder")
            if w.ndim != 5 or w.shape[3] != w.shape[4]:
                raise KeyLayoutError(f"encoder.down_blocks.{i}.conv_in.conv.weight has shape {tuple(w.shape)}; expected [out, in, t, s, s]")
            channels.append(int(w.shape[0]))
            te.append(int(w.shape[2]))
            se.append(int(w.shape[3]))
        cfg.update(
            in_channels=int(w_in.shape[1]),
            encoder_block_out_channels=tuple(channels),
            latent_channels=int(take(sd, "encoder.proj_out.weight", "diffusers VAE encoder").shape[0]) // 2,
            temporal_expansions=tuple(te),
            spatial_expansions=tuple(se),
            add_attention_block=tuple(attention),
        )
        enc_lpb = tuple(counts)
    if has_dec:
        counts = _diffusers_decoder_stages(keys)
        n_up = len(counts) - 2
        w_out = take(sd, "decoder.proj_out.weight", "diffusers VAE decoder")
        w_in = take(sd, "decoder.conv_in.weight", "diffusers VAE decoder")
        # channels innermost first: conv_in's output, then each up block's input (= proj input) ...
        inner = [int(take(sd, f"decoder.up_blocks.{i}.proj.weight", "diffusers VAE decoder").shape[1]) for i in range(n_up)]
        if inner and inner[0] != w_in.shape[0]:
            raise KeyLayoutError(f"decoder.conv_in.weight gives {w_in.shape[0]} channels, decoder.up_blocks.0.proj.weight takes {inner[0]}")
        outer = inner[1:] + [int(w_out.shape[1])]  # ... and each up block's output channels
        ratios = []
        for i in range(n_up):
            rows = int(sd[f"decoder.up_blocks.{i}.proj.weight"].shape[0])
            if rows % outer[i]:
                raise KeyLayoutError(f"decoder.up_blocks.{i}.proj.weight has {rows} rows, not a multiple of the next stage's {outer[i]} channels")
            ratios.append(rows // outer[i])
        dec_channels = tuple(reversed([int(w_in.shape[0])] + outer)) if n_up else (int(w_in.shape[0]),)
        if has_enc:
            te, se = cfg["temporal_expansions"], cfg["spatial_expansions"]
            want = [te[-i - 1] * se[-i - 1] ** 2 for i in range(n_up)]
            if len(te) != n_up or ratios != want:
                raise KeyLayoutError(
                    f"VAE encoder and decoder disagree: encoder expansions t={te} s={se} need decoder up-block factors {want}, "
                    f"the decoder has {ratios}"
                )
        else:
            te, se = _expansions_from_ratios(ratios, "genmo VAE decoder")
            cfg.update(temporal_expansions=te, spatial_expansions=se)
        latent = int(w_in.shape[1])
        if has_enc and cfg["latent_channels"] != latent:
            raise KeyLayoutError(f"VAE encoder gives {cfg['latent_channels']} latent channels, decoder.conv_in.weight takes {latent}")
        cfg.update(decoder_block_out_channels=dec_channels, latent_channels=latent, out_channels=int(w_out.shape[0]))
        dec_lpb = tuple(reversed(counts))
    if enc_lpb is not None and dec_lpb is not None and enc_lpb != dec_lpb:
        raise KeyLayoutError(
            f"VAE encoder has {enc_lpb} ResBlocks per stage, the decoder {dec_lpb}; "
            "diffusers' AutoencoderKLMochi uses one layers_per_block for both"
        )
    cfg["layers_per_block"] = enc_lpb or dec_lpb
    n_stages = len(cfg["layers_per_block"]) - 1  # channel entries per part
    if not has_enc:  # placeholders, see docstring
        cfg["encoder_block_out_channels"] = MOCHI_ENCODER_CHANNELS if n_stages == 4 else cfg["decoder_block_out_channels"]
        cfg["add_attention_block"] = (False,) * (n_stages + 1)
    if not has_dec:
        cfg["decoder_block_out_channels"] = MOCHI_DECODER_CHANNELS if n_stages == 4 else cfg["encoder_block_out_channels"]
    return cfg


# ---------------------------------------------------------------- conversions

def convert_genmo_vae(state_dict: Mapping[str, torch.Tensor]) -> GenmoVaeConversion:
    """genmo / ComfyUI Mochi VAE weights -> diffusers `AutoencoderKLMochi` weights + config.

    Converts whichever of encoder and decoder is present; raises KeyLayoutError naming the missing
    or unexpected keys. The input is left unchanged; tensors are shared, not copied.
    """
    sd, prefix, ignored = _strip_vae_prefix(state_dict)
    sd = _add_part_prefix(sd)
    keys = set(sd)
    parts = tuple(p for p in ("encoder", "decoder") if _has(keys, p + "."))
    if not parts:
        raise KeyLayoutError(
            f"not a genmo Mochi VAE: no 'encoder.layers.*' / 'decoder.blocks.*' keys (e.g. {sorted(keys)[:3]})"
        )
    pairs: _Pairs = []
    fused: _Fused = []
    if "encoder" in parts:
        counts, attention = _genmo_encoder_stages(keys)
        p, f = _encoder_layout(counts, attention)
        pairs += p
        fused += f
    if "decoder" in parts:
        p, f = _decoder_layout(_genmo_decoder_stages(keys))
        pairs += p
        fused += f
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for g, d in pairs:
        t = take(sd, g, "genmo VAE")
        if g == "encoder.layers.0.weight" and t.ndim == 5:
            # genmo's input_is_conv_1x1=False variant: a 1x1x1 Conv3d, the same map as diffusers' Linear
            if tuple(t.shape[2:]) != (1, 1, 1):
                raise KeyLayoutError(f"genmo VAE: {g} has shape {tuple(t.shape)}; expected [C, in] or [C, in, 1, 1, 1]")
            t = t.reshape(t.shape[0], t.shape[1])
        out[d] = t
        used.add(g)
    for g, ds in fused:
        for d, t in zip(ds, _split_qkv(take(sd, g, "genmo VAE"), g)):
            out[d] = t
        used.add(g)
    check_all_used(sd, used, "genmo VAE")
    config = diffusers_vae_config(out)
    return GenmoVaeConversion(state_dict=out, config=config, parts=parts, prefix=prefix, ignored=ignored)


def diffusers_vae_to_genmo(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLMochi` weights -> genmo / ComfyUI keys (`encoder.*` / `decoder.*`)."""
    keys = set(state_dict)
    pairs: _Pairs = []
    fused: _Fused = []
    if _has(keys, "encoder."):
        p, f = _encoder_layout(*_diffusers_encoder_stages(keys))
        pairs += p
        fused += f
    if _has(keys, "decoder."):
        p, f = _decoder_layout(_diffusers_decoder_stages(keys))
        pairs += p
        fused += f
    if not pairs:
        raise KeyLayoutError("diffusers VAE: no 'encoder.' or 'decoder.' keys")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for g, d in pairs:
        out[g] = take(state_dict, d, "diffusers VAE")
        used.add(d)
    for g, ds in fused:
        out[g] = torch.cat([take(state_dict, d, "diffusers VAE") for d in ds], dim=0)
        used.update(ds)
    check_all_used(state_dict, used, "diffusers VAE")
    return out
