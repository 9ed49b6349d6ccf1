"""Mochi's joint attention with the valid text tokens found once per step, not in every block.

diffusers' Mochi attention drops the padded text tokens of each clip before attention (it joins
the clip's N video tokens with its valid text tokens, attends, and pads the result back to N + L).
It finds the valid tokens with `torch.nonzero` on the text mask in every block, forward and
gradient-checkpointing recompute: each call waits for the GPU (the host must know how many there
are), about 96 waits per training step on the 48-block Mochi. The mask is one tensor for the whole
step, so `MochiJointAttention` keeps the indices of the last mask it saw (by identity and
version) and every block reuses them: one wait per clip and step. The computation is otherwise
the same, with the same outputs (tested against diffusers' processor). See docs/method.md
"Training memory".
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


class TextCompaction:
    """The positions of the valid text tokens of each clip of a [B, L] bool mask, computed once per
    mask tensor (a new tensor, or the same one changed in place, is computed again)."""

    def __init__(self) -> None:
        self._mask: weakref.ref | None = None
        self._version = -1
        self._indices: list[torch.Tensor] = []
        self.computed = 0  # times the indices were computed (tests, logs)

    def indices(self, mask: torch.Tensor) -> list[torch.Tensor]:
        if self._mask is None or self._mask() is not mask or mask._version != self._version:
            self._indices = [torch.nonzero(mask[b].flatten(), as_tuple=False).flatten() for b in range(mask.shape[0])]
            self._mask, self._version = weakref.ref(mask), mask._version
            self.computed += 1
        return self._indices


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))  # [B, T, H*D] -> [B, T, H, D]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved (even, odd) channel pairs, in fp32, back to x's dtype."""
    a, b = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(a * cos - b * sin).to(x.dtype), (a * sin + b * cos).to(x.dtype)], dim=-1).flatten(-2)


class MochiJointAttention:
    """An attention processor for diffusers' `MochiAttention` (set on every block, one instance
    shared by all, so they share the `TextCompaction`)."""

    def __init__(self, compaction: TextCompaction | None = None) -> None:
        self.compaction = compaction or TextCompaction()

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        heads = attn.heads
        q, k, v = (_split_heads(f(hidden_states), heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (_split_heads(f(encoder_hidden_states), heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:  # video tokens only
            q, k = _rotate(q, *image_rotary_emb), _rotate(k, *image_rotary_emb)
        q, k, v, tq, tk, tv = (t.transpose(1, 2) for t in (q, k, v, tq, tk, tv))  # [B, H, T, D]
        n, total = q.shape[2], q.shape[2] + tq.shape[2]
        per_clip = []
        for b, keep in enumerate(self.compaction.indices(attention_mask)):
            joint = [torch.cat([x[b:b + 1], t[b:b + 1, :, keep, :]], dim=2) for x, t in ((q, tq), (k, tk), (v, tv))]
            out = F.scaled_dot_product_attention(*joint, dropout_p=0.0, is_causal=False)  # [1, H, n + valid, D]
            per_clip.append(F.pad(out, (0, 0, 0, total - out.shape[2])))
        out = torch.cat(per_clip, dim=0).transpose(1, 2).flatten(2, 3)  # [B, N + L, H*D]
        video, text = out.split_with_sizes((n, total - n), dim=1)
        video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


def install(model: nn.Module) -> MochiJointAttention:
    """Set one shared `MochiJointAttention` on every block of a MochiTransformer3DModel."""
    processor = MochiJointAttention()
    for block in model.transformer_blocks:
        block.attn1.processor = processor
    return processor
