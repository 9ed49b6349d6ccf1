"""From a TrainConfig's memory options (each may be 'auto') to the options a run uses.

On the CPU 'auto' keeps today's behaviour: weights as loaded (fp8 stays fp8), no swap, no
checkpointing, no offload. On CUDA the estimator picks, among the option sets that agree with
every option the user fixed, the fastest one (by `estimate.StepTimeModel`, ladder order on
ties) whose peak fits the free GPU memory; a fully fixed
set that does not fit is refused before the model is moved, with the set that would fit.

When a step still runs out of GPU memory (the estimate cannot see everything), the run steps down
the fallback LADDER, one rung per retry, changing only the options the user left on 'auto':
    1. gradient checkpointing on
    2. base weights in fp8 (from bf16)
    3. more blocks swapped to CPU memory: a quarter, half, three quarters, then all of them
    4. the checkpointed block inputs offloaded to CPU memory as well
Below the last rung nothing is left to lower but the clips and the rank (`memory_advice`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ...basemodel import model_class_name
from ...errors import TrainingError
from ...mochi import fp8
from . import attention as sdpa
from .estimate import (
    FRAGMENTATION,
    GIB,
    Estimate,
    MochiDims,
    estimate_latent,
    fastest_fitting_latent,
    option_ladder,
)
from .setup import SWAP_AND_SHARD, MemoryOptions
from .shard import min_over_ranks, shard_world_size
from .warmup import warm_up_block

MEMORY_OPTIONS = ("base_dtype", "blocks_to_swap", "gradient_checkpointing", "offload_activations")
# the same options as the Train node's inputs and the `train` command's flags
CLI_FLAGS = {name: "--" + name.replace("_", "-") for name in MEMORY_OPTIONS}


@dataclass
class Choice:
    options: MemoryOptions
    estimate: Estimate | None  # None on the CPU
    free_bytes: int | None
    blocks: int = 0  # transformer blocks of the model (the swap rungs of the ladder)
    attention_note: str = ""  # what a math attention kernel costs, where the GPU has no better one
    world: int = 1  # processes of the launch (the estimate is one rank's)
    shard_note: str = ""  # why shard_base: true was not applied (one process)

    def summary(self) -> str:
        s = f"memory options: {self.options.label()}"
        if self.estimate is not None:
            s += (f"; predicted peak {self.estimate.peak_gib:.2f} GiB of {self.free_bytes / GIB:.2f} GiB free"
                  f" (+{int(FRAGMENTATION * 100)} % margin)")
        elif self.free_bytes is not None:
            s += f"; {self.free_bytes / GIB:.2f} GiB free (fp32 weights: no estimate)"
        else:
            s += " (on the CPU: no GPU memory estimate)"
        if self.options.shard_base:
            s += f"; frozen base blocks sharded over {self.world} processes (FSDP2)"
        if self.attention_note:
            s += f"; {self.attention_note}"
        if self.shard_note:
            s += f"; {self.shard_note}"
        return s


def user_fixed(config) -> set[str]:
    """The memory options the user set (not 'auto'): the ladder never changes these."""
    return {name for name in MEMORY_OPTIONS if getattr(config, name) != "auto"}


def _swap_rungs(blocks: int) -> list[int]:
    """A quarter, half, three quarters and all of the blocks (no repeats for small models)."""
    return sorted({max(1, -(-blocks * k // 4)) for k in (1, 2, 3, 4)}) if blocks > 0 else []


def next_rung(options: MemoryOptions, fixed: set[str], blocks: int) -> tuple[MemoryOptions, str] | None:
    """The next rung of LADDER below `options` (module docstring), changing only options not in
    `fixed`; None at the bottom."""
    if not options.gradient_checkpointing and "gradient_checkpointing" not in fixed:
        return replace(options, gradient_checkpointing=True), "gradient checkpointing on"
    if options.base_dtype == "bf16" and "base_dtype" not in fixed:
        return replace(options, base_dtype="fp8"), "base weights in fp8"
    if "blocks_to_swap" not in fixed and not options.shard_base:  # a sharded base streams every block already
        more = [k for k in _swap_rungs(blocks) if k > options.blocks_to_swap]
        if more:
            return replace(options, blocks_to_swap=more[0]), f"{more[0]} of {blocks} blocks swapped to CPU memory"
    if options.gradient_checkpointing and not options.offload_activations and "offload_activations" not in fixed:
        return replace(options, offload_activations=True), "checkpointed activations offloaded to CPU memory"
    return None


def with_memory_options(config, options: MemoryOptions):
    """A copy of `config` with the memory options set to `options` (no 'auto' left)."""
    return replace(config, base_dtype=options.base_dtype, blocks_to_swap=options.blocks_to_swap,
                   gradient_checkpointing=options.gradient_checkpointing,
                   offload_activations=options.offload_activations, shard_base=options.shard_base)


def memory_advice(options: MemoryOptions | None, fixed: set[str], blocks: int) -> str:
    """What a user can still lower, in the names the Train node and the `train` command share."""
    tips = []
    if options is not None:
        if not options.gradient_checkpointing:
            tips.append("gradient_checkpointing on")
        if options.base_dtype == "bf16":
            tips.append("base_dtype fp8")
        if blocks and options.blocks_to_swap < blocks:
            tips.append(f"blocks_to_swap above {options.blocks_to_swap} (up to {blocks})")
        if not options.offload_activations:
            tips.append("offload_activations on")
    else:  # not resolved yet (it failed while loading): every option
        tips += ["gradient_checkpointing on", "base_dtype fp8", "more blocks_to_swap", "offload_activations on"]
    tips.append("fewer frames or a smaller size for the clips (Dataset node, or prepare --frames/--size)")
    tips.append("a lower rank")
    text = "try " + ", ".join(tips)
    if fixed:
        text += (f"; {', '.join(sorted(fixed))} {'is' if len(fixed) == 1 else 'are'} fixed: set "
                 f"{'it' if len(fixed) == 1 else 'them'} to auto to let training step down by itself")
    text += (" (the Train node's inputs; the train command's " + ", ".join(CLI_FLAGS.values())
             + "); close other programs using the GPU")
    return text


def _bool(value, name: str) -> bool | None:
    if value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise TrainingError(f"config: {name} must be auto, true or false, got {value!r}")


def _blocks(model: torch.nn.Module) -> int:
    """How many transformer blocks (what swap counts), whatever the base model calls them."""
    blocks = getattr(model, "transformer_blocks", None)
    return len(blocks if blocks is not None else getattr(model, "blocks", ()))


def model_dims(model: torch.nn.Module):
    """The memory dimensions of a loaded transformer: WanDims for Wan, else MochiDims."""
    if not hasattr(model, "config"):
        return MochiDims()
    if model_class_name(model) == "WanTransformer3DModel":
        from .wan_dims import WanDims

        return WanDims.from_config(dict(model.config))
    return MochiDims.from_config(dict(model.config))


def is_fp8_model(model: torch.nn.Module) -> bool:
    return any(fp8.is_fp8(m.weight.dtype) for _, m in fp8.frozen_linears(model))


def resolve(
    config, device: torch.device, model: torch.nn.Module, latent: tuple[int, int, int], free_bytes: int | None = None,
    attention: str | None = None,
) -> Choice:
    """The options of this run. `latent` = (T, h, w) of the training clips; `free_bytes`: free
    device memory (default: torch.cuda.mem_get_info on CUDA); `attention`: the SDPA kernel
    (default: probed on the device, see attention.py)."""
    ckpt = _bool(config.gradient_checkpointing, "gradient_checkpointing")
    offload = _bool(config.offload_activations, "offload_activations")
    swap = None if config.blocks_to_swap == "auto" else int(config.blocks_to_swap)
    dtype = None if config.base_dtype == "auto" else config.base_dtype
    world, shard, shard_note = shard_world_size(), _bool(getattr(config, "shard_base", False), "shard_base"), ""
    if world < 2:  # nothing to share the base with: true is noted and ignored (a sharded run resumes on one GPU)
        shard_note = "shard_base: true ignored: one process holds the whole base (it applies with --nproc N)" if shard else ""
        shard = False
    if shard and swap:
        raise TrainingError(SWAP_AND_SHARD)
    batch = max(1, config.batch_size // world)  # clips per rank: the global batch is shared by the ranks
    if device.type != "cuda":
        dtype = dtype or ("fp8" if is_fp8_model(model) else "fp32")
        return Choice(MemoryOptions(dtype, swap or 0, bool(ckpt), bool(offload), bool(shard)), None, None,
                      _blocks(model), world=world, shard_note=shard_note)
    if free_bytes is None:
        # kernels, handles and workspaces of one block first: the free memory read then is what a step has
        warm_up_block(model, device, autocast=config.mixed_precision != "no")
        free_bytes = min_over_ranks(torch.cuda.mem_get_info(device)[0], device)  # the same choice on every rank
    if dtype == "fp32":  # fp32 weights on a GPU: outside the estimate (bf16 autocast runs); no check
        return Choice(MemoryOptions("fp32", swap or 0, ckpt is not False, bool(offload), bool(shard)), None, free_bytes,
                      _blocks(model), world=world, shard_note=shard_note)
    if dtype is None and is_fp8_model(model):
        dtype = "fp8"  # the file is fp8: bf16 would only cost memory
    dims = model_dims(model)
    kernel = attention if attention is not None else sdpa.probe(device, heads=dims.heads, head_dim=dims.head_dim)

    def agrees(o: MemoryOptions) -> bool:
        return ((dtype is None or o.base_dtype == dtype) and (swap is None or o.blocks_to_swap == swap)
                and (ckpt is None or o.gradient_checkpointing == ckpt) and (offload is None or o.offload_activations == offload)
                and (shard is None or o.shard_base == shard))

    candidates = [o for o in option_ladder(dims.layers, both_dtypes=True, shard=world > 1) if agrees(o)]
    if not candidates:  # a fixed combination outside the ladder (e.g. bf16 + swap + no checkpointing)
        candidates = [MemoryOptions(dtype or "fp8", swap or 0, bool(ckpt), bool(offload), bool(shard))]
    est = fastest_fitting_latent(latent, free_bytes, candidates, dims, config.rank, batch, attention=kernel, world=world)
    if est is not None:  # the fastest by the step-time model, ladder order on ties (estimate.py)
        note = ""
        if kernel == "math":
            flash = estimate_latent(latent, est.options, dims, config.rank, batch, world=world)
            note = sdpa.describe_cost(kernel, flash.peak_gib, est.peak_gib)
        return Choice(est.options, est, free_bytes, _blocks(model), note, world, shard_note)
    first = estimate_latent(latent, candidates[0], dims, config.rank, batch, kernel, world)
    advice = None
    for opts in option_ladder(dims.layers, shard=world > 1):
        est = estimate_latent(latent, opts, dims, config.rank, batch, kernel, world)
        if est.peak * (1 + FRAGMENTATION) <= free_bytes:
            advice = opts
            break
    msg = (f"training would need {first.peak_gib * (1 + FRAGMENTATION):.2f} GiB of GPU memory with "
           f"{candidates[0].label()} but {free_bytes / GIB:.2f} GiB are free")
    if advice is not None:
        msg += (f"; these options fit: base_dtype: {advice.base_dtype}, blocks_to_swap: {advice.blocks_to_swap}, "
                f"gradient_checkpointing: {str(advice.gradient_checkpointing).lower()}, "
                f"offload_activations: {str(advice.offload_activations).lower()}"
                + (", shard_base: true" if advice.shard_base else "") + " (or set them to auto)")
    else:
        msg += "; no option set fits: train on shorter or smaller clips"
    if kernel == "math":
        flash = estimate_latent(latent, candidates[0], dims, config.rank, batch, world=world)
        msg += f" ({sdpa.describe_cost(kernel, flash.peak_gib, first.peak_gib)})"
    raise TrainingError(msg)
