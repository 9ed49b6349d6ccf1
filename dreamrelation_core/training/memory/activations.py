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
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch.utils.checkpoint import checkpoint


class ActivationOffload:
    """Saved-tensor pack/unpack that parks chosen tensors in host memory.

    On CUDA the device-to-host copy runs on a side stream into pinned memory; the unpack waits on
    its event and copies back on the compute stream. On the CPU it is a plain copy (same path,
    testable). The trace subclasses `to_host` / `to_device` to keep host bytes out of its count.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.offloaded_bytes = 0  # bytes sent to the host so far (tests, logs)

    def to_host(self, t: torch.Tensor):
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
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
        return host.to(device, non_blocking=self.cuda)

    def hooks(self, targets: tuple[torch.Tensor, ...]):
        """saved_tensors_hooks that offload exactly the tensors in `targets` (by identity)."""
        ids = {id(t) for t in targets}

        def pack(t: torch.Tensor):
            if id(t) not in ids:
                return t
            self.offloaded_bytes += t.numel() * t.element_size()
            host, done = self.to_host(t)
            return (_Offloaded, host, done, t.device)

        def unpack(p):
            if isinstance(p, tuple) and len(p) == 4 and p[0] is _Offloaded:
                return self.to_device(p[1], p[2], p[3])
            return p

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Offloaded:
    """Marker of an offloaded saved tensor."""


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
