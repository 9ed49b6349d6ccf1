"""Which scaled-dot-product-attention kernel the GPU will run for Mochi's attention, probed once at
start: the memory estimate depends on it (docs/method.md "Training memory": attention kernel).

flash (FlashAttention-2) and the memory-efficient kernel keep no S x S matrix; the math kernel
builds one per head (about 28 GiB in fp32 for one block at 61x480x848). torch's flash kernel needs
compute capability 8.0 or newer (Ampere) for fp16 and bf16; the memory-efficient kernel runs fp16
from 5.0 on but bf16 only from 8.0. So on a T4, an RTX 20xx or a Quadro RTX (7.5) bf16 attention
falls to the math kernel, and fp16 would get the memory-efficient one. `choose_kernel` holds that
rule for given capabilities (testable without a GPU); `probe` asks torch on the real device and
falls back to the rule.
"""

from __future__ import annotations

import torch

AMPERE = (8, 0)
EFFICIENT_FP16 = (5, 0)


def choose_kernel(
    capability: tuple[int, int], dtype: str = "bf16", flash_enabled: bool = True, efficient_enabled: bool = True,
) -> str:
    """'flash', 'efficient' or 'math' for a GPU of compute `capability` running attention in
    `dtype` ('bf16' or 'fp16'), with torch's SDPA backends enabled as given."""
    if dtype not in ("bf16", "fp16"):
        raise ValueError(f"attention dtype must be bf16 or fp16, got {dtype!r}")
    if flash_enabled and capability >= AMPERE:
        return "flash"
    if efficient_enabled and (capability >= AMPERE or (dtype == "fp16" and capability >= EFFICIENT_FP16)):
        return "efficient"
    return "math"


def probe(device: torch.device, dtype: torch.dtype = torch.bfloat16, heads: int = 24, head_dim: int = 128) -> str:
    """The kernel torch picks on `device` for [1, heads, S, head_dim] attention in `dtype` (CUDA
    only; 'flash' elsewhere, where the GPU estimate does not apply)."""
    if device.type != "cuda" or not torch.cuda.is_available():  # no GPU to ask (CPU runs, tests)
        return "flash"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "bf16")
    cap = torch.cuda.get_device_capability(device)
    b = torch.backends.cuda
    rule = choose_kernel(cap, name, b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled())
    try:
        q = torch.empty(1, heads, 64, head_dim, device=device, dtype=dtype)
        params = b.SDPAParams(q, q, q, None, 0.0, False, False)
        if b.flash_sdp_enabled() and b.can_use_flash_attention(params, False):
            return "flash"
        if b.mem_efficient_sdp_enabled() and b.can_use_efficient_attention(params, False):
            return "efficient"
        return "math"
    except Exception:  # an older / newer torch without this API: the rule
        return rule


def describe_cost(kernel: str, flash_peak_gib: float, peak_gib: float) -> str:
    """One line for the report when the kernel is not flash-like."""
    if kernel != "math":
        return f"attention kernel: {kernel}"
    return (f"attention kernel: math (this GPU has no flash or memory-efficient attention for bf16): its S x S "
            f"score matrices cost {peak_gib - flash_peak_gib:.2f} GiB more than a flash kernel would "
            f"({peak_gib:.2f} vs {flash_peak_gib:.2f} GiB); shorter or smaller clips shrink them quadratically")
