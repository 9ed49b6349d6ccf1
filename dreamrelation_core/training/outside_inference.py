"""Training must work when its caller runs under `torch.inference_mode()`.

ComfyUI runs every node inside `torch.inference_mode()`. Tensors made there are "inference
tensors": autograd cannot record operations on them or save them for backward, and ops run in
that mode produce outputs without a grad_fn ("element 0 of tensors does not require grad"). The
trainer therefore leaves inference mode itself (`torch.inference_mode(False)` also turns grad
mode on) and swaps every inference tensor it is handed - model weights and buffers, clip
tensors - for a normal copy. Normal tensors are passed through untouched, so outside ComfyUI
nothing is copied.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch

T = TypeVar("T")


def is_inference(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_inference()


@torch.inference_mode(False)
def make_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place, every inference-tensor parameter and buffer of `model` by a normal copy.

    Frozen base weights need this too: autograd saves them for the backward pass of the LoRA
    layers. The parameters are new objects (swapping `.data` would keep the inference tensor's
    version counter, which autograd cannot use), so call this before handing them to an optimizer."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_inference():
                module._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_inference():
                module._buffers[name] = b.clone()
    return model


@torch.inference_mode(False)
def without_inference_tensors(obj: T) -> T:
    """A shallow copy of `obj` whose inference-tensor attributes are normal copies (or `obj`
    itself when it holds none), e.g. a PreparedClip loaded inside a ComfyUI node."""
    attrs = getattr(obj, "__dict__", None)
    if not attrs or not any(is_inference(v) for v in attrs.values()):
        return obj
    out = copy.copy(obj)
    for name, value in attrs.items():
        if is_inference(value):
            setattr(out, name, value.clone())
    return out


@torch.inference_mode(False)
def normal_tree(obj: T) -> T:
    """Dicts / lists / tuples of tensors (a checkpoint's state) with inference tensors copied."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return type(obj)((k, normal_tree(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(normal_tree(v) for v in obj)
    return obj
