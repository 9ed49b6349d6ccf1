"""Gradient checkpointing per transformer block, optionally with the checkpointed block inputs
offloaded to (pinned) host memory.

With checkpointing a block keeps only its inputs between forward and backward (hidden states
[B, N, 3072] and text states [B, L, 1536]; 48 blocks x 107 MB at 61x480x848 in bf16) and
recomputes everything else. `offload_activations` moves those two inputs to host memory as soon
as they are saved and brings each back when its block is recomputed: torch's non-reentrant
checkpoint saves its inputs through the saved-tensor hooks active around it (its own hooks only
cover the tensors saved *inside* the block). The shared inputs (time embedding, rotary tables,
text mask) stay on the device: they are one tensor for all 48 blocks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch.utils.checkpoint import checkpoint

from .host import HostBuffers


class ActivationOffload:
    """Saved-tensor pack/unpack that parks chosen tensors in host memory.

    On CUDA the device-to-host copy runs on a side stream into page-locked buffers of exact size
    (`host.HostBuffers`: reused every step, registered rather than taken from torch's rounding
    pinned allocator); when a block's inputs come back for its recompute, the inputs of the block
    below (next in backward) start their host-to-device copy on the side stream (`prefetch`), so
    the compute stream finds them ready; that costs one more block input on the device. On the CPU
    it is the same path with plain copies (testable). The trace subclasses `to_host` /
    `to_device` / `release` to keep host bytes out of its count.
    """

    def __init__(self, device: torch.device | str, prefetch: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = HostBuffers(pin=self.cuda)
        self.prefetch = prefetch
        self.offloaded_bytes = 0  # bytes sent to the host so far (tests, logs)
        self.prefetched = 0  # tensors brought back ahead of their use (tests, logs)
        self._groups: dict[int, list[weakref.ref]] = {}  # one group per checkpointed call, in forward order
        self._group = 0

    @property
    def host_bytes(self) -> int:
        """Host memory the offload holds (its buffers, in use or pooled for the next step)."""
        return self.pool.allocated

    def to_host(self, t: torch.Tensor):
        buf = self.pool.take(t.numel() * t.element_size())
        host = buf.view(t.dtype).view(t.shape)
        if not self.cuda:
            host.copy_(t)
            return host, None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is computed
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        t.record_stream(self.stream)  # the allocator must not reuse t before the copy ends
        return host, done

    def to_device(self, host: torch.Tensor, done, device: torch.device) -> torch.Tensor:
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
        # a copy even on the CPU: the host buffer is reused next step
        return host.to(device, non_blocking=self.cuda, copy=True)

    def to_device_ahead(self, host: torch.Tensor, done, device: torch.device):
        """Start the copy back on the side stream: (device tensor, event the user must wait on)."""
        if not self.cuda:
            return self.to_device(host, done, device), None
        compute = torch.cuda.current_stream(device)
        out = torch.empty(host.shape, dtype=host.dtype, device=device)  # owned by the compute stream
        self.stream.wait_stream(compute)  # its memory may be what finished kernels just freed
        with torch.cuda.stream(self.stream):  # after the offload copy `done` (same stream)
            out.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return out, ready

    def release(self, host: torch.Tensor) -> None:
        """`host` is no longer needed: its buffer serves the next step (any later copy into it is
        queued behind the compute stream, which queued the copy out of it)."""
        size = host.element_size()
        flat = torch.empty(0, dtype=torch.uint8).set_(  # the buffer as taken: same bytes, same start
            host.untyped_storage(), host.storage_offset() * size, (host.numel() * size,))
        self.pool.give(flat)

    def hooks(self, targets: tuple[torch.Tensor, ...]):
        """saved_tensors_hooks that offload exactly the tensors in `targets` (by identity)."""
        ids = {id(t) for t in targets}
        group = self._group
        self._group += 1
        self._groups = {g: refs for g, refs in self._groups.items() if any(r() is not None for r in refs)}
        self._groups[group] = []

        def pack(t: torch.Tensor):
            if id(t) not in ids:
                return t
            self.offloaded_bytes += t.numel() * t.element_size()
            host, done = self.to_host(t)
            parked = _Offloaded(self, host, done, t.device, group)
            self._groups[group].append(weakref.ref(parked))
            return parked

        def unpack(p):
            if not isinstance(p, _Offloaded):
                return p
            if p.ahead is not None:
                (out, ready), p.ahead = p.ahead, None  # the device copy is the caller's now
                if ready is not None:
                    torch.cuda.current_stream(p.device).wait_event(ready)
            else:
                out = self.to_device(p.host, p.done, p.device)
            p.used = True
            if self.prefetch:
                self._prefetch(p.group - 1)
            return out

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _prefetch(self, group: int) -> None:
        for ref in self._groups.get(group, []):
            q = ref()
            if q is not None and q.ahead is None and not q.used:  # used: fetched already
                q.ahead = self.to_device_ahead(q.host, q.done, q.device)
                self.prefetched += 1


class _Offloaded:
    """One offloaded saved tensor: its host copy, the event of the copy, and (once prefetched)
    its device copy; gives the host buffer back when autograd frees it."""

    __slots__ = ("offload", "host", "done", "device", "group", "ahead", "used", "__weakref__")

    def __init__(self, offload: ActivationOffload, host: torch.Tensor, done, device: torch.device, group: int):
        self.offload, self.host, self.done, self.device, self.group = offload, host, done, device, group
        self.ahead, self.used = None, False

    def __del__(self):
        self.offload.release(self.host)


def checkpoint_function(
    offload: ActivationOffload | None = None, recompute_context: Callable[[], AbstractContextManager] | None = None,
) -> Callable:
    """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing`:
    non-reentrant checkpoint per block; with `offload`, the block's hidden and text inputs (its
    first two arguments) are saved in host memory. `recompute_context` (the memory trace) wraps
    the recompute, which runs inside backward where torch-function modes are not active."""
    kw: dict = {"use_reentrant": False}
    if recompute_context is not None:
        kw["context_fn"] = lambda: (contextlib.nullcontext(), recompute_context())

    def run(module: torch.nn.Module, *args):
        if offload is None:
            return checkpoint(module.__call__, *args, **kw)
        with offload.hooks(tuple(a for a in args[:2] if isinstance(a, torch.Tensor))):
            return checkpoint(module.__call__, *args, **kw)

    return run
