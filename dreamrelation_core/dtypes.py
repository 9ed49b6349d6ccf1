"""Precision names used on the command line, in nodes and in files."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_dtype_checked(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`t` in `dtype`, refusing values that the dtype cannot hold (fp16 turns 70000 into inf) and
    values that are not finite already. Raises ValueError naming `what` (file and tensor)."""
    if not t.is_floating_point():
        return t.to(dtype)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(f"{what}: holds {int(bad.sum())} non-finite value(s) (e.g. {t[bad].flatten()[0].item()}); "
                         "nothing was written")
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        limit = torch.finfo(dtype).max
        peak = float(t.detach().abs().max()) if t.numel() else 0.0
        if peak > limit:
            name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
            raise ValueError(f"{what}: a value of magnitude {peak:.6g} is beyond the range of {name} (largest "
                             f"{limit:.6g}): it would be written as inf. Export in fp32 (or bf16) instead")
    return t.to(dtype)
