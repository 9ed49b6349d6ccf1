"""Host (CPU) memory of a training run: page-locked buffers of exact size, the RAM check before
start, and host-memory failures reported as such (docs/method.md "Training memory": host memory).

Why not `torch.empty(..., pin_memory=True)`: torch's caching host allocator rounds every request up
to a power of two and keeps the blocks for reuse, never returning them: 48 swapped fp8 blocks of
~190 MiB would pin 48 x 256 MiB, and the offloaded block inputs (107 MB at 61x480x848) 128 MiB
each. Here each buffer is ordinary (pageable) memory of exactly the bytes needed, page-locked by
registering it with the CUDA driver (`cudaHostRegister`, as torch does itself for shared memory),
and unregistered when the tensor's storage is freed. Copies from it are true asynchronous DMA.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from ...errors import HostMemoryError

GIB = 1024**3
PAGE = 4096
# RAM to leave to the OS and the rest of the process (torch and CUDA libraries, the clips, the
# LoRA's host copies, the Python heap) when checking what the pinned buffers need.
HOST_RESERVE_GIB = 2.0
ADVICE = ("free host memory (RAM): close other programs, unload models ComfyUI holds in RAM, or swap fewer "
          "transformer blocks (blocks_to_swap) / leave offload_activations off, which both keep data in RAM")


def _cuda_register(ptr: int, nbytes: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))


def _cuda_unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # at interpreter exit the CUDA runtime may be gone already; the OS frees it
        pass


def pinned_empty(
    nbytes: int, what: str = "pinned buffer", register: Callable[[int, int], int] | None = None,
    unregister: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """A flat uint8 CPU tensor of exactly `nbytes` (starting on a page; its storage is at most one
    page larger), page-locked for asynchronous copies.

    `register(ptr, nbytes) -> CUDA error code` / `unregister(ptr)` default to the CUDA runtime's
    cudaHostRegister / cudaHostUnregister (tests pass their own). A failure is a HostMemoryError."""
    register, unregister = register or _cuda_register, unregister or _cuda_unregister
    try:
        raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    except RuntimeError as e:
        raise HostMemoryError(f"not enough host memory (RAM) for the {what} ({nbytes / GIB:.2f} GiB): {ADVICE}. "
                              f"[{str(e).strip().splitlines()[0]}]") from e
    start = -raw.data_ptr() % PAGE  # registration in whole pages: start on one
    t = raw[start: start + nbytes]
    del raw
    if nbytes == 0:
        return t
    ptr = t.data_ptr()
    code = register(ptr, nbytes)
    if code != 0:
        raise HostMemoryError(
            f"could not page-lock {nbytes / GIB:.2f} GiB of host memory (RAM) for the {what} (CUDA error {code}; "
            f"the system limits locked memory to what it can spare): {ADVICE}"
        )
    weakref.finalize(t.untyped_storage(), unregister, ptr)
    return t


class HostBuffers:
    """Exact-size host buffers reused by size (the offloaded block inputs: the same sizes every
    step). `take` gives a buffer of exactly `nbytes`; `give` returns it for the next request of that
    size. pin=False (the CPU) makes plain buffers."""

    def __init__(self, pin: bool, what: str = "offloaded activations", **pin_kwargs):
        self.pin, self.what, self.pin_kwargs = pin, what, pin_kwargs
        self.free: dict[int, list[torch.Tensor]] = {}
        self.allocated = 0  # bytes of all buffers made (held by the pool or in use)

    def take(self, nbytes: int) -> torch.Tensor:
        pool = self.free.get(nbytes)
        if pool:
            return pool.pop()
        self.allocated += nbytes
        if self.pin:
            return pinned_empty(nbytes, self.what, **self.pin_kwargs)
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        self.free.setdefault(buf.numel(), []).append(buf)


# ---------------------------------------------------------------------------------------------
# available RAM


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation without swapping: MemAvailable on Linux,
    ullAvailPhys on Windows; None where unknown (macOS: the check is skipped, with a message)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        return parse_meminfo(meminfo.read_text())
    if sys.platform == "win32":
        return _windows_available()
    return None


def parse_meminfo(text: str) -> int | None:
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            fields[name.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemAvailable" in fields:
        return fields["MemAvailable"]
    if "MemFree" in fields:  # kernels before 3.14: free + page cache is the closest figure
        return fields["MemFree"] + fields.get("Cached", 0)
    return None


def _windows_available() -> int | None:
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullAvailPhys)
    except Exception:
        return None
    return None


def check_host_memory(
    need_bytes: int, what: str, available: int | None = None, available_fn: Callable[[], int | None] = available_ram,
) -> str:
    """Refuse before the run starts when `need_bytes` more host memory (what the run will pin)
    plus HOST_RESERVE_GIB are not available; returns a line for the log. `available`: bytes
    (default `available_fn()`, None where the platform does not say)."""
    available = available_fn() if available is None else available
    if available is None:
        return (f"host memory: {what} need {need_bytes / GIB:.2f} GiB of RAM; available RAM is unknown on "
                f"{sys.platform} ({os.name}), not checked")
    if need_bytes + HOST_RESERVE_GIB * GIB > available:
        raise HostMemoryError(
            f"not enough host memory (RAM): {what} need {need_bytes / GIB:.2f} GiB (+{HOST_RESERVE_GIB:.1f} GiB kept "
            f"free) but {available / GIB:.2f} GiB are available: {ADVICE}"
        )
    return f"host memory: {what} need {need_bytes / GIB:.2f} GiB of {available / GIB:.2f} GiB available RAM"



def is_host_out_of_memory(e: BaseException) -> bool:
    """An allocation in RAM failed (torch's CPU allocator, or Python's): not the GPU's memory."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "DefaultCPUAllocator" in str(e))


def host_out_of_memory_message(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"not enough host memory (RAM) for the training process: {ADVICE}. [{first}]"
