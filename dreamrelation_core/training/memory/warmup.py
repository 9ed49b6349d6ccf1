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

from ...base_models import spec_of_model


def warm_up_block(model: torch.nn.Module, device: torch.device | str, autocast: bool = True) -> None:
    """Run a copy of block 0 forward and backward on `device` at a few tokens (the trainer's
    autocast), then free the copy. `model` is not changed (its block stays where it is)."""
    device = torch.device(device)
    spec = spec_of_model(model)
    blocks = spec.blocks(model)
    if not len(blocks):
        return
    twin = copy.deepcopy(blocks[0]).to(device).requires_grad_(False)  # no weight gradients: memory
    try:
        args, kwargs = spec.block_inputs(model, device)
        first = args[0] if args else kwargs["hidden_states"]
        first.requires_grad_(True)  # a backward through the block, as training runs it
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = twin(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)  # Mochi: (video, text); Wan: video
            loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        del twin
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the copy's blocks go back; handles and workspaces stay
