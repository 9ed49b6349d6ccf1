"""Frozen base Linears stored in fp8 (or bf16/fp32) and upcast per layer for the matmul.

Shared by the base models (floor 1: Mochi and Wan both load ComfyUI's scaled fp8 files). The
frozen Mochi weights are ~10 B parameters: 18.6 GiB in bf16, 9.3 GiB in fp8. `FrozenLinear`
keeps its weight in the storage dtype and converts it to the compute dtype only for the duration
of one matmul (bf16 on CUDA, fp32 on the CPU), so at most one layer's upcast copy exists at a
time; the per-tensor scale is folded into that copy (no output-sized temporary). It is an
`nn.Linear` subclass, so peft wraps it in a LoRA layer as usual (peft's
`lora.Linear` calls `base_layer(x)`, then adds the LoRA term); its `compute_dtype` tells peft to
create the LoRA weights on top in fp32.

Its autograd function saves nothing: the weight is frozen, so the backward needs only the weight,
which it fetches again from the module at backward time. That is what lets block swap (see
`training/memory/swap.py`) point the weight at a reused GPU buffer between forward and backward.

Scaled fp8 files (ComfyUI's `mochi_preview_fp8_scaled.safetensors`,
`wan2.1_t2v_14B_fp8_scaled.safetensors`, ...): a `scaled_fp8` marker key;
every quantised Linear has `<module>.weight` in fp8 e4m3fn and `<module>.scale_weight` (fp32
scalar); the real weight is `weight.float() * scale_weight`. `<module>.scale_input` (a scale for
fp8 *activations*, used by fp8 matmul kernels) does not apply here: activations stay bf16/fp32.
See docs/method.md ("Training memory").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFileError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MARKER = "scaled_fp8"
SCALE_KEYS = (MARKER, "scale_weight", "scale_input")  # last parts of keys that are not weights


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


class _FrozenLinearFn(torch.autograd.Function):
    """y = x @ (W * scale)^T + b with W fetched from the module now and again in backward.

    Memory (docs/method.md "Training memory"): besides its output, forward makes one temporary,
    the upcast weight (the scale is folded into it in place, the bias added by the matmul's own
    epilogue); backward the same upcast weight and the input gradient. No output-sized copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: FrozenLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.module, ctx.dtype, ctx.x_dtype = module, dtype, x.dtype
        return module.linear(x, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.module.compute_weight(ctx.dtype, scaled=True)  # [out, in]
        dx = grad.to(ctx.dtype) @ w  # [..., in]
        del w
        return dx.to(ctx.x_dtype), None, None


class FrozenLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight may be stored in fp8 with a per-tensor scale.

    `matmul_dtype`: compute dtype; None follows autocast (its dtype when enabled) or the input.
    """

    compute_dtype = torch.float32  # read by peft: dtype of the LoRA weights it adds on top

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.register_buffer("scale_weight", None if scale is None else scale.detach().float().reshape(()))
        self.matmul_dtype: torch.dtype | None = None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> FrozenLinear:
        """A FrozenLinear of the real weight `w`, stored in `dtype` (None: as it is; fp8: per-tensor
        scale = amax / fp8 max)."""
        w = w.detach()
        b = None if bias is None else bias.detach()
        if dtype is None or dtype == w.dtype:
            return cls(w, b)
        if is_fp8(dtype):
            q, scale = quantize_fp8(w, dtype)
            return cls(q, b, scale)
        return cls(w.to(dtype), b)

    def compute_weight(self, dtype: torch.dtype, scaled: bool = False) -> torch.Tensor:
        """The stored weight in `dtype` (fp8 -> bf16 is exact); `scaled`: times its scale, folded
        in place into the upcast copy (the product is formed in fp32 and rounded once)."""
        w = self.weight.to(dtype)
        if scaled and self.scale_weight is not None:
            if self.weight.dtype == dtype:  # no upcast happened: never scale the stored weight
                w = w.clone()
            w.mul_(self.scale_weight)
        return w

    def linear(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.compute_weight(dtype, scaled=True), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.matmul_dtype
        if dtype is None:
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) else x.dtype
        return _FrozenLinearFn.apply(x, self, dtype)

    def dequantized(self) -> torch.Tensor:
        """The real weight in fp32 (weight * scale)."""
        w = self.weight.float()
        return w * self.scale_weight if self.scale_weight is not None else w

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return s + f", storage={str(self.weight.dtype).replace('torch.', '')}" + (", scaled" if self.scale_weight is not None else "")


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale) with the tensor's absolute maximum mapped to the fp8 maximum."""
    amax = w.detach().abs().max().float()
    scale = torch.where(amax > 0, amax / FP8_MAX[dtype], torch.ones_like(amax))
    return (w.float() / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale


def dequantize_outside_linears(state_dict: dict[str, torch.Tensor], model: nn.Module,
                               module_scales: dict[str, torch.Tensor]) -> None:
    """In place: fp8 tensors of `state_dict` that are not a Linear weight of `model` (a norm, an
    embedding stored in fp8 by a scaled file) become float32 times their module's scale (1 where
    the file gives none); that scale is taken out of `module_scales`. fp8 stays for Linears only."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for k in list(state_dict):
        t, module = state_dict[k], k.rpartition(".")[0]
        if is_fp8(t.dtype) and not (k.endswith(".weight") and module in linears):
            scale = module_scales.pop(module, None)
            state_dict[k] = t.float() * (scale if scale is not None else 1.0)


def frozen_linears(model: nn.Module) -> Iterator[tuple[str, FrozenLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, FrozenLinear):
            yield name, m


def freeze_linears(model: nn.Module, dtype: torch.dtype | None = None, keep: tuple[str, ...] = ()) -> nn.Module:
    """Make every Linear of `model` a `FrozenLinear` whose weight is stored in `dtype`, in place.

    None keeps each weight's dtype. Existing FrozenLinears are re-stored when their dtype differs
    (fp8 -> bf16 dequantises with the scale; bf16 -> fp8 quantises per tensor). Call before
    adding LoRA adapters (peft then wraps the FrozenLinears). Linears under the module paths in
    `keep` keep a compute dtype (their bias's, an fp8 weight dequantised): models that cast their
    input to a module's parameter dtype (Wan's time embedder) need one.
    """
    # names only: holding the old modules until the loop ends would keep every weight in both
    # dtypes at once (bf16 -> fp8 of Mochi: 30 GB instead of 20 shrinking to 10)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, FrozenLinear)]
    for name in names:
        lin = model.get_submodule(name)
        if any(name == k or name.startswith(k + ".") for k in keep):
            if is_fp8(lin.weight.dtype):
                bias_dtype = lin.bias.dtype if lin.bias is not None else torch.bfloat16
                w = lin.dequantized() if getattr(lin, "scale_weight", None) is not None else lin.weight
                _set_module(model, name, FrozenLinear.from_weight(w.to(bias_dtype), lin.bias, None))
            continue
        if isinstance(lin, FrozenLinear):
            if dtype is None or lin.weight.dtype == dtype:
                continue
            new = FrozenLinear.from_weight(lin.dequantized() if lin.scale_weight is not None else lin.weight, lin.bias, dtype)
        else:
            new = FrozenLinear.from_weight(lin.weight, lin.bias, dtype)
        new.matmul_dtype = getattr(lin, "matmul_dtype", None)
        _set_module(model, name, new)
        del lin, new
    return model


def attach_scales(model: nn.Module, scales: Mapping[str, torch.Tensor], source: str = "model") -> nn.Module:
    """Turn the Linears named in `scales` ({module path: fp32 scale}), whose weights are fp8 as read
    from a scaled file, into scaled FrozenLinears, in place."""
    for path, scale in scales.items():
        try:
            lin = model.get_submodule(path)
        except AttributeError:
            raise ModelFileError(f"{source}: fp8 scale for {path!r}, which the model does not have") from None
        if not isinstance(lin, nn.Linear) or not is_fp8(lin.weight.dtype):
            raise ModelFileError(f"{source}: fp8 scale for {path!r}, which is not an fp8 Linear")
        _set_module(model, path, FrozenLinear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), scale))
    return model


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the frozen Linear weights as stored (fp8: 1 byte per weight)."""
    return sum(m.weight.numel() * m.weight.element_size() for _, m in frozen_linears(model))


# ---------------------------------------------------------------------------------------------
# scaled fp8 state dicts


def split_scales(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> tuple[dict, dict, torch.dtype | None]:
    """(weights, {weight key: fp32 scale}, fp8 dtype or None) of a possibly scaled fp8 state dict.

    The `scaled_fp8` marker and `.scale_input` keys are removed; each `X.scale_weight` becomes
    the scale of `X.weight`, which must exist and be fp8 (a scale without its fp8 weight is an
    error: silently dropping it would give weights off by that factor).
    """
    weights, scales, fp8 = {}, {}, None
    for k, v in state_dict.items():
        name = k.rsplit(".", 1)[-1]
        if name == MARKER:
            fp8 = torch.float8_e4m3fn if v.dtype == torch.float32 else v.dtype
        elif name == "scale_input":
            continue
        elif name == "scale_weight":
            wk = k[: -len("scale_weight")] + "weight"
            if wk not in state_dict:
                raise ModelFileError(f"{source}: {k} has no weight {wk}")
            if not is_fp8(state_dict[wk].dtype):
                raise ModelFileError(f"{source}: {k} scales {wk}, which is {state_dict[wk].dtype}, not fp8")
            if v.numel() != 1:
                raise ModelFileError(f"{source}: {k} has shape {tuple(v.shape)}, expected a scalar (one scale per tensor)")
            scales[wk] = v.detach().float().reshape(())
        else:
            weights[k] = v
    if scales and fp8 is None:
        fp8 = next(iter(weights[k].dtype for k in scales))
    return weights, scales, fp8


def convert_scales(
    weights: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Carry per-tensor scales through a key converter: {converted module path: scale}.

    The converter splits fused weights on rows (qkv -> q, k, v) and swaps row halves; a stand-in
    per weight of one value per row (its scale, NaN where unscaled) goes through the same
    converter, so every part of a fused weight gets the scale of the whole."""
    probe = {}
    for k, v in weights.items():
        rows = v.shape[0] if v.ndim else 1
        probe[k] = torch.full((rows,), float(scales[k]) if k in scales else float("nan"))
    out = {}
    for k, v in convert(probe).items():
        if k.endswith(".weight") and not torch.isnan(v).any():
            out[k[: -len(".weight")]] = torch.tensor(float(v[0]), dtype=torch.float32)
    return out
