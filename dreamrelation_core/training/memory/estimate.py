"""Analytic peak GPU memory of one training step of the relation LoRA triplet on Mochi
(docs/method.md "Training memory").

Every term is a tensor the step holds at its peak, counted from the model's dimensions
(`MochiDims`, read from diffusers' `MochiTransformer3DModel` config) and the clip's token counts;
`trace.py` measures the same step on the meta device and the tests hold the two within 10 %.
Notation: N visual tokens (T_lat * h/2 * w/2), L text tokens (256), S = N + L, d = 3072 visual
width (24 heads x 128), c = 1536 text width, f = 8d/3 and fc = 8c/3 feed-forward widths.

Where the peak is: in backward, at the RMSNorm backward of the last block's feed-forward
output (its first backward op), when all that block's saved tensors are still alive and the norm's
fp32 backward temporaries are at their largest. Before it: with gradient checkpointing the 48
block inputs plus the last block recomputed; without, every block's saved tensors.

What a block saves for backward under CUDA bf16 autocast (diffusers 0.42's Mochi block, frozen
weights, LoRA on the attention projections; bytes per token):
- each RMSNorm of the residual streams (norm1..4; norm1's only once the input needs a gradient,
  i.e. not in block 0) saves its fp32 input copy: 4d;
- the LoRA layers on Q/K/V save their common bf16 input: 2d (the frozen base saves nothing);
- the Q and K RMSNorms save the fp32 copy and the bf16 input: 2 x 6d;
- attention (a flash kernel) saves q, k, v and the output (bf16, S rows) and the log-sum-exp
  (fp32 per head): 8d per row + 4 * heads; the output projections' LoRAs save the flattened
  attention output: 2d per row;
- the SwiGLU feed-forward saves its projection output (2f wide) and the SiLU output (f): 6f;
- the text stream the same with c, fc and L (its Q/K norms are d wide; the last block has no
  text feed-forward or output projection).
Outside the blocks: RoPE cos/sin (fp32, [N, heads, 64] each: 4d), the output LayerNorm's fp32
input (4d), the loss (a few [N, 48] tensors, ignored). Gradient checkpointing keeps the block
inputs (bf16 hidden and text states: 2d per token + 2c per text token) instead; offloading
keeps them on the host (the recomputed block's input comes back, and the block below's is
prefetched beside it). The transient at the peak: the
incoming bf16 gradient (2d) and five fp32 [N, d] temporaries of the norm backward (20d).

Several processes (`world` > 1, train --nproc N): every figure is one rank's. Each rank computes
`batch` clips (the global batch / N). With the base sharded (`shard_base`, shard.py) a rank keeps
1/N of each block's frozen Linear weights (FSDP2 pads dim 0 to a multiple of N) and holds two
blocks' full weights in flight, the one computing and the one gathered next: the same two
block-sized buffers block swap streams through ("swap_buffers"). Biases, norms and the weights
outside the blocks are counted whole (a few MB per block; FSDP2 shards a block's biases and norms
as well, so this errs high). The meta trace (trace.py) cannot run FSDP2 (it needs materialised
weights); it traces the same memory pattern with block swap's buffers and a store of 1/N.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from ...errors import TrainingError
from ...lora.layout import ADAPTER_MODULES, target_modules
from .setup import MemoryOptions
from .swap import _align

GIB = 1024**3
STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
COMPUTE_BYTES = 2  # bf16 autocast on CUDA


@dataclass(frozen=True)
class Margin:
    """What a GPU needs beyond the live tensors the meta trace counts (docs/method.md "Training
    memory": the margin). Reasoned figures, NOT measured: no GPU was available when they were
    set; `benchmarks/gpu_memory.py` prints the measured counterparts (memory outside the caching
    allocator, reserved / allocated) to calibrate them on the first GPU."""

    # The CUDA context and the kernel images loaded into it (torch, cuBLAS, cuDNN, flash
    # attention; lazily loaded): typically 0.3-0.6 GiB, outside torch's allocator.
    context_gib: float = 0.6
    # Workspaces allocated through torch's allocator on first use, outside any tensor: cuBLAS(Lt)
    # keeps up to 32 MiB per stream and handle on Hopper (4 MiB before), three streams here
    # (compute, swap, offload); cuDNN / attention workspaces of a few MiB; round up.
    workspace_gib: float = 0.25
    # Reserved over allocated: the caching allocator rounds blocks and cannot always reuse a freed
    # block for a larger request (weight upcasts of ~30 sizes beside activations of a few sizes);
    # 5-20 % with fixed segments, less with expandable_segments (which the worker sets).
    fragmentation: float = 0.05

    def needed_bytes(self, peak: int, context: bool = True) -> int:
        """GPU memory a run with `peak` bytes of live tensors needs. context=False: against free
        memory measured in a running process whose context and workspaces already exist."""
        extra = (self.context_gib + self.workspace_gib) * GIB if context else 0
        return int(peak * (1 + self.fragmentation) + extra)

    def describe(self) -> str:
        return (f"peak x {1 + self.fragmentation:.2f} + {self.context_gib + self.workspace_gib:.2f} GiB "
                f"(CUDA context {self.context_gib:.2f}, workspaces {self.workspace_gib:.2f})")


MARGIN = Margin()
FRAGMENTATION = MARGIN.fragmentation  # the margin against free memory measured after warm-up


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, h, w) of Mochi's latents: 6x temporal with a causal first frame, 8x spatial."""
    if frames < 1 or (frames - 1) % 6:
        raise TrainingError(f"frames must be 1 + 6k (25, 31, 37, ..., 61, ...), got {frames}")
    if height % 16 or width % 16:
        raise TrainingError(f"size {height}x{width}: height and width must be multiples of 16")
    return 1 + (frames - 1) // 6, height // 8, width // 8


@dataclass(frozen=True)
class MochiDims:
    """The dimensions of a MochiTransformer3DModel config that set its memory."""

    layers: int = 48
    heads: int = 24
    head_dim: int = 128
    text_width: int = 1536  # pooled_projection_dim
    text_embed_dim: int = 4096  # T5 features
    time_embed_dim: int = 256
    patch: int = 2
    in_channels: int = 12
    out_channels: int = 12
    text_len: int = 256  # max_sequence_length

    @property
    def d(self) -> int:
        return self.heads * self.head_dim

    @property
    def f(self) -> int:
        return (4 * self.d * 2) // 3

    @property
    def fc(self) -> int:
        return (4 * self.text_width * 2) // 3

    @classmethod
    def from_config(cls, config: dict | None = None) -> MochiDims:
        """From MochiTransformer3DModel keyword arguments; missing ones take diffusers' defaults
        (the full-size Mochi 1)."""
        from diffusers import MochiTransformer3DModel

        cfg = {k: p.default for k, p in inspect.signature(MochiTransformer3DModel.__init__).parameters.items()
               if p.default is not inspect.Parameter.empty}
        cfg.update(config or {})
        return cls(
            layers=cfg["num_layers"], heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
            text_width=cfg["pooled_projection_dim"], text_embed_dim=cfg["text_embed_dim"],
            time_embed_dim=cfg["time_embed_dim"], patch=cfg["patch_size"], in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"] or cfg["in_channels"], text_len=cfg["max_sequence_length"],
        )

    # -- parameters ----------------------------------------------------------------------------
    def block_linears(self, i: int) -> list[tuple[str, int, int, bool]]:
        """(module, in, out, bias) of block i's Linears."""
        d, c, last = self.d, self.text_width, i == self.layers - 1
        out = [("norm1.linear", d, 4 * d, True),
               ("norm1_context.linear_1", d, c, True) if last else ("norm1_context.linear", d, 4 * c, True)]
        out += [(f"attn1.{n}", d, d, False) for n in ("to_q", "to_k", "to_v")]
        out += [(f"attn1.{n}", c, d, False) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        out += [("attn1.to_out.0", d, d, True), ("ff.net.0.proj", d, 2 * self.f, False), ("ff.net.2", self.f, d, False)]
        if not last:
            out += [("attn1.to_add_out", d, c, True), ("ff_context.net.0.proj", c, 2 * self.fc, False),
                    ("ff_context.net.2", self.fc, c, False)]
        return out

    def outer_linears(self) -> list[tuple[str, int, int, bool]]:
        d, t = self.d, self.text_embed_dim
        return [
            ("time_embed.timestep_embedder.linear_1", self.time_embed_dim, d, True),
            ("time_embed.timestep_embedder.linear_2", d, d, True),
            ("time_embed.pooler.to_kv", t, 2 * t, True), ("time_embed.pooler.to_q", t, t, True),
            ("time_embed.pooler.to_out", t, d, True), ("time_embed.caption_proj", t, self.text_width, True),
            ("norm_out.linear", d, 2 * d, True), ("proj_out", d, self.patch**2 * self.out_channels, True),
        ]

    def other_params(self) -> int:
        """Parameters that are not Linear weights or biases (norm weights, patch conv, RoPE)."""
        per_block = 4 * self.head_dim  # norm_q, norm_k, norm_added_q, norm_added_k
        conv = self.in_channels * self.patch**2 * self.d + self.d
        return self.layers * per_block + conv + 3 * self.heads * (self.head_dim // 2)

    def lora_params(self, rank: int) -> int:
        return sum(self.lora_block_params(rank))

    def lora_block_params(self, rank: int) -> list[int]:
        """LoRA parameters of each block (the triplet's target modules, see lora.layout)."""
        shapes = {"to_q": (self.d, self.d), "to_k": (self.d, self.d), "to_v": (self.d, self.d),
                  "add_q_proj": (self.text_width, self.d), "add_k_proj": (self.text_width, self.d),
                  "add_v_proj": (self.text_width, self.d), "to_out.0": (self.d, self.d),
                  "to_add_out": (self.d, self.text_width)}
        per_block = [0] * self.layers
        for adapter in ADAPTER_MODULES:
            for path in target_modules(adapter, self.layers):
                block, sub = path.removeprefix("transformer_blocks.").split(".attn1.")
                i, o = shapes[sub]
                per_block[int(block)] += rank * (i + o)
        return per_block


@dataclass
class Estimate:
    options: MemoryOptions
    frames: int
    height: int
    width: int
    tokens: int
    parts: dict[str, int] = field(default_factory=dict)  # bytes
    attention_kernel: str = "flash"  # see ATTENTION_KERNELS
    seconds: float | None = None  # modelled step time (`step_time`), where computed
    world: int = 1  # processes of the launch: the figures are one rank's
    batch: int = 1  # clips per rank and step

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def needed_gib(self, context: bool = True) -> float:
        """GPU memory a run needs: the peak plus the margin (see `Margin`)."""
        return MARGIN.needed_bytes(self.peak, context) / GIB

    def report(self) -> str:
        lines = [f"options: {self.options.label()}  ({self.frames} frames, {self.height}x{self.width}, {self.tokens} visual tokens)"]
        if self.world > 1:
            lines.append(f"  per rank of {self.world} processes ({self.batch} clip{'s' if self.batch > 1 else ''} per rank"
                         + (f"; frozen blocks sharded 1/{self.world}, two blocks gathered in flight)"
                            if self.options.shard_base else "; the whole base on every GPU)"))
        if self.attention_kernel == "math":
            lines.append("  attention: the math kernel (no flash / memory-efficient kernel for this GPU and dtype): "
                         "its score matrices are in the attention line")
        for name, label in PART_LABELS.items():
            lines.append(f"  {label:<24} {self.parts[name] / GIB:8.2f} GiB")
        lines.append(f"  {'peak (live tensors)':<24} {self.peak_gib:8.2f} GiB")
        lines.append(f"  {'GPU needed (+ margin)':<24} {self.needed_gib():8.2f} GiB")
        return "\n".join(lines)


PART_LABELS = {
    "weights": "weights resident", "swap_buffers": "swap buffers / gathered", "lora": "LoRA + optimizer",
    "activations": "activations", "attention": "attention workspace",
}


def estimate(
    frames: int, height: int, width: int, options: MemoryOptions, dims: MochiDims | None = None, rank: int = 16,
    attention: str = "flash", batch: int = 1, world: int = 1,
) -> Estimate:
    """Predicted peak GPU memory of one training step, split into PART_LABELS (`dims`: MochiDims, or
    another base model's dims with its own `latent_shape`, e.g. wan_dims.WanDims). `attention`: the
    SDPA kernel the GPU runs (ATTENTION_KERNELS; `attention.py` probes it). `batch`: clips per
    rank; `world`: processes (the figures are one rank's; see the module docstring)."""
    shape = dims.latent_shape(frames, height, width) if hasattr(dims, "latent_shape") else latent_shape(frames, height, width)
    est = estimate_latent(shape, options, dims, rank, batch, attention=attention, world=world)
    est.frames, est.height, est.width = frames, height, width
    return est


def estimate_latent(
    latent: tuple[int, int, int], options: MemoryOptions, dims: MochiDims | None = None, rank: int = 16, batch: int = 1,
    attention: str = "flash", world: int = 1,
) -> Estimate:
    """`estimate` from the latent shape (T, h, w); a batch of B clips (per rank) holds B times the
    activations (an approximation for B > 1). `world`: processes of the launch."""
    dims = dims or MochiDims()
    if options.base_dtype not in ("bf16", "fp8"):
        raise TrainingError(f"the GPU memory estimate covers base_dtype bf16 and fp8, not {options.base_dtype!r}")
    t, h, w = latent
    n = t * (h // dims.patch) * (w // dims.patch)
    if attention not in ATTENTION_KERNELS:
        raise TrainingError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {attention!r}")
    act, att, grads = _activations(dims, options, n, dims.text_len, rank, attention)
    act, att = act * batch, att * batch
    parts = {
        **_weights(dims, options, world),
        # fp32 weights and AdamW's two moments; the gradients that exist at the peak
        "lora": dims.lora_params(rank) * 4 * 3 + grads,
        "activations": act, "attention": att,
    }
    return Estimate(options, 1 + 6 * (t - 1), 8 * h, 8 * w, n, {k: parts[k] for k in PART_LABELS}, attention,
                    world=world, batch=batch)


def _weights(dims: MochiDims, options: MemoryOptions, world: int = 1) -> dict[str, int]:
    wb, scale = STORAGE_BYTES[options.base_dtype], 4 if options.base_dtype == "fp8" else 0
    sharded = options.shard_base and world > 1
    # streamed through two block-sized buffers: the swapped blocks, or every block of a sharded base
    swapped = set(range(dims.layers if sharded else min(options.blocks_to_swap, dims.layers)))

    def linears_bytes(linears, rows) -> int:
        """Weights of `rows(out)` rows each (all, none, or a rank's dim-0 shard), scales, biases."""
        return sum(i * rows(o) * wb + scale + (o * COMPUTE_BYTES if b else 0) for _, i, o, b in linears)

    def block_rows(i: int):
        if sharded:
            return lambda o: -(-o // world)  # FSDP2 pads dim 0 to a multiple of the world size
        return (lambda o: 0) if i in swapped else (lambda o: o)

    resident = linears_bytes(dims.outer_linears(), lambda o: o) + dims.other_params() * COMPUTE_BYTES
    resident += sum(linears_bytes(dims.block_linears(i), block_rows(i)) for i in range(dims.layers))
    slot = max((sum(_align(i * o * wb) for _, i, o, _ in dims.block_linears(b)) for b in swapped), default=0)
    return {"weights": resident, "swap_buffers": slot * min(2, len(swapped))}


# The SDPA kernels as memory sees them. flash (FlashAttention-2, sm80+) and efficient (the
# memory-efficient kernel; bf16 needs sm80+, fp16 runs from sm50) keep q, k, v, the output and a
# log-sum-exp: no S x S matrix. math builds the S x S scores per head, and by default (torch does
# not allow bf16/fp16 reductions in it) in fp32.
ATTENTION_KERNELS = ("flash", "efficient", "math")
MATH_SCORE_BYTES = 4


def _math_attention(dims: MochiDims, s: int) -> tuple[int, int]:
    """(saved, backward transient) bytes of one block's math-kernel attention over S tokens: it
    saves the fp32 softmax output and fp32 copies of q, k, v and out; its backward adds the
    gradients of the probabilities and of the scores (each S x S per head)."""
    scores = dims.heads * s * s * MATH_SCORE_BYTES
    return scores + 4 * s * dims.d * 4, 2 * scores


def _block_saved(dims: MochiDims, i: int, n: int, l: int, attention: str = "flash") -> tuple[int, int]:
    """(activations, attention) bytes block i saves for backward (see the module docstring)."""
    if hasattr(dims, "block_saved"):  # another base model's block (wan_dims)
        return dims.block_saved(i, n, l)
    d, c, s, first, last = dims.d, dims.text_width, n + l, i == 0, i == dims.layers - 1
    vis = (3 if first else 4) * 4 * d + 2 * d + 2 * 6 * d + 6 * dims.f
    txt = 2 * c + 2 * 6 * d  # LoRA input, added Q/K norms
    if last:
        txt += 4 * c  # the text modulation norm (norm1_context); no text feed-forward
    else:
        txt += (3 if first else 4) * 4 * c + 6 * dims.fc
    att = s * (4 * 2 * d + 4 * dims.heads) if attention != "math" else _math_attention(dims, s)[0]
    return n * vis + l * txt + s * 2 * d, att


def _activations(
    dims: MochiDims, options: MemoryOptions, n: int, l: int, rank: int, attention: str = "flash",
) -> tuple[int, int, int]:
    """(activations, attention, LoRA gradients) at the peak: the backward of the block i where
    the sum is largest (i = last block, except with offloaded inputs, where the LoRA gradients of
    the blocks done make block 1's backward the peak; block 0 saves less)."""
    d, c, layers = dims.d, dims.text_width, dims.layers
    # cos and sin, fp32, shared by all blocks until the end of backward (Wan: also its text context)
    rope = dims.shared_activations(n, l) if hasattr(dims, "shared_activations") else n * 4 * d
    transient = n * (2 * d + 5 * 4 * d)  # incoming bf16 gradient, five fp32 norm-backward temporaries
    block_input = n * 2 * d + l * 2 * c  # a checkpoint keeps its block's inputs (bf16)
    saved = [_block_saved(dims, i, n, l, attention) for i in range(layers)]
    lora = dims.lora_block_params(rank)
    grads_after = [4 * sum(lora[i + 1:]) for i in range(layers)]  # fp32 gradients of the blocks done
    best, held_act, held_att = (-1, 0, 0, 0), 0, 0
    for i in range(layers):
        held_act, held_att = held_act + saved[i][0], held_att + saved[i][1]
        if options.gradient_checkpointing:  # block i recomputed; inputs of blocks 0..i still kept
            act, att = saved[i]
            # offloaded: none on the device, but the block below's, prefetched for its recompute
            act += (block_input if i > 0 else 0) if options.offload_activations else (i + 1) * block_input
        else:  # blocks 0..i still hold what they saved
            act, att = held_act, held_att
        total = act + att + grads_after[i]
        if total > best[0]:
            best = (total, act, att, grads_after[i])
    att_transient = _math_attention(dims, n + l)[1] if attention == "math" else 0
    return best[1] + rope + transient, best[2] + att_transient, best[3]


# ---------------------------------------------------------------------------------------------
# host memory

# What the training process holds in RAM besides the parts of `host_estimate`: the torch and CUDA
# libraries, the Python heap, the prepared clips, the LoRA's host-side state (reasoned, not
# measured on a GPU machine: `benchmarks/gpu_memory.py` prints the RSS to calibrate it).
HOST_RUNTIME_GIB = 3.0
HOST_LABELS = {"loading": "model while loading", "swap_store": "swap store (pinned)",
               "offload": "offloaded inputs (pinned)", "runtime": "libraries, clips, heap"}


@dataclass
class HostEstimate:
    parts: dict[str, int]  # bytes, by HOST_LABELS

    @property
    def pinned(self) -> int:
        """Page-locked bytes the run adds after the model is loaded (what is checked before start)."""
        return self.parts["swap_store"] + self.parts["offload"]

    @property
    def peak(self) -> int:
        """Peak RAM: loading (every frozen weight on the host before the move) or training (the
        pinned parts), whichever is larger, plus the runtime."""
        return max(self.parts["loading"], self.pinned) + self.parts["runtime"]

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def report(self) -> str:
        lines = ["host memory (RAM; peak: the larger of loading and pinned, + libraries):"]
        for name, label in HOST_LABELS.items():
            lines.append(f"  {label:<28} {self.parts[name] / GIB:8.2f} GiB")
        lines.append(f"  {'peak':<28} {self.peak_gib:8.2f} GiB")
        return "\n".join(lines)


def host_estimate(
    latent: tuple[int, int, int], options: MemoryOptions, dims: MochiDims | None = None, batch: int = 1,
) -> HostEstimate:
    """Host RAM of a CUDA training run with `options`: the model as loaded (the frozen weights in
    their storage dtype, the file assumed to be in it), the swap store (each swapped block's weights
    in one exact-size page-locked buffer) and the offloaded block inputs (one exact-size buffer per
    block and clip, reused every step)."""
    dims = dims or MochiDims()
    wb = STORAGE_BYTES[options.base_dtype]
    t, h, w = latent
    n = t * (h // dims.patch) * (w // dims.patch)
    linears = [lin for b in range(dims.layers) for lin in dims.block_linears(b)] + dims.outer_linears()
    loading = sum(i * o * wb + (o * COMPUTE_BYTES if b else 0) for _, i, o, b in linears)
    loading += (dims.other_params() if hasattr(dims, "other_params") else 0) * COMPUTE_BYTES  # norms, patch conv
    swapped = range(min(options.blocks_to_swap, dims.layers))
    store = sum(sum(_align(i * o * wb) for _, i, o, _ in dims.block_linears(b)) for b in swapped)
    offload = 0
    if options.offload_activations:
        offload = dims.layers * batch * (n * 2 * dims.d + dims.text_len * 2 * dims.text_width)
    return HostEstimate({"loading": loading, "swap_store": store, "offload": offload,
                         "runtime": int(HOST_RUNTIME_GIB * GIB)})


# ---------------------------------------------------------------------------------------------
# option search


@dataclass(frozen=True)
class StepTimeModel:
    """Modelled seconds of one training step, to rank the option sets that fit (docs/method.md
    "Training memory": which options are fastest). A model, not a measurement: the rates are
    assumptions for a consumer GPU (bf16 tensor cores with fp32 accumulation, PCIe 4.0 x16 with
    pinned memory), to be replaced by `benchmarks/gpu_memory.py`'s s/step once measured. The
    ranking depends on their ratios more than on their values.

    Per block and pass: compute = matmul + attention FLOPs / `tflops` (+ the fp8 upcast's HBM
    traffic); transfer = swapped weight bytes + offloaded input bytes / `pcie_gbps`. Copies run
    on a side stream beside compute, so a block costs max(compute, transfer), and each pass pays
    one block's transfer that nothing hides. Passes: forward, recompute (checkpointing), backward
    (twice the forward's matmul work: input gradients and the LoRA's). A sharded base (world > 1)
    moves (N-1)/N of each block's weights per pass over `interconnect_gbps` (all-gathers, overlapped
    like the swap copies)."""

    tflops: float = 60.0  # effective dense bf16 TFLOP/s
    pcie_gbps: float = 12.0  # effective host <-> GPU GB/s, each direction
    hbm_gbps: float = 700.0  # GPU memory GB/s (the fp8 upcast: read 1 byte, write 2, scale in place 4)
    # GPU <-> GPU GB/s each rank receives in an all-gather: consumer cards talk over PCIe (this
    # figure); NVLink (H100 nodes) is ~20x faster, so there sharding costs nearly nothing in time
    interconnect_gbps: float = 12.0

    def block_flops(self, dims: MochiDims, i: int, n: int, l: int) -> float:
        """Forward FLOPs of block i: its Linears on the tokens they see, and attention (4 S^2 d)."""
        rows = {"norm1.linear": 1, "norm1_context.linear": 1, "norm1_context.linear_1": 1, "attn1.add_q_proj": l,
                "attn1.add_k_proj": l, "attn1.add_v_proj": l, "attn1.to_add_out": l, "ff_context.net.0.proj": l,
                "ff_context.net.2": l}
        mm = sum(2.0 * rows.get(name, n) * a * b for name, a, b, _ in dims.block_linears(i))
        return mm + 4.0 * (n + l) ** 2 * dims.d

    def seconds(self, dims: MochiDims, options: MemoryOptions, n: int, l: int, world: int = 1) -> float:
        wb = STORAGE_BYTES[options.base_dtype]
        passes = 3 if options.gradient_checkpointing else 2  # weights used per step: fwd, (recompute), bwd
        swapped = set(range(min(options.blocks_to_swap, dims.layers)))
        if options.shard_base and world > 1:  # every block gathered; (N-1)/N of it over the interconnect
            swapped, wb = set(range(dims.layers)), wb * (world - 1) / world
            rate = self.interconnect_gbps
        else:
            rate = self.pcie_gbps
        block_input = n * 2 * dims.d + l * 2 * dims.text_width
        total = 0.0
        for i in range(dims.layers):
            fwd = self.block_flops(dims, i, n, l) / (self.tflops * 1e12)
            weights = sum(a * b for _, a, b, _ in dims.block_linears(i))
            upcast = weights * 7 / (self.hbm_gbps * 1e9) if options.base_dtype == "fp8" else 0.0
            compute = [fwd + upcast, 2 * fwd + upcast] + ([fwd + upcast] if options.gradient_checkpointing else [])
            copy = weights * wb / (rate * 1e9) if i in swapped else 0.0
            offload = block_input / (self.pcie_gbps * 1e9) if options.offload_activations else 0.0
            moves = [copy + offload, copy + offload] + ([copy] if options.gradient_checkpointing else [])
            total += sum(max(c, m) for c, m in zip(compute, moves))
        if swapped:
            first = max(sum(a * b for _, a, b, _ in dims.block_linears(i)) for i in swapped) * wb
            total += passes * first / (rate * 1e9)
        return total


STEP_TIME = StepTimeModel()


def option_ladder(layers: int = 48, both_dtypes: bool = False, shard: bool = False) -> list[MemoryOptions]:
    """Every option set the automatic choice considers, in its order of preference: bf16 < fp8
    (cheap upcast), no checkpointing < checkpointing (a second forward), then more and more
    blocks swapped, then the checkpointed inputs offloaded as well (with 0..all blocks swapped).
    `both_dtypes` appends the bf16 versions of the swap/offload rungs (only reached when the user
    fixes base_dtype: bf16). `shard` (several processes) adds the sharded-base sets after the four
    unswapped ones and before any swap (their offloading versions before the first offloading
    set): on a tie sharding wins over block swap, which would keep a pinned copy of the swapped
    blocks per process and share the host's PCIe lanes among the GPUs, and loses to a base that
    fits whole.

    Contract (for `fastest_fitting`, the trainer's `auto` and its out-of-memory fallback): a
    list of distinct MemoryOptions, the same for the same arguments; along it, within the
    swap-only rungs and within the offload rungs of one dtype, the estimated peak never grows
    (tested), so walking down from a rung that ran out of memory reaches sets that need less.
    The order breaks ties of the step-time model: of two sets modelled equally fast, the earlier
    rung wins."""
    out = [MemoryOptions("bf16", 0, False), MemoryOptions("fp8", 0, False),
           MemoryOptions("bf16", 0, True), MemoryOptions("fp8", 0, True)]
    if shard:  # after the unswapped sets, before any swap: see the docstring
        out += [MemoryOptions(dtype, 0, ckpt, shard_base=True) for ckpt in (False, True) for dtype in ("bf16", "fp8")]
    for dtype in ("fp8", "bf16") if both_dtypes else ("fp8",):
        out += [MemoryOptions(dtype, k, True) for k in range(1, layers + 1)]
        if shard and dtype == "fp8":  # before the first offloading set
            out += [MemoryOptions(d, 0, True, True, shard_base=True) for d in ("fp8", "bf16")]
        out += [MemoryOptions(dtype, k, True, True) for k in range(0, layers + 1)]
    return out


TIE = 0.01  # modelled times within 1 % count as equal (the model is not that precise)


def fastest_fitting(
    frames: int, height: int, width: int, budget_gib: float, dims: MochiDims | None = None, rank: int = 16,
    allow_fp8: bool = True, context: bool = True, attention: str = "flash", model: StepTimeModel = STEP_TIME,
    candidates: list[MemoryOptions] | None = None, batch: int = 1, world: int = 1,
) -> Estimate | None:
    """The option set that fits `budget_gib` with the shortest modelled step time (`StepTimeModel`),
    among `candidates` (default `option_ladder`), the earlier rung on a tie. context=False: the
    budget is free memory measured in a running process, the CUDA context already paid. `batch`:
    clips per rank; `world`: processes (> 1 adds the sharded-base sets to the default candidates)."""
    dims = dims or MochiDims()
    cands = candidates if candidates is not None else option_ladder(dims.layers, shard=world > 1)
    cands = [o for o in cands if allow_fp8 or o.base_dtype != "fp8"]
    shape = dims.latent_shape(frames, height, width) if hasattr(dims, "latent_shape") else latent_shape(frames, height, width)
    best = fastest_fitting_latent(shape, int(budget_gib * GIB), cands, dims, rank, batch,
                                  context=context, attention=attention, model=model, world=world)
    if best is not None:
        best.frames, best.height, best.width = frames, height, width
    return best


def fastest_fitting_latent(
    latent: tuple[int, int, int], budget_bytes: int, candidates: list[MemoryOptions], dims: MochiDims, rank: int = 16,
    batch: int = 1, context: bool = False, attention: str = "flash", model: StepTimeModel = STEP_TIME, world: int = 1,
) -> Estimate | None:
    """`fastest_fitting` for a latent shape (T, h, w), a budget in bytes and given candidates in
    ladder order (the trainer's `auto`: free memory measured in the worker, context=False)."""
    best: Estimate | None = None
    for opts in candidates:
        est = estimate_latent(latent, opts, dims, rank, batch, attention, world)
        if MARGIN.needed_bytes(est.peak, context) > budget_bytes:
            continue
        est.seconds = model.seconds(dims, opts, est.tokens, dims.text_len, world)
        if best is None or est.seconds < best.seconds * (1 - TIE):
            best = est
    return best
