"""Relation LoRA triplet on diffusers' `MochiTransformer3DModel`, as peft adapters.

Four named adapters (docs/method.md "Relation LoRA triplet"):
- `relation`: visual and text Q and K projections (`to_q`, `to_k`, `add_q_proj`, `add_k_proj`);
- `subject1`, `subject2`: visual and text V projections (`to_v`, `add_v_proj`);
- `ffn`: both attention output projections (`to_out.0`, `to_add_out`), always active.
Only the 48 (here: `num_layers`) joint-attention blocks get LoRAs; the time-embedding pooler does
not, and the last block's text-query projection (its output is discarded) is left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .layout import ADAPTERS, INFERENCE_ADAPTERS, LoraSet, target_modules

# Branches of hybrid mask training and the adapters each one trains (docs/method.md "Hybrid mask training").
BRANCHES = ("relation", "subject1", "subject2")
BRANCH_ADAPTERS: dict[str, tuple[str, ...]] = {
    "relation": ("relation", "subject1", "subject2", "ffn"),
    "subject1": ("subject1", "ffn"),
    "subject2": ("subject2", "ffn"),
}


def num_blocks(model: nn.Module) -> int:
    return len(model.transformer_blocks)


def add_triplet(
    model: nn.Module, rank: int | dict[str, int] = 16, alpha: float | dict[str, float] = 16.0, dropout: float = 0.0,
    relation_placement: str = "qk",
) -> nn.Module:
    """Freeze `model` and add the four adapters (A kaiming-uniform, B zeros); returns `model`.

    `rank` / `alpha` may be given per adapter (imported checkpoints use one rank for the Q/K/V
    LoRAs and another for the output projections). `relation_placement` moves the relation
    adapter off Q/K for ablations (layout.RELATION_PLACEMENTS)."""
    from peft import LoraConfig

    if not hasattr(model, "transformer_blocks"):
        raise TypeError(f"expected a MochiTransformer3DModel, got {type(model).__name__}")
    model.requires_grad_(False)
    n = num_blocks(model)
    for name in ADAPTERS:
        cfg = LoraConfig(
            r=rank[name] if isinstance(rank, dict) else rank,
            lora_alpha=alpha[name] if isinstance(alpha, dict) else alpha,
            lora_dropout=dropout,
            init_lora_weights=True,
            target_modules=target_modules(name, n, relation_placement),  # full paths: nothing else can match
        )
        with warnings.catch_warnings():
            # peft warns on every adapter after the first; several adapters is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(cfg, adapter_name=name)
    object.__setattr__(model, "_dreamrelation_tuner_layers", None)  # new layers: find them again
    activate(model, ADAPTERS)
    _check_frozen_base(model)
    return model


def activate(model: nn.Module, adapters: Iterable[str]) -> None:
    """Make exactly `adapters` active and trainable; all other LoRA weights contribute nothing
    and get requires_grad=False (so they receive no gradient and the optimizer skips them)."""
    wanted = list(adapters)
    for layer in _tuner_layers(model):
        # peft's own switch: sets the layer's active list (possibly empty) and requires_grad
        # True for listed adapters, False for the others.
        layer.set_adapter([a for a in wanted if a in layer.lora_A])


def _tuner_layers(model: nn.Module) -> list:
    """The model's LoRA layers, found once and cached (activation runs every training step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cached = getattr(model, "_dreamrelation_tuner_layers", None)
    if cached is None:
        cached = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        object.__setattr__(model, "_dreamrelation_tuner_layers", cached)  # not a submodule
    return cached


def draw_branch(generator: torch.Generator) -> str:
    """One of BRANCHES, uniformly, from the seeded generator."""
    return BRANCHES[int(torch.randint(len(BRANCHES), (1,), generator=generator))]


def activate_branch(model: nn.Module, branch: str) -> tuple[str, ...]:
    if branch not in BRANCH_ADAPTERS:
        raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES}")
    adapters = BRANCH_ADAPTERS[branch]
    activate(model, adapters)
    return adapters


def activate_inference(model: nn.Module) -> None:
    """Relation + ffn only: subject LoRAs carry appearance and are dropped at inference."""
    activate(model, INFERENCE_ADAPTERS)


def _check_frozen_base(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in name:
            raise RuntimeError(f"base weight {name} is trainable; the base model must stay frozen")


def lora_parameters(model: nn.Module, adapter: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA weight, or of one adapter's."""
    out = []
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            if adapter is None or name.split(".")[-2] == adapter:
                out.append((name, p))
    return out


def _lora_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def to_lora_set(model: nn.Module) -> LoraSet:
    """Copy the model's adapters into a `LoraSet` (float32 CPU tensors)."""
    ls = LoraSet()
    for path, layer in _lora_layers(model):
        for adapter in layer.lora_A:
            a = layer.lora_A[adapter].weight.detach().float().cpu().clone()
            b = layer.lora_B[adapter].weight.detach().float().cpu().clone()
            ls.weights.setdefault(adapter, {})[path] = (a, b)
            ls.scales[adapter] = float(layer.scaling[adapter])
            ls.rank[adapter] = int(layer.r[adapter])
            ls.alpha[adapter] = float(layer.lora_alpha[adapter])
    return ls


def load_lora_set(model: nn.Module, lora: LoraSet, strict: bool = True) -> list[str]:
    """Copy weights of `lora` into the model's existing adapters. Returns the module paths filled.

    A rank or shape that does not fit raises ValueError naming the module, adapter and shapes.
    Scales differing from the model's adapter config are folded into B so outputs match.
    """
    layers = dict(_lora_layers(model))
    filled = []
    for adapter, mods in lora.weights.items():
        for path, (a, b) in mods.items():
            layer = layers.get(path)
            if layer is None or adapter not in layer.lora_A:
                if strict:
                    raise ValueError(f"model has no adapter {adapter!r} on module {path}")
                continue
            wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if tuple(a.shape) != tuple(wa.shape) or tuple(b.shape) != tuple(wb.shape):
                raise ValueError(
                    f"{path} adapter {adapter!r}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                    f"the model's A {tuple(wa.shape)}, B {tuple(wb.shape)}"
                )
            ratio = lora.scales[adapter] / float(layer.scaling[adapter])
            with torch.no_grad():
                wa.copy_(a.to(wa.dtype))
                wb.copy_((b.float() * ratio).to(wb.dtype))
            filled.append(f"{path}:{adapter}")
    return filled
