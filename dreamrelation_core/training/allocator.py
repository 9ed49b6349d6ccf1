"""The training process's CUDA allocator settings (set before CUDA starts; no torch import here).

The allocator: the worker runs PyTorch's native caching allocator with expandable segments where
the platform has them (Linux), whatever the parent set for itself. ComfyUI may run with
`backend:cudaMallocAsync`; the swap buffers' stream ordering and the fragmentation margin are
reasoned for the native allocator, and expandable segments let activations of very different sizes
reuse one mapping instead of fragmenting fixed segments.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

ALLOC_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the CUDA-only name and the newer general one
EXPANDABLE = "expandable_segments:True"


def allocator_environment(env: Mapping[str, str], platform: str | None = None) -> dict[str, str]:
    """A copy of `env` with the worker's allocator settings: any `backend:` (cudaMallocAsync) and any
    `expandable_segments:` removed, `expandable_segments:True` added on Linux; other settings kept."""
    platform = platform or sys.platform
    out = dict(env)
    for key in ALLOC_KEYS:
        if key not in out:
            continue
        kept = [p.strip() for p in out[key].split(",")
                if p.strip() and not p.strip().startswith(("backend:", "expandable_segments:"))]
        if kept:
            out[key] = ",".join(kept)
        else:
            del out[key]
    if platform.startswith("linux"):
        key = ALLOC_KEYS[1] if ALLOC_KEYS[1] in out else ALLOC_KEYS[0]  # the newer name wins where both are set
        out[key] = ",".join(p for p in (out.get(key, ""), EXPANDABLE) if p)
    return out


def apply_allocator_environment(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set this process's allocator environment (before CUDA is initialised; then it has no effect
    and False is returned)."""
    environ = os.environ if environ is None else environ
    if _cuda_started():
        return False
    new = allocator_environment(environ)
    for key in ALLOC_KEYS:
        if key in new:
            environ[key] = new[key]
        else:
            environ.pop(key, None)
    return True


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()
