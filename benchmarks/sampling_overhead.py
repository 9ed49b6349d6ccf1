"""Sampling-step cost of the relation LoRA on the real ComfyUI's Mochi (CPU, random weights).

Median time of one sampling step (CFG: conditional + unconditional pass) with
  base     : the Mochi as loaded,
  loader   : + DreamRelation Relation LoRA Loader (patches merged into the weights),
  patch    : + Sampler Patch, "cond only" over the whole range (low-rank correction
             hooks run on the unconditional half of every step: the patch's worst case),
  attention: + attention recording of two prompt words (loader defaults otherwise),
all in one process, rounds interleaved so drift hits every variant alike. Prints the ratios.

The patch's cost is the rank-r correction beside each patched Linear: about r·(in + out) against
in·out multiply-adds, so it shrinks with the width. The README's two rows (2 shared CPU cores, so
each step is timed by the process's CPU time on one thread: the work done, not the waits):
  python benchmarks/sampling_overhead.py --threads 1 --clock cpu --frames 7 --steps 3 --rounds 9
      width 512, 4 blocks: rank 16 is 3 % of the width (six times Mochi's share)
  python benchmarks/sampling_overhead.py --width 3072 --depth 2 --threads 1 --clock cpu --frames 7 --steps 3 --rounds 3
      Mochi's own width (text stream 1536, 24 heads), 2 of its 48 blocks: ~4 GB RSS in fp32, ~8 min
Without --threads / --clock: every core, wall time (a dedicated machine). `--dtype bf16` keeps the
weights in bf16, as ComfyUI runs Mochi on a GPU. Set COMFYUI_DIR=/path/to/ComfyUI, or run it
inside ComfyUI/custom_nodes.
It re-runs itself under `python -O`: a Mochi with the real feed-forward ratio (4) at a small
width trips ComfyUI's assert on hidden_size_x * mlp_ratio_x (see fixtures/comfy_mochi.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup() -> None:
    sys.path.insert(0, str(ROOT))  # dreamrelation_core and fixtures (tiny models)
    from fixtures.comfyui import import_comfyui  # the same in-process recipe the tests use

    import_comfyui()


MOCHI_WIDTH = 3072  # hidden_size_x of Mochi 1 (text stream 1536, 24 heads of 128)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build(depth: int, width: int, dtype: str = "fp32", seed: int = 0):
    import torch

    from fixtures import comfy_mochi as cm

    cfg = cm.base_unet_config(depth, hidden_x=width, hidden_y=width // 2, heads=width // 128, mlp_ratio_x=4.0)
    cfg["t5_feat_dim"] = 256
    cm.TEXT_DIM = 256
    dt = getattr(torch, DTYPES[dtype])
    return cfg, cm.build_comfy_mochi(cfg, cm.random_genmo_weights(cfg, seed, dtype=dt), dtype=dt)


def relation_lora(cfg: dict, rank: int = 16):
    """A random full triplet at the model's widths (subject LoRAs included; the loader drops them)."""
    from fixtures.loras import random_lora_set

    return random_lora_set(cfg["depth"], cfg["hidden_size_x"], cfg["hidden_size_y"], rank=rank, gain=0.1)


def step_times(model, latent, positive, negative, steps: int, clock=time.perf_counter) -> list[float]:
    """Per-step times of a stock sampler run (euler, ComfyUI's own schedule for the model), by `clock`."""
    import comfy.sample
    import comfy.samplers
    import torch

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    stamps: list[float] = []
    t0 = clock()
    comfy.sample.sample_custom(model, torch.randn_like(latent), 4.0, comfy.samplers.sampler_object("euler"), sigmas,
                               positive, negative, latent, callback=lambda *a: stamps.append(clock()),
                               disable_pbar=True, seed=0)
    edges = [t0] + stamps
    return [b - a for a, b in zip(edges, edges[1:])][1:]  # first step also loads / merges: left out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--frames", type=int, default=13, help="video frames (latent frames = 1 + (F-1)/6)")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width-px", type=int, default=224)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (DreamRelation trains 16)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights' dtype (ComfyUI's inference dtype)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the process's CPU time per step; with --threads 1 it counts the work done, "
                         "not the time other processes on a shared machine took")
    args = ap.parse_args()
    _setup()
    import folder_paths
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    from dreamrelation_core.lora import files as lora_files
    from fixtures import comfy_mochi as cm
    from fixtures.comfy_nodes import node_classes, run_node
    from fixtures.comfyui import load_pack

    cfg, base = build(args.depth, args.width, args.dtype)
    pack = load_pack()
    nodes = node_classes(pack)
    with tempfile.TemporaryDirectory() as d:
        folder_paths.add_model_folder_path("loras", d, is_default=True)
        lora_files.save_triplet(Path(d) / "bench.safetensors", relation_lora(cfg, args.rank))
        loaded, _ = run_node(nodes["DreamRelationRelationLoraLoader"], model=base, lora_name="bench.safetensors",
                             strength=1.0).outputs
    patch = dict(strength=1.0, start_percent=0.0, end_percent=1.0)
    cond_only, _ = run_node(nodes["DreamRelationMochiSamplerPatch"], model=loaded, apply_to="cond only",
                            attention_words="", **patch).outputs
    recording, rec = run_node(nodes["DreamRelationMochiSamplerPatch"], model=loaded, apply_to="cond and uncond",
                              attention_words="#1, #3", **patch).outputs

    t_lat = 1 + (args.frames - 1) // 6
    latent = torch.zeros(1, 12, t_lat, args.height // 8, args.width_px // 8)
    g = torch.Generator().manual_seed(0)
    text = lambda n: [[torch.randn(1, cm.TEXT_LEN, cfg["t5_feat_dim"], generator=g),  # noqa: E731
                       {"attention_mask": (torch.arange(cm.TEXT_LEN) < n).long()[None]}]]
    pos, neg = text(8), text(3)
    variants = {"base": base, "loader": loaded, "patch": cond_only, "attention": recording}
    times: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    for m in variants.values():  # warm-up: allocator, thread pools, first merge
        step_times(m, latent, pos, neg, 2, clock)
    # Short runs, variants interleaved, ratios paired per round: on a shared CPU the machine's
    # speed drifts by several x over minutes, which a per-round ratio cancels.
    for _ in range(args.rounds):
        per = {name: statistics.median(step_times(m, latent, pos, neg, args.steps, clock)) for name, m in variants.items()}
        for name in variants:
            times[name].append(per[name])
            ratios[name].append(per[name] / per["base"])
    tokens = t_lat * (args.height // 16) * (args.width_px // 16)
    print(f"Mochi on ComfyUI {os.environ.get('COMFYUI_DIR', '')}: {args.depth} blocks, width {args.width}, "
          f"{args.dtype}, rank {args.rank}, {tokens} video tokens, CFG (2 passes), torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps - 1} timed steps per variant, {args.clock} clock")
    # at Mochi's width the correction is 6x cheaper relative to the layer than at 512
    targets = {"loader": 1.01, "patch": 1.02 if args.width >= MOCHI_WIDTH else 1.05, "attention": 1.5}
    for name in variants:
        target = f"  (target <= {targets[name]})" if name in targets else ""
        print(f"  {name:10s} median step {statistics.median(times[name]) * 1000:8.1f} ms   "
              f"median paired ratio {statistics.median(ratios[name]):5.3f}{target}")
    print(f"  attention recorded: {rec.count} block calls, map grid {tuple(rec.maps().shape)}")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    if __debug__ and os.environ.get("DR_BENCH_NO_REEXEC") != "1":
        os.execv(sys.executable, [sys.executable, "-O", *sys.argv])
    main()
