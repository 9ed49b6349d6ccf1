"""Peak device memory of Prepare's video pass (Mochi's VAE encoder on one clip), without a GPU.

The full-size diffusers AutoencoderKLMochi (its default config: Mochi 1's VAE) encodes one clip of
FRAMES x HEIGHT x WIDTH on the meta device under `training.memory.trace.LiveBytes`, which follows
every storage the encode allocates: the peak of live bytes is what the GPU would hold for tensors
(weights, feature maps, the posterior). Settings: fp32 untiled (what Prepare did before), bf16
untiled, bf16 tiled (Prepare's default on a GPU). T5 is not on the device during this pass
(Prepare unloads it after the text pass), so the peak is the pass's whole need, plus the CUDA
context and the allocator's margin, which a meta trace cannot see.

    python benchmarks/prepare_memory.py [--frames 61] [--size 480x848]

Prints one line per setting with the peak in GiB and its ratio to the fp32 untiled peak.
Figures from the meta device, not from a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamrelation_core.training.memory.trace import GIB, LiveBytes, meta_patches  # noqa: E402


def encode_peak(frames: int, height: int, width: int, dtype: torch.dtype, tiled: bool) -> float:
    """GiB of live tensors at the peak of one encode (the encoder's weights included)."""
    import logging

    from diffusers import AutoencoderKLMochi

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # its note on .to(dtype) concerns loading

    with torch.device("meta"):
        vae = AutoencoderKLMochi()
    vae.decoder = torch.nn.Identity()  # Prepare's encoder holds no decoder (mochi.loading)
    vae = vae.to(dtype)
    counter = LiveBytes()
    with meta_patches(), torch.no_grad(), counter:
        for p in vae.parameters():
            counter.track(p, "weights")
        if tiled:
            vae.enable_tiling()
        x = torch.empty(1, 3, frames, height, width, device="meta", dtype=dtype)  # [1, 3, F, H, W]
        counter.track(x, "input")
        latent = vae.encode(x).latent_dist  # mean, logvar [1, 12, T, H/8, W/8]
        del latent
    counter.finish()
    return counter.peak / GIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--size", default="480x848", help="HEIGHTxWIDTH")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    base = None
    for label, dtype, tiled in (("fp32 untiled", torch.float32, False), ("bf16 untiled", torch.bfloat16, False),
                                ("bf16 tiled", torch.bfloat16, True)):
        t0 = time.perf_counter()
        peak = encode_peak(args.frames, height, width, dtype, tiled)
        base = base or peak
        print(f"{label:<13} {args.frames} frames {height}x{width}: peak {peak:6.2f} GiB "
              f"({peak / base:.2f} x fp32 untiled)  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
