"""Data-parallel scaling: steps/s and samples/s of one run on 1 process vs. N processes (torchrun).

The same run (tiny Mochi-class model, same global batch, same seed) through the worker client the
ComfyUI node uses: once as one worker process, once under torchrun with N processes (each takes
batch / N clips of every step; the LoRA gradients are summed over processes). The timestamp of each
step is taken here when rank 0's step event arrives; the steady-state rate leaves out the first
`--warmup` steps and has no checkpoint inside the timed span. samples/s = steps/s x global batch.
Rounds alternate the order of the modes (drift in machine load hits both alike); medians over rounds
are compared, as a ratio N-process / 1-process (ideal: N for compute-bound steps; less where the
gradient all-reduce, the gathered contrastive features and the per-step stop agreement cost).

CPU rows: processes joined with gloo, `--threads` (default 1) CPU threads each - so N processes use
N cores where one process uses one. GPU rows: the same on CUDA with nccl, one process per GPU, when
this machine has at least 2 CUDA GPUs; skipped (said so, exit code 0) otherwise.

    python benchmarks/train_scaling.py [--nproc 2] [--steps 24] [--warmup 4] [--rounds 2] [--batch 4]
                                       [--layers 2] [--width 128] [--frames 13] [--size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from dreamrelation_core.data.cache import Encoders, prepare_dataset  # noqa: E402
from dreamrelation_core.data.synthetic import write_synthetic_dataset  # noqa: E402
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae  # noqa: E402
from dreamrelation_core.training.config import TrainConfig  # noqa: E402
from dreamrelation_core.training.launch import Launch  # noqa: E402
from dreamrelation_core.training.protocol import Event  # noqa: E402
from dreamrelation_core.training.worker_client import run_training_worker  # noqa: E402


def run(config: TrainConfig, nproc: int, env: dict[str, str]) -> list[float]:
    """Arrival times of rank 0's step events."""
    stamps: list[float] = []

    def on_event(ev) -> None:
        if ev.event == Event.STEP:
            stamps.append(time.perf_counter())

    run_training_worker(config, resume=False, on_event=on_event, env=env, launch=Launch(nproc=nproc))
    return stamps


def steady_rate(stamps: list[float], warmup: int) -> float:
    timed = stamps[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def scaling(label: str, make_config, nprocs: tuple[int, int], rounds: int, warmup: int, batch: int,
            env: dict[str, str]) -> None:
    rates: dict[int, list[float]] = {n: [] for n in nprocs}
    for r in range(rounds):
        order = list(nprocs) if r % 2 == 0 else list(reversed(nprocs))
        line = []
        for n in order:
            rates[n].append(steady_rate(run(make_config(f"{label}_{n}_{r}"), n, env), warmup))
            line.append(f"{n} process(es) {rates[n][-1]:.3f} steps/s")
        print(f"  {label} round {r + 1}: " + ", ".join(line), flush=True)
    one, many = nprocs
    med = {n: statistics.median(v) for n, v in rates.items()}
    per_round = [b / a for a, b in zip(rates[one], rates[many])]
    print(f"{label}: 1 process {med[one]:.3f} steps/s = {med[one] * batch:.2f} samples/s; "
          f"{many} processes {med[many]:.3f} steps/s = {med[many] * batch:.2f} samples/s; "
          f"ratio {many}/1 = {med[many] / med[one]:.3f} (ideal {many}; per round "
          f"{', '.join(f'{x:.3f}' for x in per_round)})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes of the parallel mode (CPU rows)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the steady-state rate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="global batch per step (a multiple of every nproc)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128, help="heads x head_dim of the tiny transformer (2 heads)")
    ap.add_argument("--frames", type=int, default=13)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--no-cpu", action="store_true", help="GPU rows only")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    root = Path(tempfile.mkdtemp(prefix="dr_scaling_bench_"))
    data = write_synthetic_dataset(root / "data", num_videos=4, num_frames=args.frames, size=(args.size, args.size))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)),
                    args.frames, (args.size, args.size), max_text_len=16)
    tiny = {"num_layers": args.layers, "heads": 2, "head_dim": args.width // 2}

    def maker(device: str):
        def config(name: str) -> TrainConfig:
            return TrainConfig(cache_dir=str(root / "cache"), output_dir=str(root / name), num_steps=args.steps,
                               warmup_steps=2, checkpoint_every=10 * args.steps, rank=4, alpha=4.0, device=device,
                               batch_size=args.batch, save_dtype="fp32", keep_checkpoints=1, extra={"tiny": tiny})
        return config

    print(f"tiny run: {args.layers} layers, width {args.width}, {args.frames} frames at {args.size}x{args.size}, "
          f"global batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds, "
          "order alternating", flush=True)
    if not args.no_cpu:
        if args.batch % args.nproc:
            print(f"--batch {args.batch} is not a multiple of --nproc {args.nproc}")
            return 2
        print(f"CPU (gloo, {args.threads} thread(s) per process; {os.cpu_count()} cores on this machine):")
        scaling("cpu", maker("cpu"), (1, args.nproc), args.rounds, args.warmup, args.batch, env)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        print(f"GPU rows skipped: {gpus} CUDA GPU(s) here, 2 or more needed (no GPU figure measured)")
        return 0
    n = max(d for d in range(2, gpus + 1) if args.batch % d == 0) if any(args.batch % d == 0
                                                                        for d in range(2, gpus + 1)) else 0
    if not n:
        print(f"GPU rows skipped: --batch {args.batch} cannot be shared by 2..{gpus} GPUs")
        return 0
    print(f"GPU (nccl, {torch.cuda.get_device_name(0)} x {gpus}):")
    scaling("cuda", maker("cuda"), (1, n), args.rounds, args.warmup, args.batch, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
