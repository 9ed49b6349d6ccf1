"""One place that turns a loaded Mochi into the model a training step runs, for the trainer and
for the meta-device memory trace alike: frozen Linears in their storage dtype, the LoRA triplet
on top (fp32), block swap or the sharding of the blocks over the ranks (shard.py), then the move
to the device, then gradient checkpointing (optionally with the checkpointed inputs offloaded)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...base_models import spec_of_model
from ...basemodel import BaseModelSpec, model_class_name
from ...lora import peft_triplet as triplet
from ...mochi import attention as mochi_attention
from ...mochi import fp8
from .activations import ActivationOffload, checkpoint_function
from .shard import ShardInfo, shard_blocks
from .swap import BlockSwap

SWAP_AND_SHARD = ("blocks_to_swap and shard_base exclude each other: a sharded base keeps 1/N of each block on "
                  "every GPU already; set blocks_to_swap to 0 (or auto) or shard_base to false")
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class MemoryOptions:
    """Resolved memory options of a run (no 'auto' left)."""

    base_dtype: str = "bf16"  # storage of the frozen Linear weights: fp32, bf16 or fp8
    blocks_to_swap: int = 0
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    # the frozen block weights sharded over the ranks of a torchrun launch (FSDP2, shard.py)
    shard_base: bool = False

    def __post_init__(self) -> None:
        if self.base_dtype not in STORAGE_DTYPES:
            raise ValueError(f"base_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.base_dtype!r}")
        if self.blocks_to_swap < 0:
            raise ValueError(f"blocks_to_swap must be >= 0, got {self.blocks_to_swap}")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("offload_activations needs gradient_checkpointing (it offloads the checkpointed block inputs)")
        if self.shard_base and self.blocks_to_swap:
            raise ValueError(SWAP_AND_SHARD)

    def label(self) -> str:
        parts = [self.base_dtype, "ckpt" if self.gradient_checkpointing else "no-ckpt"]
        if self.blocks_to_swap:
            parts.append(f"swap{self.blocks_to_swap}")
        if self.offload_activations:
            parts.append("offload")
        if self.shard_base:
            parts.append("shard")
        return " ".join(parts)


@dataclass
class Prepared:
    swap: BlockSwap | None
    offload: ActivationOffload | None
    shard: ShardInfo | None = None


def prepare_model(
    model: nn.Module, options: MemoryOptions, device: torch.device | str, rank: int = 16, alpha: float = 16.0,
    dropout: float = 0.0, swap_kwargs: dict[str, Any] | None = None, offload: ActivationOffload | None = None,
    recompute_context: Callable[[], AbstractContextManager] | None = None, spec: BaseModelSpec | None = None,
) -> Prepared:
    """Frozen Linears stored in `options.base_dtype` (fp32 keeps the loaded dtype), LoRA triplet in
    fp32 (where `spec` places it), block swap or sharding (which needs an initialised process group
    of several ranks), move to `device`, gradient checkpointing. Changes `model` in place."""
    device = torch.device(device)
    storage = None if options.base_dtype == "fp32" else STORAGE_DTYPES[options.base_dtype]
    spec = spec or spec_of_model(model)
    fp8.freeze_linears(model, storage, keep=spec.keep_precision)
    triplet.add_triplet(model, rank, alpha, dropout, spec=spec)
    if model_class_name(model) == "MochiTransformer3DModel":  # the valid text tokens found once per step, not per block
        mochi_attention.install(model)
    for layer in triplet._tuner_layers(model):
        # peft would cast each LoRA input to fp32 (a full-size copy per layer, kept for backward
        # under autocast); the LoRA matmul runs in the autocast dtype anyway, so skip the cast.
        layer.cast_input_dtype_enabled = False
    for _, p in triplet.lora_parameters(model):
        p.data = p.data.float()  # fp32 master weights whatever the base dtype
    swap = BlockSwap(model, options.blocks_to_swap, device, **(swap_kwargs or {})) if options.blocks_to_swap else None
    sharded = None
    if options.shard_base:  # before the move: each block reaches the device as its shard, one at a time
        sharded = shard_blocks(model, spec.blocks(model), device, {p for _, p in triplet.lora_parameters(model)})
    model.to(device)
    if options.gradient_checkpointing:
        if offload is None and options.offload_activations:
            offload = ActivationOffload(device)
        model.enable_gradient_checkpointing(
            checkpoint_function(offload if options.offload_activations else None, recompute_context)
        )
    return Prepared(swap, offload if options.offload_activations else None, sharded)
