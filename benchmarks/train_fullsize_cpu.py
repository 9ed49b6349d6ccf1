"""Full-size Mochi (48 blocks, 3072/1536, 10 B parameters) trained on the CPU from an fp8 file
in ComfyUI's scaled-fp8 key layout, with every block swapped, within 16 GB of RSS.

1. Writes a random-weight Mochi DiT as `mochi_preview_fp8_scaled.safetensors` layout (genmo keys
   under `model.diffusion_model.`, every Linear weight e4m3 with a `scale_weight`, the
   `scaled_fp8` marker, the rest bf16), streamed tensor by tensor (~10 GB on disk, little RAM).
2. Trains 2 steps with the real trainer on a tiny clip (7 frames, 32x32, 16 text tokens):
   base_dtype auto (-> fp8, the file's), blocks_to_swap 48 (block weights in a CPU store, copied
   into the 'device' buffers before forward, recompute and backward), gradient checkpointing.
3. Prints the peak RSS (VmHWM), load and step times, the losses and how far the LoRA moved.

Measured on a shared 2-core machine, first (before the loader read the file into its own
memory): file written in 927 s; loaded and prepared in 102 s; steps of 626 s and 352 s (losses
46.2, 32.0; 94 block copies per step); peak RSS 16.42e9 bytes = 15.3 GiB, of which ~10.4 GB were
the weights file's pages mapped by safetensors and ~5.4 GB anonymous, 3.0 GB of it copies of the
SwiGLU input weights made by the genmo -> diffusers conversion.
Then, with the loader reading tensor by tensor into its own memory and swapping those halves in
place (`--steps 1`): file written in 380 s; loaded and prepared in 37 s (RSS 11.33e9 bytes); one
step of 480 s (loss 46.16, 94 block copies); peak RSS 13.39e9 bytes = 12.47 GiB, 12.56 GB of it
anonymous (the 9.93 GB swap store is the weights as read: no second copy).

Not for CI: ~10 GB of disk and ~10-30 minutes on two cores.

    python benchmarks/train_fullsize_cpu.py --dir /tmp/mochi_fp8 [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from dreamrelation_core.data.cache import PreparedClip  # noqa: E402
from dreamrelation_core.lora import peft_triplet as triplet  # noqa: E402
from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo  # noqa: E402
from dreamrelation_core.mochi.fp8 import quantize_fp8  # noqa: E402
from dreamrelation_core.training.config import TrainConfig  # noqa: E402
from dreamrelation_core.training.trainer import Trainer  # noqa: E402

GB = 1e9
ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}


def rss(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def comfy_layout(config: dict | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a Mochi DiT (default: full size) in ComfyUI's scaled-fp8 layout."""
    from diffusers import MochiTransformer3DModel

    with torch.device("meta"):
        model = MochiTransformer3DModel(**(config or {}))
    genmo = diffusers_to_genmo(model.state_dict(), prefix="model.diffusion_model.")
    out = {"model.diffusion_model.scaled_fp8": ((0,), torch.float8_e4m3fn)}
    for k, t in genmo.items():
        if k.endswith(".weight") and t.ndim == 2:
            out[k] = (tuple(t.shape), torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = ((), torch.float32)
        else:
            out[k] = (tuple(t.shape), torch.bfloat16)
    return out


def random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if key.endswith(".weight") and len(shape) == 2:
        return torch.randn(shape, generator=g) / math.sqrt(shape[1])
    if key.endswith(".weight") and len(shape) == 4:  # patch embedding conv
        return torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2] * shape[3])
    if key.endswith("norm_x.weight") or key.endswith("norm_y.weight"):
        return torch.ones(shape)
    if key.endswith("pos_frequencies"):
        return torch.randn(shape, generator=g) * 0.1
    return torch.zeros(shape)


def write_file(path: Path, seed: int = 0, config: dict | None = None) -> float:
    """Stream a random scaled-fp8 Mochi into `path` (safetensors format by hand: the header
    first, then each tensor as it is made). Returns GB written."""
    layout = comfy_layout(config)
    header, offset = {}, 0
    for k, (shape, dtype) in layout.items():
        n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[k] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "note": "random weights, DreamRelation benchmark"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(seed)
    scales: dict[str, torch.Tensor] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, (shape, dtype) in layout.items():
            if k.endswith("scaled_fp8"):
                continue
            if k.endswith("scale_weight"):
                t = scales.pop(k)
            elif dtype == torch.float8_e4m3fn:
                t, scales[k[: -len("weight")] + "scale_weight"] = quantize_fp8(random_tensor(k, shape, g))
                # the scale key comes right after its weight in `layout`
            else:
                t = random_tensor(k, shape, g).to(dtype)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return (len(blob) + 8 + offset) / GB


def tiny_clip(text_dim: int = 4096, text_len: int = 16) -> PreparedClip:
    g = torch.Generator().manual_seed(1)
    t, h, w = 2, 4, 4  # 7 frames at 32x32
    m1, m2 = torch.zeros(t, h, w), torch.zeros(t, h, w)
    m1[:, :2, :2], m2[:, 2:, 2:] = 1, 1
    return PreparedClip(name="tiny", caption="", mean=torch.randn(12, t, h, w, generator=g),
                        logvar=torch.full((12, t, h, w), -4.0), y_feat=torch.randn(text_len, text_dim, generator=g),
                        y_mask=torch.ones(text_len, dtype=torch.bool), mask1=m1, mask2=m2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/dreamrelation_fullsize")
    ap.add_argument("--keep", action="store_true", help="keep the 10 GB file (reused next time)")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mochi_preview_fp8_scaled.safetensors"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not path.exists():
        t0 = time.perf_counter()
        size = write_file(path)
        print(f"wrote {path} ({size:.2f} GB) in {time.perf_counter() - t0:.0f} s; peak RSS so far {rss():.2f} GB", flush=True)
    t0 = time.perf_counter()
    config = TrainConfig(
        transformer=str(path), output_dir=str(folder / "run"), num_steps=args.steps, warmup_steps=0, checkpoint_every=1000,
        device="cpu", blocks_to_swap=48, gradient_checkpointing=True, save_dtype="fp32", keep_checkpoints=1,
    )
    trainer = Trainer(config, clips=[tiny_clip()])
    print(f"{trainer.memory.summary()}; loaded and prepared in {time.perf_counter() - t0:.0f} s; "
          f"swap store {trainer.swap.store_bytes / GB:.2f} GB, buffers {trainer.swap.buffer_bytes / GB:.2f} GB; "
          f"RSS {rss('VmRSS'):.2f} GB (peak {rss():.2f} GB)", flush=True)
    before = {n: p.detach().clone() for n, p in triplet.lora_parameters(trainer.model)}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        branch, losses = trainer.train_step()
        print(f"step {trainer.step} ({branch}): total {losses['total']:.4f} mse {losses['mse']:.4f} "
              f"masked {losses['masked']:.4f}; {time.perf_counter() - t0:.0f} s; block copies so far {trainer.swap.copies}; "
              f"RSS {rss('VmRSS'):.2f} GB (peak {rss():.2f} GB)", flush=True)
    moved = sum(float((p.detach() - before[n]).abs().sum()) for n, p in triplet.lora_parameters(trainer.model))
    peak = rss() * GB / 2**30
    print(f"LoRA moved by {moved:.4g} (sum of |change|); peak RSS {rss():.2f} GB = {peak:.2f} GiB "
          f"({'within' if peak < 16 else 'OVER'} 16 GiB); now file-backed {rss('RssFile'):.2f} GB "
          f"(libraries; the weights file is read, not mapped), anonymous {rss('RssAnon'):.2f} GB")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
