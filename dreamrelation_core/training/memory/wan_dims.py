"""Wan's dimensions for the training-memory estimate (the counterpart of `estimate.MochiDims`).

Same accounting as Mochi's (docs/method.md "Training memory"), for diffusers' Wan block under
CUDA bf16 autocast with the triplet on the attention projections, counted against the meta-device
trace of the real step (`trace.trace_step(..., base_model="wan2.1")`, tests/test_memory_wan.py).
Notation: N video tokens (T_lat · h/2 · w/2), L = 512 text rows, d width (heads × 128), f FFN
width. What the last block still holds at the peak (its backward), bytes per video token: the
fp32 inputs of its three LayerNorms (norm1, norm2, norm3: 3 × 4d), seven bf16 [N, d] tensors (the
modulated inputs of the q/k/v, cross-attention query and FFN Linears, the RMSNorm inputs, the
output projections' LoRA inputs: 14d) and the GELU FFN's two [N, f] tensors (4f); per text row,
the fp32 copy of the cross-attention key (4d). Attention (a flash kernel): q, k, v, out and the
log-sum-exp of the self-attention, q, out and the text k, v of the cross-attention. Shared by all
blocks: the projected text context (L × 2d, one tensor every checkpoint refers to) and RoPE's cos /
sin. Gradient checkpointing keeps each block's bf16 hidden states (2d per token); the text
context is not a per-block input here (text_width 0).
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_DIM = 128
# diffusers WanTransformer3DModel configs of the released sizes (T2V; TI2V 5B with 48 channels)
SIZES: dict[str, dict] = {
    "1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16),
    "14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
    "5b": dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
}
# base model name -> size (the A14B experts are 14B each)
SIZE_OF = {"wan2.1-1.3b": "1.3b", "wan2.1-14b": "14b", "wan2.1": "14b", "wan2.2-a14b": "14b", "wan2.2-5b": "5b"}


@dataclass(frozen=True)
class WanDims:
    """The dimensions of a WanTransformer3DModel config that set its memory."""

    layers: int = 40
    heads: int = 40
    head_dim: int = HEAD_DIM
    ffn: int = 13824
    text_dim: int = 4096  # umT5 features
    freq_dim: int = 256
    patch: int = 2  # spatial (the temporal patch is 1)
    in_channels: int = 16
    out_channels: int = 16
    text_len: int = 512
    text_width: int = 0  # no text stream through the blocks (the context is shared, see module docstring)

    @property
    def d(self) -> int:
        return self.heads * self.head_dim

    @property
    def f(self) -> int:
        return self.ffn

    @classmethod
    def from_config(cls, config: dict) -> WanDims:
        patch = config.get("patch_size", (1, 2, 2))
        return cls(
            layers=config["num_layers"], heads=config["num_attention_heads"],
            head_dim=config.get("attention_head_dim", HEAD_DIM), ffn=config["ffn_dim"],
            text_dim=config.get("text_dim", 4096), freq_dim=config.get("freq_dim", 256), patch=int(patch[-1]),
            in_channels=config["in_channels"], out_channels=config.get("out_channels") or config["in_channels"],
        )

    @classmethod
    def named(cls, base_model: str) -> WanDims:
        """The released model of a base model name (wan2.1-1.3b, wan2.1-14b, wan2.2-a14b, wan2.2-5b)."""
        if base_model not in SIZE_OF:
            raise ValueError(f"no Wan size for {base_model!r}; expected one of {sorted(SIZE_OF)}")
        return cls.from_config(SIZES[SIZE_OF[base_model]])

    # -- parameters ----------------------------------------------------------------------------
    def block_linears(self, i: int) -> list[tuple[str, int, int, bool]]:
        d = self.d
        out = [(f"{a}.{n}", d, d, True) for a in ("attn1", "attn2") for n in ("to_q", "to_k", "to_v", "to_out.0")]
        return out + [("ffn.net.0.proj", d, self.f, True), ("ffn.net.2", self.f, d, True)]

    def outer_linears(self) -> list[tuple[str, int, int, bool]]:
        d = self.d
        return [
            ("condition_embedder.text_embedder.linear_1", self.text_dim, d, True),
            ("condition_embedder.text_embedder.linear_2", d, d, True),
            ("condition_embedder.time_proj", d, 6 * d, True),
            ("proj_out", d, self.out_channels * self.patch**2, True),
        ]

    def other_params(self) -> int:
        """Norm weights and modulation tables, the patch convolution."""
        d = self.d
        per_block = 4 * d + 2 * d + 6 * d  # q/k RMSNorms of both attentions, norm2's affine, scale_shift_table
        conv = self.in_channels * self.patch**2 * d + d
        rope = 2 * 1024 * self.head_dim  # RoPE's cos / sin tables (rope_max_seq_len 1024)
        time_embedder = self.freq_dim * d + d + d * d + d  # its Linears keep the compute dtype (never fp8)
        return self.layers * per_block + conv + 2 * d + rope + time_embedder

    def lora_block_params(self, rank: int, subs: tuple[str, ...] | None = None) -> list[int]:
        """LoRA parameters of each block: every adapter of the default placement sits on a d x d
        projection (relation 4, subjects 2 each, shared 2)."""
        modules = 4 + 2 + 2 + 2
        return [modules * rank * 2 * self.d] * self.layers

    def lora_params(self, rank: int) -> int:
        return sum(self.lora_block_params(rank))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, h, w) of this model's latents (Wan 2.1 VAE 8x, Wan 2.2 VAE 16x in space; 4k + 1 frames)."""
        from ...base_models import get_spec
        from ...errors import TrainingError

        spec = get_spec("wan2.2-5b" if self.out_channels == 48 else "wan2.1")
        try:
            spec.check_training_size((height, width))
            return spec.latent_frame_count(frames), *spec.latent_grid((height, width))
        except ValueError as e:  # DatasetError is a ValueError too
            raise TrainingError(str(e)) from None

    # -- activations (bytes; see the module docstring) -----------------------------------------
    def block_saved(self, i: int, n: int, l: int) -> tuple[int, int]:
        d, h = self.d, self.heads
        video = 3 * 4 * d + 7 * 2 * d + 2 * 2 * self.f
        text = 4 * d
        attention = n * (8 * d + 4 * h) + n * (4 * d + 4 * h) + l * 4 * d
        return n * video + l * text, attention

    def shared_activations(self, n: int, l: int) -> int:
        return l * 2 * self.d + 2 * n * self.head_dim * 2
