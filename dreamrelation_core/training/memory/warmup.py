"""Before free GPU memory is read: one block's kernels and workspaces made (the allocator's
settings: training.allocator).

What the meta-device trace and the estimate cannot see is paid partly at the first kernel of each
kind: the cuBLAS / cuBLASLt handles and their workspaces, the attention kernel's workspace, the
autograd engine's device threads. Reading `mem_get_info` after one real block has run forward and
backward on the device (at a few tokens) counts those in the free memory the options are chosen
against (docs/method.md "Memory fallback").
"""

from __future__ import annotations

import copy

import torch


@torch.no_grad()
def _inputs(model: torch.nn.Module, device: torch.device, frames: int = 1, height: int = 2, width: int = 4):
    """Block inputs for a few tokens (frames x height x width patches, 2 text tokens)."""
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    n, text = frames * height * width, 2
    rope = model.rope(model.pos_frequencies.detach().to(device), frames, height, width, device=device,
                      dtype=torch.float32)  # (cos, sin) [n, heads, head_dim / 2]
    hidden = torch.randn(1, n, d, device=device)  # [1, n, d]
    context = torch.randn(1, text, cfg.pooled_projection_dim, device=device)  # [1, L, c]
    temb = torch.randn(1, d, device=device)  # [1, d]
    mask = torch.ones(1, text, dtype=torch.bool, device=device)  # [1, L]
    return hidden, context, temb, mask, rope


def warm_up_block(model: torch.nn.Module, device: torch.device | str, autocast: bool = True) -> None:
    """Run a copy of block 0 forward and backward on `device` at a few tokens (the trainer's
    autocast), then free the copy. `model` is not changed (its block stays where it is)."""
    device = torch.device(device)
    blocks = getattr(model, "transformer_blocks", None)
    if not blocks:
        return
    twin = copy.deepcopy(blocks[0]).to(device).requires_grad_(False)  # no weight gradients: memory
    try:
        hidden, context, temb, mask, rope = _inputs(model, device)
        hidden.requires_grad_(True)
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out, out_context = twin(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                    encoder_attention_mask=mask, image_rotary_emb=rope)
            loss = out.float().square().mean() + out_context.float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        del twin
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the copy's blocks go back; handles and workspaces stay
