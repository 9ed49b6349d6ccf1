"""LoRA files: our triplet, our relation-only export, and the reference implementation's checkpoints.

We write safetensors only. Our files hold peft-named keys of the diffusers model
(`transformer_blocks.{i}.attn1.{module}.lora_{A,B}.{adapter}.weight`) and string metadata:

| key | value |
|---|---|
| `format` | `dreamrelation.triplet` (all four adapters) or `dreamrelation.relation` (relation + ffn) |
| `format_version` | `1` |
| `base_model` | `mochi-1-preview` |
| `adapters`, `rank`, `alpha` | JSON: adapter list, {adapter: rank}, {adapter: alpha} |
| `targets` | JSON: {adapter: [module paths]} |
| `num_blocks`, `step` | integers as text |
| `config` | JSON of the training config (may be `{}`) |

Reading never runs code: safetensors, or `torch.load(weights_only=True)` for the reference `.pt`.
Every error names the file and the offending key and shape; a failed write leaves no file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..base_models import all_specs, get_spec
from ..dtypes import to_dtype_checked
from ..errors import LoraFormatError
from ..fileio import save_safetensors
from ..statedict import torch_load_reason
from . import genmo
from .layout import (
    ADAPTER_MODULES,
    ADAPTERS,
    INFERENCE_ADAPTERS,
    LoraSet,
    check_lora_pair,
    module_path,
    parse_module_path,
)

FORMAT_TRIPLET = "dreamrelation.triplet"
FORMAT_RELATION = "dreamrelation.relation"
FORMAT_REFERENCE = "reference"
FORMAT_VERSION = "1"

_OUR_KEY_RE = re.compile(r"^(?P<path>(?:transformer_)?blocks\.\d+\.attn[12]\.[a-z_]+(?:\.0)?)\.lora_(?P<ab>[AB])\.(?P<adapter>\w+)\.weight$")
# Reference (ali-vilab/DreamRelation) keys, e.g. blocks.3.attn.to_q_x.lora_A.relation / blocks.3.attn.proj_x.lora_B
_REF_KEY_RE = re.compile(
    r"^(?:model\.|module\.)?blocks\.(?P<block>\d+)\.attn\.(?P<mod>to_[qkv]_[xy]|proj_[xy])\.lora_(?P<ab>[AB])(?:\.(?!weight$)(?P<adapter>\w+))?(?:\.weight)?$"
)
_REF_MODULES = {
    "to_q_x": "to_q", "to_k_x": "to_k", "to_v_x": "to_v",
    "to_q_y": "add_q_proj", "to_k_y": "add_k_proj", "to_v_y": "add_v_proj",
    "proj_x": "to_out.0", "proj_y": "to_add_out",
}


# ---------------------------------------------------------------------------------------------
# writing


def lora_state_dict(lora: LoraSet, dtype: torch.dtype = torch.float32, source: str = "LoRA") -> dict[str, torch.Tensor]:
    """Our keys -> tensors in `dtype`; a value the dtype cannot hold (or a non-finite one) is a
    LoraFormatError naming the tensor."""
    sd = {}
    for adapter, mods in lora.weights.items():
        for path, (a, b) in mods.items():
            for ab, t in (("A", a), ("B", b)):
                key = f"{path}.lora_{ab}.{adapter}.weight"
                try:
                    sd[key] = to_dtype_checked(t.detach().to("cpu"), dtype, f"{source}: {key}").contiguous()
                except ValueError as e:
                    raise LoraFormatError(str(e)) from None
    return sd


def _metadata(lora: LoraSet, fmt: str, step: int, config: dict | None) -> dict[str, str]:
    adapters = lora.adapters
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "base_model": lora.spec.name,
        **({"placement": lora.spec.placement} if len(lora.spec.placements) > 1 else {}),
        **({"relation_placement": lora.spec.relation_placement} if len(lora.spec.relation_placements) > 1 else {}),
        "adapters": json.dumps(adapters),
        "rank": json.dumps({a: lora.rank[a] for a in adapters}),
        "alpha": json.dumps({a: lora.alpha[a] for a in adapters}),
        "targets": json.dumps({a: sorted(lora.weights[a]) for a in adapters}),
        "num_blocks": str(lora.num_blocks()),
        "step": str(int(step)),
        "config": json.dumps(config or {}, default=str),
    }


def save_triplet(
    path: str | os.PathLike, lora: LoraSet, *, step: int = 0, config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """All four adapters + metadata, written atomically."""
    missing = [a for a in ADAPTERS if a not in lora.adapters]
    if missing:
        raise LoraFormatError(f"{path}: a triplet file needs all four adapters; missing {missing}")
    return save_safetensors(Path(path), lora_state_dict(lora, dtype, str(path)), _metadata(lora, FORMAT_TRIPLET, step, config))


def save_relation_only(
    path: str | os.PathLike, lora: LoraSet, *, step: int = 0, config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Relation + ffn adapters only: the subject LoRAs (appearance) are dropped."""
    rel = lora.only(INFERENCE_ADAPTERS)
    if "relation" not in rel.adapters:
        raise LoraFormatError(f"{path}: nothing to export, the LoRA has no 'relation' adapter")
    return save_safetensors(Path(path), lora_state_dict(rel, dtype, str(path)), _metadata(rel, FORMAT_RELATION, step, config))


# ---------------------------------------------------------------------------------------------
# reading


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated header, bad offsets, not safetensors at all
        raise LoraFormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return sd, meta


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # includes pickles that reference code: weights_only refuses them
        raise LoraFormatError(
            f"{path}: cannot be read as plain tensors ({torch_load_reason(e)}); only tensor checkpoints are "
            "accepted, code is never run"
        ) from e


def _json_meta(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except KeyError:
        raise LoraFormatError(f"{path}: metadata key {key!r} missing") from None
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{path}: metadata {key!r} is not valid JSON ({e})") from e


def load_lora_file(path: str | os.PathLike) -> LoraSet:
    """Read any LoRA file we accept into a LoraSet; metadata["format"] says which kind it was.

    Kinds: our triplet / relation-only safetensors, the reference `.lora.pt` (or its safetensors
    with a JSON `kwargs` entry), and genmo/ComfyUI-key Mochi LoRAs (`blocks.N.attn.qkv_x...`).
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return import_reference(path)
    sd, meta = _read_safetensors(path)
    fmt = meta.get("format", "")
    if fmt in (FORMAT_TRIPLET, FORMAT_RELATION):
        return _parse_ours(path, sd, meta)
    # Before the reference check: genmo's `blocks.N.attn.proj_x.lora_A.weight` also fits the
    # reference key pattern, and our ComfyUI export (format dreamrelation.comfy) is genmo keys.
    if "kwargs" not in meta and genmo.is_genmo_lora(sd.keys()):
        lora = genmo.genmo_to_lora_set(sd, source=str(path))
        if fmt == genmo.FORMAT_COMFY:
            lora.metadata["written_as"] = fmt
        return lora
    if "kwargs" in meta or any(_REF_KEY_RE.match(k) for k in sd):
        return _parse_reference(path, sd, _json_meta(path, meta, "kwargs") if "kwargs" in meta else None)
    first = next(iter(sd), None)
    raise LoraFormatError(
        f"{path}: not a DreamRelation / Mochi LoRA file (metadata format={fmt or 'none'}; first key "
        f"{first!r}{' ' + str(tuple(sd[first].shape)) if first else ''}); expected keys like "
        f"'transformer_blocks.0.attn1.to_q.lora_A.relation.weight'"
    )


def _parse_ours(path: Path, sd: dict[str, torch.Tensor], meta: dict[str, str]) -> LoraSet:
    known = [s.name for s in all_specs()]
    if meta.get("base_model") not in known:
        raise LoraFormatError(f"{path}: made for base model {meta.get('base_model')!r}, expected one of {known}")
    spec = get_spec(meta["base_model"])
    spec = spec.with_placement(meta.get("placement", spec.placement))
    if meta.get("format_version") != FORMAT_VERSION:
        raise LoraFormatError(f"{path}: format_version {meta.get('format_version')!r}, this version reads {FORMAT_VERSION!r}")
    ranks = _json_meta(path, meta, "rank")
    alphas = _json_meta(path, meta, "alpha")
    lora = LoraSet(metadata={**meta})
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _OUR_KEY_RE.match(key)
        if m is None:
            raise LoraFormatError(f"{path}: unexpected key {key!r} {tuple(t.shape)}")
        p, ab, adapter = m.group("path"), m.group("ab"), m.group("adapter")
        try:
            _, sub = spec.parse_module_path(p)
        except ValueError:
            raise LoraFormatError(f"{path}: key {key!r} is not on a {spec.name} attention module") from None
        if adapter not in ADAPTERS:
            raise LoraFormatError(f"{path}: key {key!r} names unknown adapter {adapter!r}; expected one of {ADAPTERS}")
        if sub not in _allowed_modules(spec, adapter):
            raise LoraFormatError(f"{path}: key {key!r}: adapter {adapter!r} does not belong on {sub!r}")
        pending.setdefault((adapter, p), {})[ab] = t
    for (adapter, p), pair in pending.items():
        _add_pair(path, lora, adapter, p, pair, f"{p}.lora_{{}}.{adapter}.weight")
    for adapter in lora.weights:
        if adapter not in ranks or adapter not in alphas:
            raise LoraFormatError(f"{path}: metadata gives no rank/alpha for adapter {adapter!r}")
        _set_scale(path, lora, adapter, int(ranks[adapter]), float(alphas[adapter]))
    _check_relation_placement(path, lora, meta)
    _check_consistent(path, lora)
    lora.metadata["format"] = meta["format"]
    return lora


def _add_pair(path: Path, lora: LoraSet, adapter: str, p: str, pair: dict[str, torch.Tensor], key_fmt: str) -> None:
    for ab in ("A", "B"):
        if ab not in pair:
            raise LoraFormatError(f"{path}: key {key_fmt.format(ab)!r} missing (its lora_{'B' if ab == 'A' else 'A'} is present)")
    a, b = pair["A"], pair["B"]
    check_lora_pair(a, b, str(path), (repr(key_fmt.format("A")), repr(key_fmt.format("B"))))
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise LoraFormatError(f"{path}: {key_fmt.format('A/B')!r} holds non-finite values")
    lora.weights.setdefault(adapter, {})[p] = (a.float(), b.float())


def _set_scale(path: Path, lora: LoraSet, adapter: str, rank: int, alpha: float) -> None:
    for p, (a, _) in lora.weights[adapter].items():
        if a.shape[0] != rank:
            raise LoraFormatError(
                f"{path}: adapter {adapter!r} on {p}: lora_A has rank {a.shape[0]} {tuple(a.shape)}, the file states rank {rank}"
            )
    lora.rank[adapter] = rank
    lora.alpha[adapter] = alpha
    lora.scales[adapter] = alpha / rank


def _allowed_modules(spec, adapter: str) -> set[str]:
    """Submodules `adapter` may sit on: the relation adapter on any of the spec's relation
    placements (the method's Q/K, or an ablation's), the others where the spec has them."""
    if adapter != "relation":
        return set(spec.adapter_modules[adapter])
    return {m for mods in (spec.adapter_modules["relation"], *spec.relation_placements.values()) for m in mods}


def _check_relation_placement(path: Path, lora: LoraSet, meta: dict[str, str]) -> None:
    """The relation adapter's modules are one relation placement of the spec (its keys say which;
    a `relation_placement` in the metadata must agree)."""
    spec, rel = lora.spec, lora.weights.get("relation", {})
    found = spec.relation_placement_of(rel)
    if rel and found is None:
        subs = sorted({spec.parse_module_path(p)[1] for p in rel})
        known = {k: list(v) for k, v in spec.relation_placements.items()}
        raise LoraFormatError(f"{path}: the relation adapter sits on {subs}, not one of the known placements {known}")
    if rel and meta.get("relation_placement", found) != found:
        raise LoraFormatError(f"{path}: metadata relation_placement {meta['relation_placement']!r}, but the relation "
                              f"adapter's keys are on the {found!r} modules")


def _check_consistent(path: Path, lora: LoraSet) -> None:
    """Same widths everywhere (one base model), and every module of every adapter present."""
    dims: dict[str, tuple[int, int, str]] = {}  # sub-module kind -> (in, out, where first seen)
    n = lora.num_blocks()
    for adapter, mods in lora.weights.items():
        for p, (a, b) in mods.items():
            block, sub = parse_module_path(p)
            io = (a.shape[1], b.shape[0])
            if sub in dims and dims[sub][:2] != io:
                raise LoraFormatError(
                    f"{path}: {p} ({adapter}) maps {io[0]} -> {io[1]} features but {dims[sub][2]} maps "
                    f"{dims[sub][0]} -> {dims[sub][1]}: weights of different base models"
                )
            dims.setdefault(sub, (*io, p))
        missing = sorted(set(lora.spec.target_modules(adapter, n)) - set(mods))
        if missing:
            raise LoraFormatError(
                f"{path}: adapter {adapter!r} of a {n}-block model has no weights for {len(missing)} module(s): "
                + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            )
    vis = {dims[s][0] for s in ("to_q", "to_k", "to_v", "to_out.0") if s in dims}
    if len(vis) > 1:
        raise LoraFormatError(f"{path}: visual projections disagree on the model width: {sorted(vis)}")


# ---------------------------------------------------------------------------------------------
# reference checkpoints


def import_reference(path: str | os.PathLike) -> LoraSet:
    """Read a reference `model_<step>.lora.pt` (or its safetensors) into a LoraSet.

    Rank and alpha come from the file's kwargs (`qkv_proj_lora_rank/alpha`,
    `out_proj_lora_rank/alpha`), never assumed. metadata["report"] states what was applied and
    what was dropped (unknown adapter names; the last block's unused text-query LoRA).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        kwargs = _json_meta(path, meta, "kwargs")
        return _parse_reference(path, sd, kwargs)
    obj = _read_torch(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        got = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise LoraFormatError(f"{path}: expected a dict with 'state_dict' and 'kwargs' (reference checkpoint), got {got}")
    kwargs = obj.get("kwargs")
    if not isinstance(kwargs, dict):
        raise LoraFormatError(f"{path}: no 'kwargs' dict: rank and alpha are unknown, nothing is assumed")
    sd = obj["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LoraFormatError(f"{path}: state_dict entry {bad[0]!r} is {type(sd[bad[0]]).__name__}, not a tensor")
    return _parse_reference(path, sd, kwargs)


def _ref_number(path: Path, kwargs: dict, key: str) -> int | float:
    """A rank or alpha from a reference checkpoint's kwargs (missing: an error, never a default)."""
    if key not in kwargs or kwargs[key] is None:
        raise LoraFormatError(f"{path}: kwargs has no {key!r}: rank and alpha are read from the file, never assumed")
    return kwargs[key]


def _parse_reference(path: Path, sd: dict[str, torch.Tensor], kwargs: dict | None) -> LoraSet:
    if kwargs is None:
        raise LoraFormatError(f"{path}: reference-style keys but no 'kwargs' metadata: rank and alpha unknown")
    qkv_rank, qkv_alpha = int(_ref_number(path, kwargs, "qkv_proj_lora_rank")), float(_ref_number(path, kwargs, "qkv_proj_lora_alpha"))
    has_proj = any(".proj_" in k for k in sd)
    out_rank = int(_ref_number(path, kwargs, "out_proj_lora_rank")) if has_proj else 0
    out_alpha = float(_ref_number(path, kwargs, "out_proj_lora_alpha")) if has_proj else 0.0
    lora = LoraSet(metadata={"format": FORMAT_REFERENCE, "source": str(path), "kwargs": json.dumps(kwargs, default=str)})
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keynames: dict[tuple[str, str], str] = {}
    dropped: list[str] = []
    for key, t in sd.items():
        m = _REF_KEY_RE.match(key)
        if m is None:
            raise LoraFormatError(f"{path}: unexpected key {key!r} {tuple(t.shape)} in a reference checkpoint")
        block, mod, ab, name = int(m.group("block")), m.group("mod"), m.group("ab"), m.group("adapter")
        sub = _REF_MODULES[mod]
        adapter = "ffn" if mod.startswith("proj_") else name
        if adapter is None:
            raise LoraFormatError(f"{path}: key {key!r} has no adapter name")
        if adapter not in ADAPTERS or sub not in ADAPTER_MODULES[adapter]:
            dropped.append(key)
            continue
        p = module_path(block, sub)
        pending.setdefault((adapter, p), {})[ab] = t
        keynames[(adapter, p)] = key.replace(f"lora_{ab}", "lora_{}")
    for (adapter, p), pair in pending.items():
        _add_pair(path, lora, adapter, p, pair, keynames[(adapter, p)])
    if not lora.weights:
        raise LoraFormatError(f"{path}: no LoRA weights of a known adapter; dropped keys: {dropped[:6]}")
    # The last block's text queries are discarded by the model: its LoRA does nothing, drop it.
    n = lora.num_blocks()
    last_q = module_path(n - 1, "add_q_proj")
    if last_q in lora.weights.get("relation", {}):
        del lora.weights["relation"][last_q]
        dropped.append(f"blocks.{n - 1}.attn.to_q_y (unused: last block's text queries are discarded)")
    for adapter in lora.weights:
        r, al = (out_rank, out_alpha) if adapter == "ffn" else (qkv_rank, qkv_alpha)
        _set_scale(path, lora, adapter, r, al)
    _check_consistent(path, lora)
    applied = {a: len(m) for a, m in lora.weights.items()}
    lora.metadata["report"] = json.dumps({"applied": applied, "dropped": dropped})
    return lora


def describe(lora: LoraSet) -> str:
    """One human-readable paragraph: adapters, modules, blocks, rank, scale; and any import report."""
    lines = [f"format: {lora.metadata.get('format', '?')}, blocks: {lora.num_blocks()}"]
    for a in lora.adapters:
        lines.append(
            f"  {a}: {len(lora.weights[a])} modules, rank {lora.rank.get(a)}, alpha {lora.alpha.get(a)}, "
            f"scale {lora.scales.get(a, 0):.4g}"
        )
    if "report" in lora.metadata:
        rep = json.loads(lora.metadata["report"])
        if rep.get("dropped"):
            lines.append(f"  dropped {len(rep['dropped'])} key(s): " + ", ".join(rep["dropped"][:6]) + (" ..." if len(rep["dropped"]) > 6 else ""))
    return "\n".join(lines)
