"""Peak GPU memory of one training step, measured without a GPU: the real step on the meta device
(docs/method.md "Training memory").

The model is diffusers' `MochiTransformer3DModel` at any size, prepared exactly as the trainer
prepares it (`setup.prepare_model`: frozen Linears in their storage dtype, the peft LoRA triplet,
block swap, gradient checkpointing, activation offload). One step (flow-matching input, forward,
masked loss, backward, AdamW) runs on meta tensors, which have shapes and dtypes but no data, so
a 10 B-parameter model at 61x480x848 runs in seconds on any machine. A `TorchDispatchMode` sees
every tensor the step allocates and follows each storage's lifetime through a weak reference;
the high-water mark of live bytes is the peak.

What stands in for the GPU (each is what CUDA does, written for meta tensors):
- autocast: CUDA autocast casts the inputs of matmuls and convolutions to bf16 and runs norms
  and losses in fp32, above autograd (the casts are recorded, and what autograd saves is the
  cast copy). A `TorchFunctionMode` does the same casts at the same level.
- attention: `scaled_dot_product_attention` is replaced by a function that keeps what a flash
  kernel keeps: its inputs, the output and the log-sum-exp [B, H, S] in fp32, no S x S matrix;
  its backward allocates dq, dk, dv and FlashAttention-2's fp32 dq accumulator.
- host memory (block swap's weight store, offloaded activations): meta tensors the count leaves
  out.
- a base sharded over N ranks (`shard_base`, `world` > 1): FSDP2 itself needs materialised weights
  and a process group, so the trace stands in its memory pattern: every block streams through
  block swap's two block-sized buffers (what FSDP2 holds gathered: the block computing and the one
  gathered next), and each rank's dim-0 shard of every block's Linear weights (1/N, padded as
  FSDP2 pads) is counted as resident. The step itself (activations, LoRA, optimizer) is the real one.
Known fixes for meta (torch 2.14, diffusers 0.42): diffusers' RoPE enters `torch.autocast` with
the tensor's device type, which refuses 'meta' (mapped to a disabled CPU autocast here);
`torch.nonzero` on meta needs `meta_nonzero_assume_all_nonzero` (every text token counts as
valid: the worst case); peft creates LoRA weights on the CPU next to a meta base layer (the
move to the device in `prepare_model` takes them along).
Not counted: the CUDA context, allocator fragmentation (the estimator's `fits` adds a margin).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ...base_models import get_spec
from ...lora import peft_triplet as triplet
from ..flow import masked_flow_loss, noisy
from .activations import ActivationOffload
from .setup import MemoryOptions, prepare_model

GIB = 1024**3


# ---------------------------------------------------------------------------------------------
# live-bytes counter


class LiveBytes(TorchDispatchMode):
    """Counts bytes of live meta storages; tracks the peak and what was live at the peak, by tag."""

    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, tuple[int, int]] = {}  # id(storage) -> (bytes, serial)
        self.tags: dict[int, str] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._serial = 0
        self.current = 0
        self.peak = 0
        self.at_peak: dict[int, tuple[int, int, str]] = {}  # id -> (bytes, serial, tag)
        self._peak_pending = False  # a new maximum whose snapshot is not taken yet
        self._excluded = 0
        self.record_shapes = False  # debugging aid: what made the peak
        self.shapes: dict[int, tuple] = {}
        self.shapes_at_peak: list[tuple] = []

    def track(self, t: torch.Tensor, tag: str = "step") -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type or self._excluded:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        self._serial += 1
        n = st.nbytes()
        self.live[key], self.tags[key] = (n, self._serial), tag
        if self.record_shapes:
            self.shapes[key] = (tuple(t.shape), t.dtype)
        self._refs[key] = weakref.ref(st, lambda _, k=key: self._free(k))
        self.current += n
        if self.current > self.peak:
            self.peak, self._peak_pending = self.current, True

    def retag(self, t: torch.Tensor, tag: str) -> None:
        """Give a live storage a tag (also in the peak snapshot if it was live then)."""
        key = id(t.untyped_storage())
        if key not in self.live:
            return
        self.tags[key] = tag
        if key in self.at_peak and self.at_peak[key][1] == self.live[key][1]:
            self.at_peak[key] = (*self.at_peak[key][:2], tag)

    def _snapshot(self) -> None:
        self.at_peak = {k: (n, s, self.tags[k]) for k, (n, s) in self.live.items()}
        if self.record_shapes:
            self.shapes_at_peak = [(n, self.tags[k], *self.shapes.get(k, ((), None))) for k, (n, _) in self.live.items()]
        self._peak_pending = False

    def _free(self, key: int) -> None:
        if self._peak_pending:  # a maximum ends here: remember what made it
            self._snapshot()
        self.current -= self.live.pop(key, (0, 0))[0]
        self.tags.pop(key, None)
        self._refs.pop(key, None)
        self.shapes.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.current
        self._snapshot()

    def finish(self) -> None:
        if self._peak_pending:
            self._snapshot()

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Allocations inside are host memory: not counted."""
        self._excluded += 1
        try:
            yield
        finally:
            self._excluded -= 1

    def peak_by_tag(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, _, tag in self.at_peak.values():
            out[tag] = out.get(tag, 0) + n
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


# ---------------------------------------------------------------------------------------------
# CUDA stand-ins


class _FlashAttention(torch.autograd.Function):
    """Shapes and saved tensors of a flash-attention kernel: saves q, k, v, out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, counter):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.counter = counter
        for t in (q, k, v, out, lse):
            counter.retag(t, "attention")
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # FA2's fp32 accumulator
        ctx.counter.retag(dq_accum, "attention")
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del dq_accum
        return dq, dk, dv, None


_LOW = {
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm,
    torch.baddbmm, F.conv1d, F.conv2d, F.conv3d,
}
_FP32 = {F.layer_norm, F.group_norm, F.mse_loss, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax}


class CudaAutocastOnMeta(TorchFunctionMode):
    """CUDA bf16 autocast's casts, above autograd, for meta tensors; flash attention stand-in."""

    def __init__(self, counter: LiveBytes, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.counter, self.dtype = counter, dtype

    def _cast(self, args, kwargs, src: tuple[torch.dtype, ...], dst: torch.dtype):
        def c(a):
            return a.to(dst) if isinstance(a, torch.Tensor) and a.dtype in src else a
        return tree_map(c, args), tree_map(c, kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            qkv = list(args[:3]) + [kwargs[n] for n in ("query", "key", "value")[len(args[:3]):]]  # diffusers' Wan: kwargs
            q, k, v = (a.to(self.dtype) for a in qkv)
            return _FlashAttention.apply(q, k, v, self.counter)
        if func in _LOW:
            args, kwargs = self._cast(args, kwargs, (torch.float32, torch.float16), self.dtype)
        elif func in _FP32:
            args, kwargs = self._cast(args, kwargs, (torch.bfloat16, torch.float16), torch.float32)
        return func(*args, **kwargs)


class _MetaSafeAutocast(torch.autocast):
    """diffusers enters autocast with the tensor's device type; 'meta' has none (CUDA's
    float32-autocast region there only keeps RoPE in fp32, which it is anyway)."""

    def __init__(self, device_type, *args, **kwargs):
        if device_type == "meta":
            device_type, kwargs["enabled"] = "cpu", False
        super().__init__(device_type, *args, **kwargs)


@contextlib.contextmanager
def meta_patches() -> Iterator[None]:
    import torch.fx.experimental._config as fx_config

    old_nonzero, old_autocast = fx_config.meta_nonzero_assume_all_nonzero, torch.autocast
    fx_config.meta_nonzero_assume_all_nonzero = True
    torch.autocast = _MetaSafeAutocast
    try:
        yield
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = old_nonzero
        torch.autocast = old_autocast


class _TraceOffload(ActivationOffload):
    """Offload whose host copies are meta tensors left out of the count."""

    def __init__(self, counter: LiveBytes):
        super().__init__("meta")
        self.counter = counter

    def to_host(self, t):
        with self.counter.excluded():
            return torch.empty_like(t), None

    def to_device(self, host, done, device):
        return torch.empty_like(host)

    def release(self, host) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# the traced step


@dataclass
class TraceResult:
    options: MemoryOptions
    tokens: int  # visual tokens
    peak: int  # bytes
    parts: dict[str, int] = field(default_factory=dict)  # live bytes at the peak, by part

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB


def _mochi(config: dict, dtype: torch.dtype, family: str = "mochi") -> torch.nn.Module:
    from diffusers import MochiTransformer3DModel, WanTransformer3DModel

    with torch.device("meta"):
        model = (WanTransformer3DModel if family == "wan" else MochiTransformer3DModel)(**config)
    return model.to(dtype)


def trace_step(
    config: dict, frames: int, height: int, width: int, options: MemoryOptions, rank: int = 16,
    text_len: int | None = None, mask_weight: float = 50.0, counter: LiveBytes | None = None,
    base_model: str = "mochi", world: int = 1,
) -> TraceResult:
    """Peak live device bytes of one training step of a Mochi of `config` (MochiTransformer3DModel
    keyword arguments), after a first step (AdamW's state exists, as in a run). `world` > 1 with
    `options.shard_base`: one rank's peak with the base sharded over `world` ranks (module docstring)."""
    from .estimate import latent_shape

    spec = get_spec(base_model)
    if spec.family == "wan":  # a WanTransformer3DModel config
        from .wan_dims import WanDims

        t_lat, h_lat, w_lat = WanDims.from_config(config).latent_shape(frames, height, width)
        text_len, text_dim, channels = text_len or spec.text_len, config.get("text_dim", 4096), config["in_channels"]
    else:
        t_lat, h_lat, w_lat = latent_shape(frames, height, width)
        text_len, text_dim, channels = (text_len or config.get("max_sequence_length", 256),
                                        config.get("text_embed_dim", 4096), 12)
    counter = counter or LiveBytes()
    with meta_patches():
        model = _mochi(config, torch.bfloat16, spec.family)
        offload = _TraceOffload(counter) if options.offload_activations else None
        sharded = options.shard_base and world > 1
        layers = len(spec.blocks(model))
        prepared = prepare_model(
            model, replace(options, shard_base=False, blocks_to_swap=layers) if sharded else replace(options, shard_base=False), "meta", rank=rank, alpha=float(rank), offload=offload,
            swap_kwargs={"store_device": "meta"}, recompute_context=lambda: CudaAutocastOnMeta(counter),
        )
        from ...mochi.fp8 import frozen_linears

        for _, m in frozen_linears(model):
            m.matmul_dtype = torch.bfloat16  # what CUDA autocast gives the base matmuls
        model.train()
        triplet.activate_branch(model, "relation")  # every adapter trains: the largest step
        lora = [p for _, p in triplet.lora_parameters(model)]
        optimizer = torch.optim.AdamW(lora, lr=1e-4, foreach=True)
        for p in lora:  # AdamW's state as after a first step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _baseline(counter, model, prepared, lora, optimizer)
        shards = _shards(counter, prepared, world) if sharded else []  # alive (counted) through the step
        with counter, CudaAutocastOnMeta(counter):
            z = torch.randn(1, channels, t_lat, h_lat, w_lat, device="meta")
            eps = torch.randn_like(z)
            sigma = torch.rand(1, device="meta")
            x, u = noisy(z, eps, sigma)
            y = torch.randn(1, text_len, text_dim, device="meta")
            ym = torch.ones(1, text_len, dtype=torch.bool, device="meta")
            mask = torch.ones(1, t_lat, h_lat, w_lat, device="meta")
            pred = spec.predict(model, x, y, ym, sigma)
            loss = masked_flow_loss(pred, u, mask, mask_weight)[0]
            del pred, x, u, z, eps, y, mask
            loss.backward()
            del loss
            for p in lora:  # the gradients: part of LoRA + optimizer
                if p.grad is not None:
                    counter.retag(p.grad, "lora")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counter.finish()
        del shards
        parts = counter.peak_by_tag()
    parts = {"weights": parts.get("weights", 0), "swap_buffers": parts.get("swap_buffers", 0),
             "lora": parts.get("lora", 0), "activations": parts.get("step", 0), "attention": parts.get("attention", 0)}
    return TraceResult(options, t_lat * (h_lat // 2) * (w_lat // 2), counter.peak, parts)


def _shards(counter: LiveBytes, prepared, world: int) -> list[torch.Tensor]:
    """One rank's shard of every streamed Linear weight (dim 0 padded to a multiple of `world`, as
    FSDP2 pads), counted as resident weights."""
    out = []
    for layout in prepared.swap.layouts.values():
        for m in layout.modules:
            rows, cols = m._swap_shape[0], int(torch.Size(m._swap_shape[1:]).numel())
            t = torch.empty(-(-rows // world) * cols * m.weight.element_size(), dtype=torch.uint8, device="meta")
            counter.track(t, "weights")
            out.append(t)
    return out


def _baseline(counter: LiveBytes, model, prepared, lora, optimizer) -> None:
    """Register what is on the device before the step: weights, LoRA and AdamW state, swap buffers."""
    lora_ids = {id(p) for p in lora}
    for p in list(model.parameters()) + list(model.buffers()):
        counter.track(p, "lora" if id(p) in lora_ids else "weights")
    for p in lora:
        for v in optimizer.state[p].values():
            if isinstance(v, torch.Tensor):
                counter.track(v, "lora")
    if prepared.swap is not None:
        for s in prepared.swap.slots:
            counter.track(s.buffer, "swap_buffers")
