"""In-memory LoRA weights in one layout every format converts to and from.

A `LoraSet` maps adapter name -> diffusers module path -> (A, B), with one scale per adapter.
Module paths are the diffusers names of the Mochi joint attention, e.g.
`transformer_blocks.3.attn1.to_q` or `transformer_blocks.3.attn1.to_out.0`.
The weight delta of one module is  scale * B @ A  (A: [r, in], B: [out, r]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import LoraFormatError

BASE_MODEL = "mochi-1-preview"  # the one base model these layouts and files are for

ADAPTERS = ("relation", "subject1", "subject2", "ffn")
# Adapters kept at inference: subject LoRAs carry appearance and are dropped.
INFERENCE_ADAPTERS = ("relation", "ffn")

# adapter -> attention submodules it sits on (visual, then text).
ADAPTER_MODULES: dict[str, tuple[str, ...]] = {
    "relation": ("to_q", "to_k", "add_q_proj", "add_k_proj"),
    "subject1": ("to_v", "add_v_proj"),
    "subject2": ("to_v", "add_v_proj"),
    "ffn": ("to_out.0", "to_add_out"),
}

# Where the relation adapter may sit (ablation variants, docs/ablation.md): "qk" is the method's
# placement; the others move it to the value projections, the queries or keys only, or all three.
# The subject adapters stay on V whatever the relation's placement.
RELATION_PLACEMENTS: dict[str, tuple[str, ...]] = {
    "qk": ADAPTER_MODULES["relation"],
    "q": ("to_q", "add_q_proj"),
    "k": ("to_k", "add_k_proj"),
    "v": ("to_v", "add_v_proj"),
    "kv": ("to_k", "to_v", "add_k_proj", "add_v_proj"),
    "qkv": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"),
}


def adapter_modules(relation_placement: str = "qk") -> dict[str, tuple[str, ...]]:
    """ADAPTER_MODULES with the relation adapter at `relation_placement` (a RELATION_PLACEMENTS key)."""
    if relation_placement not in RELATION_PLACEMENTS:
        raise ValueError(f"unknown relation placement {relation_placement!r}; expected one of {sorted(RELATION_PLACEMENTS)}")
    return {**ADAPTER_MODULES, "relation": RELATION_PLACEMENTS[relation_placement]}


def placement_of(subs: set[str]) -> str | None:
    """The RELATION_PLACEMENTS key whose modules are `subs`, or None. `add_q_proj` may be absent
    (a one-block model has none: the last block leaves it out); the placements differ without it."""
    for name, mods in RELATION_PLACEMENTS.items():
        if set(subs) - {"add_q_proj"} == set(mods) - {"add_q_proj"}:
            return name
    return None


MODULE_RE = re.compile(
    r"^transformer_blocks\.(\d+)\.attn1\."
    r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$"
)


def module_path(block: int, sub: str) -> str:
    return f"transformer_blocks.{block}.attn1.{sub}"


def parse_module_path(path: str) -> tuple[int, str]:
    """`transformer_blocks.3.attn1.to_q` -> (3, "to_q"); ValueError for anything else."""
    m = MODULE_RE.match(path)
    if m is None:
        raise ValueError(f"not a Mochi joint-attention module path: {path!r}")
    return int(m.group(1)), m.group(2)


def target_modules(adapter: str, num_layers: int, relation_placement: str = "qk") -> list[str]:
    """Module paths an adapter is trained on in a model with `num_layers` blocks.

    The last block discards its text stream: its `add_q_proj` only ever gets a zero gradient
    and it has no `to_add_out`, so both are left out.
    """
    out = []
    for i in range(num_layers):
        for sub in adapter_modules(relation_placement)[adapter]:
            if i == num_layers - 1 and sub in ("add_q_proj", "to_add_out"):
                continue
            out.append(module_path(i, sub))
    return out


def check_lora_pair(a: torch.Tensor, b: torch.Tensor, where: str, names: tuple[str, str] = ("A", "B")) -> None:
    """LoraFormatError unless A [r, in] and B [out, r] make one LoRA; `where` and `names` name them."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LoraFormatError(
            f"{where}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} are not a LoRA pair "
            f"(expected A [r, in], B [out, r])"
        )


@dataclass
class LoraSet:
    """LoRA weights per adapter; see module docstring.

    weights[adapter][module_path] = (A [r, in], B [out, r]); scales[adapter] = alpha / rank.
    """

    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    rank: dict[str, int] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def adapters(self) -> list[str]:
        return [a for a in self.weights if self.weights[a]]

    def delta(self, adapter: str, path: str) -> torch.Tensor:
        """Dense weight delta scale * B @ A of one module, float32."""
        a, b = self.weights[adapter][path]
        return self.scales[adapter] * (b.float() @ a.float())

    def only(self, adapters: tuple[str, ...] | list[str]) -> LoraSet:
        """A copy restricted to `adapters` (tensors shared, not cloned)."""
        keep = [a for a in self.weights if a in adapters]
        return LoraSet(
            weights={a: dict(self.weights[a]) for a in keep},
            scales={a: self.scales[a] for a in keep},
            rank={a: self.rank[a] for a in keep if a in self.rank},
            alpha={a: self.alpha[a] for a in keep if a in self.alpha},
            metadata=dict(self.metadata),
        )

    def num_blocks(self) -> int:
        blocks = [parse_module_path(p)[0] for w in self.weights.values() for p in w]
        return max(blocks) + 1 if blocks else 0
