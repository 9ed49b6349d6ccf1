"""State dicts as every converter reads them: weights files opened safely, indexed keys counted,
required keys taken, and leftover keys refused (never silently dropped)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .errors import KeyLayoutError, ModelFileError, ModelFileNotFoundError


def read_state_dict(path: str | os.PathLike, what: str = "model") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .pth / .pt / .bin file; never unpickles code.

    Training checkpoints that wrap their weights (`model`, `state_dict`, `module`) are unwrapped.
    `what` names the model in errors ("SAM checkpoint", "FVD feature network", ...)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"{path}: no such file ({what})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, corrupt zip, not a torch file, truncated safetensors
        raise ModelFileError(f"{path}: not a readable weights-only checkpoint for the {what} ({torch_load_reason(e)})") from e
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: expected a dict of tensors (or {{'model': dict}}), got {type(obj).__name__}")
    return obj


_ADVICE_RE = re.compile(r"weights_only|trusted source|file an issue|documentation of torch\.load|safe_globals|"
                        r"Weights only load failed|internal miniz error|high likelihood|saved properly", re.I)


def torch_load_reason(e: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in one line, without torch's advice to load the
    file with weights_only=False: that would run whatever code the file holds."""
    sentences = re.split(r"\n\s*\n|(?<=\.)\s+", str(e))
    kept = [" ".join(s.split()) for s in sentences if s.strip() and not _ADVICE_RE.search(s)]
    detail = " ".join(kept[:2])
    if type(e).__name__ == "UnpicklingError":
        detail = "not plain tensors and numbers, refused without running anything" + (f": {detail}" if detail else "")
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct N of the keys that start with `prefix + "N."`."""
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def count_indexed(keys: Iterable[str], prefix: str, what: str, start: int = 0) -> int:
    """Number of consecutive children `prefix + "N."`, N from `start` (0 when there are none).

    A gap is a KeyLayoutError naming the children that have no keys."""
    found = [i for i in indices(keys, prefix) if i >= start]
    if not found:
        return 0
    gaps = sorted(set(range(start, found[-1] + 1)) - set(found))
    if gaps:
        raise KeyLayoutError(
            f"{what}: no keys for {', '.join(prefix + str(g) for g in gaps)} "
            f"(between {prefix}{start} and {prefix}{found[-1]})"
        )
    return found[-1] + 1 - start


def take(state_dict: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    """state_dict[key], or a KeyLayoutError naming the missing key."""
    if key not in state_dict:
        raise KeyLayoutError(f"{what}: key {key!r} missing")
    return state_dict[key]


def check_all_used(state_dict: Mapping[str, torch.Tensor], used: set[str], what: str) -> None:
    """KeyLayoutError listing the keys a conversion did not use: nothing is dropped unseen."""
    extra = sorted(set(state_dict) - used)
    if extra:
        raise KeyLayoutError(f"{what}: {len(extra)} unexpected key(s), e.g. {extra[:5]}")
