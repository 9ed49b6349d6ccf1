"""Data-parallel training over `torch.distributed` (one process per GPU, started by torchrun).

docs/distributed.md "Data parallel: the same run on N processes" explains the scheme; in short:
- every rank holds the same LoRA weights, optimizer and contrastive banks, and draws every random
  number of a step (branch, clips, noise, sigma, caption dropout, bank draws) from the same seeded
  generator, so all ranks agree on the whole global batch;
- each rank runs the model on its share of the batch only;
- the contrastive loss sees the features of the whole batch (`gather_rows`), computed the same on
  every rank, so the banks hold what the one-process run holds;
- the LoRA gradients are summed over ranks (`sum_gradients`), the loss being built so that this
  sum is the one-process gradient.
Without a process group every function here is the identity: one code path for 1 and N processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import TrainingError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank on this machine: the CUDA device index

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and reports."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise TrainingError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def world() -> World:
    """The current process group's view of this process; World(0, 1, 0) without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def backend_for(device_type: str) -> str:
    """nccl between GPUs, gloo between CPU processes (the tests' backend)."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...). Without
    torchrun (WORLD_SIZE unset or 1) nothing happens. Idempotent. On CUDA each process takes the
    device of its LOCAL_RANK and refuses when this machine has fewer devices."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return world()
    if dist.is_initialized():
        return world()
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise TrainingError(
                f"process {local_rank} on this machine needs CUDA device {local_rank}, but only {count} exist: "
                f"start at most {count} processes per machine (--nproc / the node's gpus)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend_for("cuda" if use_cuda else "cpu"), timeout=timedelta(seconds=timeout_s))
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(config_device: str, w: World | None = None) -> torch.device:
    """The device a training process uses: config.device, with `auto` (and a bare `cuda`) meaning
    this process's own GPU under torchrun."""
    w = w or world()
    if config_device == "auto":
        config_device = "cuda" if torch.cuda.is_available() else "cpu"
    if config_device == "cuda" and w.active:
        return torch.device("cuda", w.local_rank)
    return torch.device(config_device)


def share(batch: int, w: World | None = None) -> slice:
    """The rows of a global batch this rank computes: equal contiguous shares in rank order."""
    w = w or world()
    if batch % w.size:
        raise TrainingError(
            f"batch_size {batch} cannot be split over {w.size} processes: batch_size is the global batch per "
            f"step and must be a multiple of the number of processes (e.g. {w.size * max(1, batch // w.size)} "
            f"or {w.size * (batch // w.size + 1)})")
    n = batch // w.size
    return slice(w.rank * n, (w.rank + 1) * n)


# ---------------------------------------------------------------------------------------------
# collectives (identity without a process group)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward keeps this rank's rows only: the loss taken on the
    gathered tensor is computed identically on every rank, so the gradient of this rank's rows is
    already complete here (summing it over ranks would count it N times)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        w = world()
        parts = [torch.empty_like(x) for _ in range(w.size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(w.rank * x.shape[0], (w.rank + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [b * size, ...] in rank order (the global batch's order)."""
    if not world().active:
        return x
    return _GatherRows.apply(x)


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks, in one flat all-reduce. Every rank must pass the
    same parameters with gradients (the step's branch is the same everywhere: one generator)."""
    if not world().active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def sum_values(values: torch.Tensor) -> torch.Tensor:
    """A small tensor summed over ranks (loss terms for the report)."""
    if not world().active:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank: a stop request reaching one process
    (cancel on rank 0's stdin, a signal) stops all of them at the same step."""
    w = world()
    if not w.active:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (a plan, a checkpoint's state)."""
    if not world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def barrier() -> None:
    if world().active:
        dist.barrier()


def _collective_device() -> torch.device:
    """nccl moves tensors on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
