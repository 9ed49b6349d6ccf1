"""From a TrainConfig's memory options (each may be 'auto') to the options a run uses.

On the CPU 'auto' keeps today's behaviour: weights as loaded (fp8 stays fp8), no swap, no
checkpointing, no offload. On CUDA the estimator picks, among the option sets that agree with
every option the user fixed, the fastest one whose peak fits the free GPU memory; a fully fixed
set that does not fit is refused before the model is moved, with the set that would fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import TrainingError
from ...mochi import fp8
from .estimate import FRAGMENTATION, GIB, Estimate, MochiDims, estimate_latent, option_ladder
from .setup import MemoryOptions


@dataclass
class Choice:
    options: MemoryOptions
    estimate: Estimate | None  # None on the CPU
    free_bytes: int | None

    def summary(self) -> str:
        s = f"memory options: {self.options.label()}"
        if self.estimate is not None:
            s += (f"; predicted peak {self.estimate.peak_gib:.2f} GiB of {self.free_bytes / GIB:.2f} GiB free"
                  f" (+{int(FRAGMENTATION * 100)} % margin)")
        return s


def _bool(value, name: str) -> bool | None:
    if value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise TrainingError(f"config: {name} must be auto, true or false, got {value!r}")


def model_dims(model: torch.nn.Module):
    """The memory dimensions of a loaded transformer: WanDims for Wan, else MochiDims."""
    if not hasattr(model, "config"):
        return MochiDims()
    if type(model).__name__ == "WanTransformer3DModel":
        from .wan_dims import WanDims

        return WanDims.from_config(dict(model.config))
    return MochiDims.from_config(dict(model.config))


def is_fp8_model(model: torch.nn.Module) -> bool:
    return any(fp8.is_fp8(m.weight.dtype) for _, m in fp8.frozen_linears(model))


def resolve(
    config, device: torch.device, model: torch.nn.Module, latent: tuple[int, int, int], free_bytes: int | None = None,
) -> Choice:
    """The options of this run. `latent` = (T, h, w) of the training clips; `free_bytes`: free
    device memory (default: torch.cuda.mem_get_info on CUDA)."""
    ckpt = _bool(config.gradient_checkpointing, "gradient_checkpointing")
    offload = _bool(config.offload_activations, "offload_activations")
    swap = None if config.blocks_to_swap == "auto" else int(config.blocks_to_swap)
    dtype = None if config.base_dtype == "auto" else config.base_dtype
    if device.type != "cuda":
        dtype = dtype or ("fp8" if is_fp8_model(model) else "fp32")
        return Choice(MemoryOptions(dtype, swap or 0, bool(ckpt), bool(offload)), None, None)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if dtype == "fp32":  # fp32 weights on a GPU: outside the estimate (bf16 autocast runs); no check
        return Choice(MemoryOptions("fp32", swap or 0, ckpt is not False, bool(offload)), None, free_bytes)
    if dtype is None and is_fp8_model(model):
        dtype = "fp8"  # the file is fp8: bf16 would only cost memory
    dims = model_dims(model)
    batch = config.batch_size

    def agrees(o: MemoryOptions) -> bool:
        return ((dtype is None or o.base_dtype == dtype) and (swap is None or o.blocks_to_swap == swap)
                and (ckpt is None or o.gradient_checkpointing == ckpt) and (offload is None or o.offload_activations == offload))

    candidates = [o for o in option_ladder(dims.layers, both_dtypes=True) if agrees(o)]
    if not candidates:  # a fixed combination outside the ladder (e.g. bf16 + swap + no checkpointing)
        candidates = [MemoryOptions(dtype or "fp8", swap or 0, bool(ckpt), bool(offload))]
    for opts in candidates:
        est = estimate_latent(latent, opts, dims, config.rank, batch)
        if est.peak * (1 + FRAGMENTATION) <= free_bytes:
            return Choice(opts, est, free_bytes)
    first = estimate_latent(latent, candidates[0], dims, config.rank, batch)
    advice = None
    for opts in option_ladder(dims.layers):
        est = estimate_latent(latent, opts, dims, config.rank, batch)
        if est.peak * (1 + FRAGMENTATION) <= free_bytes:
            advice = opts
            break
    msg = (f"training would need {first.peak_gib * (1 + FRAGMENTATION):.2f} GiB of GPU memory with "
           f"{candidates[0].label()} but {free_bytes / GIB:.2f} GiB are free")
    if advice is not None:
        msg += (f"; these options fit: base_dtype: {advice.base_dtype}, blocks_to_swap: {advice.blocks_to_swap}, "
                f"gradient_checkpointing: {str(advice.gradient_checkpointing).lower()}, "
                f"offload_activations: {str(advice.offload_activations).lower()} (or set them to auto)")
    else:
        msg += "; no option set fits: train on shorter or smaller clips"
    raise TrainingError(msg)
