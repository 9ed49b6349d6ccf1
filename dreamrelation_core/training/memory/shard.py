"""Sharding of the frozen base blocks over the ranks of a torchrun launch: PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`), one group per transformer block (docs/method.md
"Training memory", "Sharded base").

What it buys is memory, not speed: each rank keeps 1/N of every block's frozen weights and
all-gathers a block's full weights just before it runs (forward, the recompute of gradient
checkpointing, backward), freeing them after; the next block's all-gather is issued while the
current one computes. The all-gathers cost bandwidth every step.

What stays replicated: the LoRA parameters (passed as `ignored_params`: FSDP neither shards them
nor reduces their gradients; the trainer sums the LoRA gradients over the ranks itself) and the
frozen parameters outside the blocks (embeddings, output projection: a few hundred MB at most).
The root module gets an FSDP state without parameters of its own, so that it drives the blocks'
prefetching and resharding (one root per step, not one per block).

`FrozenLinear` fetches its weight from the module at backward time (fp8.py): when its block's
backward runs, FSDP has all-gathered the block again and the module's `weight` is the full tensor.
Gradient checkpointing wraps the call of a block: its recompute is a second forward of the
block, which FSDP's pre-forward hook all-gathers like the first.

fp8 storage: a block holds fp8 weights beside bf16/fp32 biases and norms; FSDP2 all-gathers a
group of mixed dtypes as bytes (uint8), which gloo and NCCL both move, and each rank's fp8 shard
keeps its per-tensor scale (a replicated buffer of the FrozenLinear). Tested on gloo (CPU).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import TrainingError


@dataclass
class ShardInfo:
    """What a rank holds after sharding (for logs and tests)."""

    world_size: int
    blocks: int
    local_bytes: int  # this rank's shard of the block weights
    full_bytes: int  # the blocks' frozen weights, unsharded


def shard_world_size() -> int:
    """Processes that share the base (1 without a process group)."""
    from ..distributed import world

    return world().size


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` of all ranks (free GPU memory: every rank must pick the same memory
    options, and the fullest GPU decides). One process: `value`."""
    import torch.distributed as dist

    if shard_world_size() < 2:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (shard_world_size(),))


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def shard_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device, keep: set[nn.Parameter]) -> ShardInfo:
    """Shard each block's parameters except `keep` (the LoRA weights) over the process group,
    bottom-up, then give the root an FSDP state that owns nothing. Changes `model` in place; the
    sharded weights land on `device` (one block's full weights pass through it at a time); what is
    not sharded is moved by the caller."""
    from torch.distributed.fsdp import fully_shard

    world = shard_world_size()
    if world < 2:
        raise TrainingError("shard_base needs several processes (train --nproc N with N >= 2); with one process "
                            "there is nothing to share the base with")
    mesh = _mesh(device)
    # diffusers' blocks return tensors the model only uses out of place; FSDP2 warns about any view
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    full = _nbytes(p for b in blocks for p in b.parameters() if p not in keep)
    for block in blocks:
        # reshard_after_forward: free the gathered weights after forward (gathered again for backward)
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=keep & set(block.parameters()))
    in_blocks = {p for b in blocks for p in b.parameters()}
    outside = {p for p in model.parameters() if p not in in_blocks}
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=outside | keep)
    return ShardInfo(world, len(blocks), local_shard_bytes(blocks), full)


def local_shard_bytes(blocks: nn.ModuleList) -> int:
    """Bytes of the block weights this rank stores (the local shards of FSDP's DTensors)."""
    from torch.distributed.tensor import DTensor

    return sum(_nbytes([p.to_local()]) for b in blocks for p in b.parameters() if isinstance(p, DTensor))
