"""In-memory LoRA weights in one layout every format converts to and from.

A `LoraSet` maps adapter name -> diffusers module path -> (A, B), with one scale per adapter.
Module paths are the diffusers names of the base model's attention projections, e.g. Mochi's
`transformer_blocks.3.attn1.to_q` or `transformer_blocks.3.attn1.to_out.0` (each base model's
spec, `basemodel.BaseModelSpec`, says which).
The weight delta of one module is  scale * B @ A  (A: [r, in], B: [out, r]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base_models import spec_of_module_path
from ..basemodel import BaseModelSpec
from ..errors import LoraFormatError
from ..mochi.spec import MOCHI

BASE_MODEL = MOCHI.name  # the base model of LoRAs whose module paths name no other (see base_models)

ADAPTERS = ("relation", "subject1", "subject2", "ffn")
# Adapters kept at inference: subject LoRAs carry appearance and are dropped.
INFERENCE_ADAPTERS = ("relation", "ffn")

# adapter -> attention submodules it sits on, Mochi's (each base model's are in its spec).
ADAPTER_MODULES: dict[str, tuple[str, ...]] = dict(MOCHI.adapter_modules)

MODULE_RE = MOCHI.module_re


def module_path(block: int, sub: str, spec: BaseModelSpec = MOCHI) -> str:
    return spec.module_path(block, sub)


def parse_module_path(path: str) -> tuple[int, str]:
    """`transformer_blocks.3.attn1.to_q` -> (3, "to_q"), for the module paths of any base model's
    LoRA targets; ValueError for anything else."""
    return spec_of_module_path(path).parse_module_path(path)


def target_modules(adapter: str, num_layers: int, spec: BaseModelSpec = MOCHI) -> list[str]:
    """Module paths an adapter is trained on in a model with `num_layers` blocks (the spec says
    which: Mochi's last block leaves out its text query and text output projections)."""
    return spec.target_modules(adapter, num_layers)


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

    @property
    def spec(self) -> BaseModelSpec:
        """The base model whose modules these are (Mochi for an empty set), with the adapter
        placement its metadata names and the relation placement its relation weights sit on
        (the keys say it; the spec's default when they match none)."""
        spec = next((spec_of_module_path(p) for w in self.weights.values() for p in w), MOCHI)
        spec = spec.with_placement(self.metadata.get("placement", spec.placement))
        found = spec.relation_placement_of(self.weights.get("relation", {}))
        return spec if found is None else spec.with_relation_placement(found)

    def num_blocks(self) -> int:
        blocks = [parse_module_path(p)[0] for w in self.weights.values() for p in w]
        return max(blocks) + 1 if blocks else 0
