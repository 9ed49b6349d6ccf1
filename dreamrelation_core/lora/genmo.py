"""Our LoRAs <-> ComfyUI / genmo Mochi weight keys (no ComfyUI import).

ComfyUI's Mochi (genmo's `AsymmDiTJoint`) fuses the attention input projections of block i into
one weight per stream: `blocks.i.attn.qkv_x.weight` [3d, d] (visual) and `…qkv_y.weight` [3d, d_y]
(text), rows q 0:d, k d:2d, v 2d:3d. Output projections are `proj_x` / `proj_y`.

A relation LoRA puts separate (A_q, B_q) and (A_k, B_k) on Q and K. Both map exactly onto the
fused weight as ONE LoRA of rank r_q + r_k:

    A = [A_q; A_k]                       [r_q + r_k, in]
    B = [[s·B_q, 0], [0, s·B_k], [0, 0]] [3d, r_q + r_k]   (rows q, k, v; scale s folded into B)

so  B @ A = [s·B_q A_q; s·B_k A_k; 0]: the Q delta lands on rows 0:d, the K delta on d:2d and V
is untouched. This is a plain LoRA that stock ComfyUI (`LoraLoaderModelOnly`) reads in genmo key
names (`blocks.i.attn.qkv_x.lora_A.weight` / `.lora_B.weight` / `.alpha`; `.alpha` = rank, so
ComfyUI's alpha / rank factor is 1 and the scale lives in B). FFN LoRAs go on `proj_x` /
`proj_y` as they are. Subject LoRAs (V) never reach the model: only INFERENCE_ADAPTERS are mapped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from ..dtypes import to_dtype_checked
from ..errors import LoraFormatError
from ..fileio import save_safetensors
from ..statedict import indices
from .layout import BASE_MODEL, INFERENCE_ADAPTERS, LoraSet, check_lora_pair, module_path, parse_module_path

FORMAT_COMFY = "dreamrelation.comfy"  # metadata of our export (a plain genmo-key LoRA)
FORMAT_GENMO = "genmo"  # LoraSet metadata["format"] of a genmo-key LoRA read back

# diffusers sub-module -> (genmo module, slot in the fused weight: 0 q, 1 k, 2 v; None = unfused)
GENMO_MODULE: dict[str, tuple[str, int | None]] = {
    "to_q": ("qkv_x", 0),
    "to_k": ("qkv_x", 1),
    "to_v": ("qkv_x", 2),
    "add_q_proj": ("qkv_y", 0),
    "add_k_proj": ("qkv_y", 1),
    "add_v_proj": ("qkv_y", 2),
    "to_out.0": ("proj_x", None),
    "to_add_out": ("proj_y", None),
}
# genmo module -> diffusers sub-modules by slot (unfused: one entry)
DIFFUSERS_SUBS: dict[str, tuple[str, ...]] = {
    "qkv_x": ("to_q", "to_k", "to_v"),
    "qkv_y": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "proj_x": ("to_out.0",),
    "proj_y": ("to_add_out",),
}
# Adapter a genmo LoRA's rows go to when read back. V rows have no inference adapter: a shared
# V delta is neither subject's appearance, so it is reported and dropped, never guessed.
SUB_ADAPTER = {"to_q": "relation", "to_k": "relation", "add_q_proj": "relation", "add_k_proj": "relation",
               "to_out.0": "ffn", "to_add_out": "ffn"}

# Accepted genmo/ComfyUI LoRA key spellings (what ComfyUI's own loader accepts for Mochi).
_GENMO_KEY_RE = re.compile(
    r"^(?:model\.)?(?:diffusion_model\.)?blocks\.(?P<block>\d+)\.attn\.(?P<mod>qkv_x|qkv_y|proj_x|proj_y)"
    r"\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_A|lora_B|lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_KEY_RE = re.compile(
    r"^lora_unet_blocks_(?P<block>\d+)_attn_(?P<mod>qkv_x|qkv_y|proj_x|proj_y)"
    r"\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$"
)
_DOWN = {"lora_A.weight", "lora_A", "lora_down.weight"}
_UP = {"lora_B.weight", "lora_B", "lora_up.weight"}


def genmo_name(block: int, module: str) -> str:
    """`blocks.3.attn.qkv_x`: the LoRA key stem ComfyUI maps to `diffusion_model.blocks.3.attn.qkv_x.weight`."""
    return f"blocks.{block}.attn.{module}"


class FusedLora(NamedTuple):
    """One plain LoRA on a genmo weight: delta = up @ down (scale already folded into `up`)."""

    down: torch.Tensor  # A [R, in]
    up: torch.Tensor  # B [out, R]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        return self.up.float() @ self.down.float()


# ---------------------------------------------------------------------------------------------
# LoraSet -> genmo keys


def _inference_modules(lora: LoraSet, adapters: Iterable[str]) -> dict[tuple[int, str], list[tuple[str, str]]]:
    """(block, genmo module) -> [(adapter, diffusers sub)] for the adapters kept."""
    out: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for adapter in adapters:
        for path in lora.weights.get(adapter, {}):
            block, sub = parse_module_path(path)
            out.setdefault((block, GENMO_MODULE[sub][0]), []).append((adapter, sub))
    return out


def _fuse_one(lora: LoraSet, block: int, module: str, entries: list[tuple[str, str]], source: str) -> FusedLora:
    """Stack the per-sub-module LoRAs of one genmo weight into one LoRA (see module docstring)."""
    pairs = []
    for adapter, sub in sorted(entries, key=lambda e: DIFFUSERS_SUBS[module].index(e[1])):
        path = module_path(block, sub)
        a, b = lora.weights[adapter][path]
        check_lora_pair(a, b, f"{source}: {path} ({adapter})")
        pairs.append((GENMO_MODULE[sub][1], path, adapter, a.float(), lora.scales.get(adapter, 1.0) * b.float()))
    ins = {p[3].shape[1] for p in pairs}
    outs = {p[4].shape[0] for p in pairs}
    if len(ins) != 1 or len(outs) != 1:
        shapes = ", ".join(f"{p[1]} A {tuple(p[3].shape)} B {tuple(p[4].shape)}" for p in pairs)
        raise LoraFormatError(f"{source}: LoRAs fused into {genmo_name(block, module)} disagree in width: {shapes}")
    d = outs.pop()
    slot = pairs[0][0]
    if slot is None:  # unfused output projection: one LoRA, as it is
        return FusedLora(pairs[0][3].contiguous(), pairs[0][4].contiguous())
    down = torch.cat([p[3] for p in pairs], dim=0)
    up = torch.zeros(3 * d, down.shape[0])
    col = 0
    for slot, _, _, a, b in pairs:
        up[slot * d:(slot + 1) * d, col:col + a.shape[0]] = b  # block-diagonal: its own rows only
        col += a.shape[0]
    return FusedLora(down.contiguous(), up)


def fused_loras(
    lora: LoraSet, adapters: Iterable[str] = INFERENCE_ADAPTERS, source: str = "LoRA"
) -> dict[str, FusedLora]:
    """genmo key stem (`blocks.i.attn.qkv_x`) -> FusedLora for the given adapters (default:
    relation + ffn; subject LoRAs are never mapped unless asked for explicitly)."""
    adapters = [a for a in adapters if a in lora.weights]
    out = {}
    for (block, module), entries in sorted(_inference_modules(lora, adapters).items()):
        out[genmo_name(block, module)] = _fuse_one(lora, block, module, entries, source)
    return out


def comfy_state_dict(
    lora: LoraSet, *, adapters: Iterable[str] = INFERENCE_ADAPTERS, dtype: torch.dtype = torch.float32,
    source: str = "LoRA", target: str | None = None,
) -> dict[str, torch.Tensor]:
    """Genmo-key LoRA state dict (`blocks.i.attn.qkv_x.lora_A.weight` / `.lora_B.weight` /
    `.alpha`) that ComfyUI's stock LoRA loader applies to its Mochi. A value `dtype` cannot hold
    is a LoraFormatError naming `target` (the file being written) and the tensor."""
    sd = {}
    for stem, f in fused_loras(lora, adapters, source).items():
        for key, t in ((f"{stem}.lora_A.weight", f.down), (f"{stem}.lora_B.weight", f.up)):
            try:
                sd[key] = to_dtype_checked(t, dtype, f"{target or source}: {key}").contiguous()
            except ValueError as e:
                raise LoraFormatError(str(e)) from None
        # alpha = rank: ComfyUI multiplies by alpha / rank = 1; the scale is already in B.
        sd[f"{stem}.alpha"] = torch.tensor(float(f.rank))
    if not sd:
        raise LoraFormatError(f"{source}: no {' / '.join(adapters)} LoRA weights to export (adapters present: {lora.adapters})")
    return sd


def check_against_model(
    fused: Mapping[str, FusedLora], weight_shapes: Mapping[str, tuple[int, ...]], source: str, model_name: str = "the model"
) -> None:
    """Raise a LoraFormatError naming the file, key and shapes if a fused LoRA does not fit.

    `weight_shapes`: genmo weight key (`blocks.i.attn.qkv_x.weight`, no `diffusion_model.` prefix)
    -> shape, as the target model holds them.
    """
    model_blocks = sum(1 for k in weight_shapes if k.endswith(".attn.qkv_x.weight"))
    lora_blocks = 1 + max(indices(fused, "blocks."), default=-1)
    for stem, f in fused.items():
        key = f"{stem}.weight"
        shape = weight_shapes.get(key)
        if shape is None:
            raise LoraFormatError(
                f"{source}: key {stem} targets {key}, which {model_name} does not have "
                f"(the LoRA has {lora_blocks} blocks, {model_name} has {model_blocks} Mochi blocks)"
            )
        want = (int(f.up.shape[0]), int(f.down.shape[1]))
        if tuple(shape) != want:
            raise LoraFormatError(
                f"{source}: key {stem}: LoRA delta is {list(want)} (lora_B {tuple(f.up.shape)} @ lora_A "
                f"{tuple(f.down.shape)}) but {model_name}'s {key} is {list(shape)}: the LoRA was made for a "
                f"different base model"
            )


def save_comfy_lora(
    path: str | Path, lora: LoraSet, *, dtype: torch.dtype = torch.float32, source: str | None = None
) -> Path:
    """Write relation + ffn of `lora` as a stock genmo-key Mochi LoRA (safetensors, atomic: a
    failure leaves no file)."""
    source = source or lora.metadata.get("source", "LoRA")
    sd = comfy_state_dict(lora, dtype=dtype, source=source, target=str(path))
    kept = [a for a in INFERENCE_ADAPTERS if a in lora.weights]
    meta = {
        "format": FORMAT_COMFY,
        "base_model": BASE_MODEL,
        "adapters": json.dumps(kept),
        "dropped_adapters": json.dumps([a for a in lora.adapters if a not in kept]),
        "num_blocks": str(lora.num_blocks()),
        "source": Path(str(source)).name,
    }
    return save_safetensors(path, sd, meta)  # a failed write leaves no file and no old file clobbered


# ---------------------------------------------------------------------------------------------
# genmo keys -> LoraSet


def _match(key: str) -> re.Match | None:
    return _GENMO_KEY_RE.match(key) or _KOHYA_KEY_RE.match(key)


def is_genmo_lora(keys: Iterable[str]) -> bool:
    """True when every key is a genmo/ComfyUI Mochi attention LoRA key (any accepted spelling)."""
    keys = list(keys)
    return bool(keys) and all(_match(k) for k in keys)


def _group_genmo(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in state_dict.items():
        m = _match(key)
        if m is None:
            raise LoraFormatError(f"{source}: key {key!r} {tuple(t.shape)} is not a Mochi attention LoRA key "
                         f"(expected e.g. 'blocks.0.attn.qkv_x.lora_A.weight')")
        kind = m.group("kind")
        role = "down" if kind in _DOWN else "up" if kind in _UP else "alpha"
        g = groups.setdefault((int(m.group("block")), m.group("mod")), {})
        if role in g:
            raise LoraFormatError(f"{source}: key {key!r} duplicates the {role} weight of {genmo_name(int(m.group('block')), m.group('mod'))}")
        g[role] = t
    return groups


def _split_rows(source: str, stem: str, module: str, g: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """One genmo LoRA -> [(diffusers sub, A, B·scale)] per row slot."""
    if "down" not in g or "up" not in g:
        missing = "lora_A (down)" if "down" not in g else "lora_B (up)"
        raise LoraFormatError(f"{source}: {stem} has no {missing} weight")
    down, up = g["down"].float(), g["up"].float()
    check_lora_pair(down, up, f"{source}: {stem}", ("lora_A", "lora_B"))
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise LoraFormatError(f"{source}: {stem} holds non-finite values")
    scale = float(g["alpha"].float().item()) / down.shape[0] if "alpha" in g else 1.0
    subs = DIFFUSERS_SUBS[module]
    if up.shape[0] % len(subs):
        raise LoraFormatError(f"{source}: {stem}: lora_B {tuple(up.shape)} has {up.shape[0]} rows, not divisible into q, k, v")
    d = up.shape[0] // len(subs)
    return [(sub, down, scale * up[i * d:(i + 1) * d]) for i, sub in enumerate(subs)]


def _compact(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop rank columns that contribute nothing (B column zero): our block-diagonal export
    of a rank-r pair comes back as rank r, exactly."""
    keep = b.abs().sum(dim=0) != 0
    return a[keep].contiguous(), b[:, keep].contiguous()


def _pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Zero rows of A / columns of B change nothing and give every module of an adapter one rank.
    extra = r - a.shape[0]
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def genmo_to_lora_set(state_dict: Mapping[str, torch.Tensor], source: str) -> LoraSet:
    """A genmo/ComfyUI-key Mochi LoRA -> LoraSet (relation on Q/K rows, ffn on proj_x / proj_y).

    Scales (alpha / rank) are folded into B, so every adapter gets scale 1. Rows of a fused LoRA
    that are zero are left out; V rows that are not zero have no place in the triplet (a shared V
    change is neither subject) and are dropped and listed in metadata["report"].
    """
    lora = LoraSet(metadata={"format": FORMAT_GENMO, "source": str(source)})
    dropped: list[str] = []
    for (block, module), g in sorted(_group_genmo(state_dict, source).items()):
        stem = genmo_name(block, module)
        for sub, a, b in _split_rows(source, stem, module, g):
            a, b = _compact(a, b)
            if a.shape[0] == 0:
                continue  # no delta on these rows
            adapter = SUB_ADAPTER.get(sub)
            if adapter is None:
                dropped.append(f"{stem} {sub} rows (V: not part of a relation LoRA)")
                continue
            lora.weights.setdefault(adapter, {})[module_path(block, sub)] = (a, b)
    for adapter, mods in lora.weights.items():
        r = max(a.shape[0] for a, _ in mods.values())
        for p, (a, b) in mods.items():
            mods[p] = _pad_rank(a, b, r)
        lora.rank[adapter], lora.alpha[adapter], lora.scales[adapter] = r, float(r), 1.0
    if not lora.weights:
        raise LoraFormatError(f"{source}: no Q, K or output-projection LoRA weights found ({len(state_dict)} keys)")
    applied = {a: len(m) for a, m in lora.weights.items()}
    lora.metadata["report"] = json.dumps({"applied": applied, "dropped": dropped})
    return lora
