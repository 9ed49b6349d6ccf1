"""Training step cost of the DreamRelation parts, measured against a plain LoRA in one process.

(a) one plain LoRA (rank r) on every joint-attention Q/K/V/out projection, plain flow-matching MSE;
(b) the Relation LoRA triplet with hybrid mask training (branch draw, adapter switch, masked loss);
(c) (b) + the relational contrastive loss with its memory banks.
The model is big enough that it, not Python, dominates (default: 4 blocks, width 256, a 25-frame
128x128 clip = 5x8x8 = 320 video tokens). Rounds alternate a, b, c so drift hits all three alike.
Prints median step times, the ratios b/a and c/a, and peak RSS growth during each variant.

    python benchmarks/train_step.py [--layers 4] [--width 256] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from dreamrelation_core.data.cache import PreparedClip  # noqa: E402
from dreamrelation_core.lora.layout import target_modules  # noqa: E402
from dreamrelation_core.mochi.latents import diffusers_timestep  # noqa: E402
from dreamrelation_core.mochi.tiny import tiny_transformer  # noqa: E402
from dreamrelation_core.training.config import TrainConfig  # noqa: E402
from dreamrelation_core.training.flow import noisy  # noqa: E402
from dreamrelation_core.training.trainer import Trainer  # noqa: E402


def rss_kb(field: str = "VmHWM") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def make_clip(frames: int, size: int, text_dim: int, seed: int) -> PreparedClip:
    g = torch.Generator().manual_seed(seed)
    t, h = 1 + (frames - 1) // 6, size // 8
    m1 = torch.zeros(t, h, h)
    m1[:, h // 4: h // 2, h // 4: h // 2] = 1
    m2 = torch.zeros(t, h, h)
    m2[:, h // 2: 3 * h // 4, h // 2: 3 * h // 4] = 1
    return PreparedClip(
        name=f"bench{seed}", caption="", mean=torch.randn(12, t, h, h, generator=g), logvar=torch.full((12, t, h, h), -4.0),
        y_feat=torch.randn(16, text_dim, generator=g), y_mask=torch.ones(16, dtype=torch.bool), mask1=m1, mask2=m2,
    )


class PlainLoRA:
    """Baseline: one peft adapter on the same modules, plain MSE, same data draws."""

    def __init__(self, model, clips, rank: int, lr: float):
        from peft import LoraConfig

        modules = sorted({p for a in ("relation", "subject1", "subject2", "ffn") for p in target_modules(a, len(model.transformer_blocks))})
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules), adapter_name="plain")
        self.model, self.clips = model.train(), clips
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
        self.rng = torch.Generator().manual_seed(0)

    def train_step(self) -> None:
        c = self.clips[int(torch.randint(len(self.clips), (1,), generator=self.rng))]
        z = c.sample_latents(self.rng)[None]
        eps = torch.randn(z.shape, generator=self.rng)
        sigma = torch.rand(1, generator=self.rng)
        x, u = noisy(z, eps, sigma)
        pred = self.model(hidden_states=x, encoder_hidden_states=c.y_feat[None], timestep=diffusers_timestep(sigma),
                          encoder_attention_mask=c.y_mask[None], return_dict=False)[0]
        torch.nn.functional.mse_loss(pred, u).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256, help="visual width = heads x 64")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = args.width // 64
    tiny = dict(num_layers=args.layers, heads=heads, head_dim=64, text_dim=256, text_hidden=args.width // 2)
    clips = [make_clip(args.frames, args.size, 256, s) for s in range(3)]

    def trainer(rcl: float) -> Trainer:
        cfg = TrainConfig(num_steps=10**6, warmup_steps=0, rank=args.rank, alpha=args.rank, rcl_weight=rcl,
                          output_dir="/tmp/dreamrelation-bench", device="cpu", extra={"tiny": tiny})
        return Trainer(cfg, clips=clips, model=tiny_transformer(**tiny))

    variants = {
        "a plain LoRA": PlainLoRA(tiny_transformer(**tiny), clips, args.rank, 2e-4),
        "b triplet + HMT": trainer(0.0),
        "c HMT + RCL": trainer(0.01),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, int] = {k: 0 for k in variants}
    for v in variants.values():  # warm-up: allocator, autograd graph caches, RCL bank filled
        for _ in range(3):
            v.train_step()
    for _ in range(args.rounds):
        for name, v in variants.items():
            base = rss_kb("VmRSS")
            reset_peak()
            for _ in range(args.steps):
                t0 = time.perf_counter()
                v.train_step()
                times[name].append(time.perf_counter() - t0)
            peak[name] = max(peak[name], rss_kb("VmHWM") - base)
    tokens = (1 + (args.frames - 1) // 6) * (args.size // 16) ** 2
    print(f"model: {args.layers} blocks, width {args.width}, {tokens} video tokens ({args.frames} frames {args.size}x{args.size}), "
          f"rank {args.rank}, torch threads {torch.get_num_threads()}, {args.rounds}x{args.steps} steps each")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in variants:
        print(f"  {k:16s} median {med[k] * 1000:8.1f} ms/step   peak RSS growth during steps {peak[k] / 1024:7.1f} MiB")
    a = med["a plain LoRA"]
    print(f"b/a = {med['b triplet + HMT'] / a:.3f}")
    print(f"c/a = {med['c HMT + RCL'] / a:.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
