"""Block swap: the frozen weights of N transformer blocks live in (pinned) CPU memory and are
copied into a small set of reused device buffers just before each block runs.

A block needs its weights three times per step: forward, the recompute of gradient
checkpointing, and backward. The block's forward pre-hook loads it (forward and recompute) and
prefetches the next swapped block in the direction of travel; a hook on the gradient of the
block's outputs loads it before its backward starts (that gradient exists before any of the
block's backward nodes can run). On CUDA the copies run on a side stream: the compute stream
waits on an event recorded after each copy, and a copy into a buffer waits on an event recorded
on the compute stream, so a buffer is never overwritten while kernels may still read it. On the
CPU the same code runs with plain copies (the 'device' buffer is a second CPU tensor), which is
what the tests check: the math is the same as without swap, bit for bit.

Only `FrozenLinear` weights move (>99 % of a block's bytes); norms, biases, scales and the LoRA
weights stay resident. The LoRA layers do not care where the base weight lives: `FrozenLinear`
fetches its weight from the module at forward and at backward time and saves none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ...base_models import spec_of_model
from ...mochi.fp8 import FrozenLinear
from .host import pinned_empty

ALIGN = 256  # bytes; every weight view starts on a boundary kernels like


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class _Layout:
    """Where each FrozenLinear weight of one block sits in a flat byte buffer."""

    modules: list[FrozenLinear]
    offsets: list[int]
    nbytes: int


@dataclass
class _Slot:
    buffer: torch.Tensor  # flat uint8 on the device
    block: int | None = None
    ready: object = None  # CUDA event: the copy into this slot is done
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def _layout(block: nn.Module) -> _Layout:
    mods = [m for m in block.modules() if isinstance(m, FrozenLinear)]
    offsets, pos = [], 0
    for m in mods:
        offsets.append(pos)
        pos += _align(m.weight.numel() * m.weight.element_size())
    return _Layout(mods, offsets, pos)


def swapped_block_indices(num_blocks: int, blocks_to_swap: int) -> list[int]:
    """The first N blocks: forward streams them first, backward last; with two buffers the copy of
    block i+1 (forward) or i-1 (backward) overlaps block i's compute."""
    return list(range(min(max(blocks_to_swap, 0), num_blocks)))


class BlockSwap:
    """Streams the frozen weights of `blocks_to_swap` of the model's transformer blocks (its base
    model spec's `blocks`: Mochi's `transformer_blocks`).

    Build it after the LoRA adapters are added and before the model is moved to `device`
    (the swapped weights are taken out of the model first, so the move leaves them on the CPU).
    `store_device` / `make_buffer` exist for the meta-device memory trace.
    """

    def __init__(
        self, model: nn.Module, blocks_to_swap: int, device: torch.device | str, num_buffers: int = 2,
        pin_memory: bool | None = None, make_buffer: Callable[[int, torch.device], torch.Tensor] | None = None,
        store_device: torch.device | str | None = None,
    ):
        self.device = torch.device(device)
        self.blocks = list(spec_of_model(model).blocks(model))
        self.indices = swapped_block_indices(len(self.blocks), blocks_to_swap)
        self.cuda = self.device.type == "cuda"
        pin = self.cuda if pin_memory is None else pin_memory
        self.layouts = {i: _layout(self.blocks[i]) for i in self.indices}
        self.store: dict[int, torch.Tensor | list[torch.Tensor]] = {}
        for i in self.indices:
            self.store[i] = self._take_out(self.layouts[i], pin, torch.device(store_device or "cpu"))
        size = max((lay.nbytes for lay in self.layouts.values()), default=0)
        make = make_buffer or (lambda n, dev: torch.empty(n, dtype=torch.uint8, device=dev))
        if num_buffers < 2:
            raise ValueError(f"block swap needs at least 2 buffers (one running, one loading), got {num_buffers}")
        self.slots = [_Slot(make(size, self.device)) for _ in range(min(num_buffers, len(self.indices)))]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copies = 0  # block loads so far (forward, recompute and backward): for tests and logs
        self._pending: dict[int, int] = {}
        self._handles = []
        for i in self.indices:
            self._handles.append(self.blocks[i].register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(self.blocks[i].register_forward_hook(self._post_hook(i)))

    # -- setup ---------------------------------------------------------------------------------
    @staticmethod
    def _take_out(layout: _Layout, pin: bool, store_device: torch.device) -> torch.Tensor | list[torch.Tensor]:
        """Move the block's weights out of the model (size-0 stand-ins stay in it).

        Pinned (CUDA): one flat page-locked tensor of the block's exact size, copied with one DMA. Otherwise the
        weights as loaded are the store (no copy: on the CPU a second copy of 10 GB of fp8
        weights would double the memory the swap is there to save)."""
        flat = None
        if pin:  # exact size, page-locked by registration (host.py: torch's pinned allocator rounds up)
            flat = pinned_empty(layout.nbytes, "block swap's weight store")
        elif any(m.weight.device != store_device for m in layout.modules):
            flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=store_device)
        kept = []
        for m, off in zip(layout.modules, layout.offsets):
            w = m.weight.data
            m._swap_shape = tuple(w.shape)
            if flat is not None:
                n = w.numel() * w.element_size()
                flat[off: off + n].copy_(w.contiguous().reshape(-1).view(torch.uint8))
            else:
                kept.append(w.contiguous())
            m.weight.data = torch.empty(0, dtype=w.dtype, device=w.device)
        return flat if flat is not None else kept

    @property
    def buffer_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self.slots)

    @property
    def store_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.store.values() for t in (v if isinstance(v, list) else [v]))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks ---------------------------------------------------------------------------------
    # Safety rule: a slot may be refilled only when every kernel that reads it has been enqueued
    # (the copy stream then waits for them). In forward that holds for every block but the one
    # running. In backward, block i+1 is finished once the gradients of *all* of block i's outputs
    # are complete (each of its backward nodes feeds one of them); until then block i+1 is kept.

    def _pre_hook(self, i: int):
        def hook(module, args):
            if torch._C._current_graph_task_id() != -1:  # gradient-checkpointing recompute
                self.load(i, keep=i + 1)
            else:
                self.load(i, keep=None)
                self.prefetch(i + 1, keep=i)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, outputs):
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return
            outs = [t for t in (outputs if isinstance(outputs, tuple) else (outputs,))
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            self._pending[i] = len(outs)
            for t in outs:
                t.register_hook(self._grad_hook(i))
        return hook

    def _grad_hook(self, i: int):
        def hook(grad):
            self.load(i, keep=i + 1)
            self._pending[i] -= 1
            if self._pending[i] == 0:  # block i+1 is done: its slot may take block i-1
                self.prefetch(i - 1, keep=i)
        return hook

    # -- copies --------------------------------------------------------------------------------
    def _slot_of(self, i: int) -> _Slot | None:
        return next((s for s in self.slots if s.block == i), None)

    def _views(self, slot: _Slot, i: int) -> list[torch.Tensor]:
        if i not in slot.views:
            lay = self.layouts[i]
            slot.views[i] = [
                slot.buffer[off: off + m.weight.element_size() * _numel(m._swap_shape)].view(m.weight.dtype).view(m._swap_shape)
                for m, off in zip(lay.modules, lay.offsets)
            ]
        return slot.views[i]

    def _start_copy(self, i: int, keep: int | None) -> _Slot:
        """Copy block i into a free slot, or one not holding block `keep` (still in use)."""
        slot = next((s for s in self.slots if s.block is None), None) or next(s for s in self.slots if s.block != keep)
        if slot.block is not None:
            for m in self.layouts[slot.block].modules:  # evict: the old block's weights are gone
                m.weight.data = torch.empty(0, dtype=m.weight.dtype, device=self.device)
        src, n = self.store[i], self.layouts[i].nbytes
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # readers of the old block first
            with torch.cuda.stream(self.copy_stream):
                self._copy(src, slot, i, n, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
        else:
            self._copy(src, slot, i, n, non_blocking=False)
        slot.block = i
        self.copies += 1
        return slot

    def _copy(self, src, slot: _Slot, i: int, n: int, non_blocking: bool) -> None:
        if isinstance(src, list):  # the loaded weights themselves: one copy per weight
            for view, w in zip(self._views(slot, i), src):
                view.copy_(w, non_blocking=non_blocking)
        else:
            slot.buffer[:n].copy_(src, non_blocking=non_blocking)

    def prefetch(self, i: int, keep: int) -> None:
        """Start copying block i (if swapped and not loaded) without touching block `keep`."""
        if i in self.layouts and self._slot_of(i) is None:
            self._start_copy(i, keep)

    def load(self, i: int, keep: int | None) -> None:
        """Make block i's weights usable by the compute stream now."""
        if i not in self.layouts:
            return
        slot = self._slot_of(i) or self._start_copy(i, keep)
        if self.cuda and slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        for m, v in zip(self.layouts[i].modules, self._views(slot, i)):
            m.weight.data = v


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
