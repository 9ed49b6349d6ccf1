"""Cost of training in a worker process: the same tiny run in-process vs. through the worker.

In-process: `training.runs.execute` in this process, a progress callback taking a timestamp per
step. Worker: `training.worker_client.run_training_worker` (a `python -m
dreamrelation_core.training.worker` subprocess), the timestamp taken here when each step's JSON line arrives - so
the worker's figure includes the channel (JSON encoding, pipe, parsing, the reader thread).

Steady state: steps after the first `--warmup` steps, rate = steps / seconds between step
timestamps; no checkpoints inside the timed span (checkpoint_every > steps). Because the two modes
run one after the other, a change in machine load between them shows up in the rate ratio; the
"outside the step" figure is immune to that: per step, the time between two step timestamps less
the step's own compute time (measured inside the trainer), i.e. what the loop, the callback and -
for the worker - the channel add to each step. Start-up: from the
call to the first step's timestamp, less that step's own compute time (worker: interpreter start,
imports, model build; in-process: model build only). Rounds alternate the order of the two modes
so that drift in machine load hits both alike; medians over rounds are compared.

A last figure needs no model: the CPU cost of one step event through the channel itself (the
worker's JSON encoding and pipe write, the parent's read, parse and queue), measured on a real
pipe in this process - the share of a step it represents is the channel's overhead bound.

    python benchmarks/worker_overhead.py [--steps 40] [--rounds 5] [--layers 2] [--width 64] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from dreamrelation_core.data.cache import Encoders, prepare_dataset  # noqa: E402
from dreamrelation_core.data.synthetic import write_synthetic_dataset  # noqa: E402
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae  # noqa: E402
from dreamrelation_core.training.config import TrainConfig  # noqa: E402
from dreamrelation_core.training.runs import execute, plan_run  # noqa: E402
from dreamrelation_core.training.worker import Channel  # noqa: E402
from dreamrelation_core.training.worker_client import WorkerEvent, run_training_worker  # noqa: E402

ENV: dict[str, str] | None = None  # the worker's environment (thread count), set in main


def channel_cost(n: int = 5000) -> float:
    """Seconds of CPU per step event: encode + write on one side, read + parse + queue on the other."""
    r, w = os.pipe()
    channel = Channel(os.fdopen(w, "w", encoding="utf-8", newline="\n"))
    events: queue.Queue = queue.Queue()

    def read() -> None:
        with os.fdopen(r, "r", encoding="utf-8") as f:
            for line in f:
                events.put(WorkerEvent.parse(line))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    losses = {"total": 27.26859, "mse": 2.834226, "masked": 0.487330, "rcl": 6.785480}
    c0 = time.process_time()
    for i in range(n):
        channel.emit("step", step=i + 1, total=n, branch="relation", losses=losses, lr=1.7e-4, step_s=0.42,
                     it_s=2.38, eta_s=812.5)
    channel.stream.close()
    t.join()
    assert events.qsize() == n
    return (time.process_time() - c0) / n


def steady_rate(stamps: list[float], warmup: int) -> float:
    """Steps per second between the timestamps of steps warmup+1 .. last."""
    span = stamps[warmup:]
    return (len(span) - 1) / (span[-1] - span[0])


def run_inprocess(config: TrainConfig) -> tuple[list[float], list[float], float]:
    stamps, compute = [], []
    t0 = time.perf_counter()

    def progress(info) -> None:
        stamps.append(time.perf_counter())
        compute.append(info.step_time)

    execute(plan_run(config, resume=False), progress=progress)
    return stamps, compute, t0


def run_worker(config: TrainConfig) -> tuple[list[float], list[float], float]:
    stamps, compute = [], []
    t0 = time.perf_counter()

    def on_event(ev) -> None:
        if ev.event == "step":
            stamps.append(time.perf_counter())
            compute.append(ev.step_s)

    run_training_worker(config, resume=False, on_event=on_event, poll_s=0.05, env=ENV)
    return stamps, compute, t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the steady-state rate")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64, help="heads x head_dim of the tiny transformer (2 heads)")
    ap.add_argument("--frames", type=int, default=13)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in both modes (0: torch's default)")
    args = ap.parse_args()
    global ENV
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        ENV = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    root = Path(tempfile.mkdtemp(prefix="dr_worker_bench_"))
    data = write_synthetic_dataset(root / "data", num_videos=2, num_frames=args.frames, size=(args.size, args.size))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), args.frames,
                    (args.size, args.size), max_text_len=16)
    tiny = {"num_layers": args.layers, "heads": 2, "head_dim": args.width // 2}

    def config(name: str) -> TrainConfig:
        return TrainConfig(cache_dir=str(root / "cache"), output_dir=str(root / name), num_steps=args.steps,
                           warmup_steps=2, checkpoint_every=10 * args.steps, rank=4, alpha=4.0, device="cpu",
                           extra={"tiny": tiny})

    print(f"tiny run: {args.layers} layers, width {args.width}, {args.frames} frames at {args.size}x{args.size}, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds, order alternating")
    rates: dict[str, list[float]] = {"in-process": [], "worker": []}
    compute: dict[str, list[float]] = {"in-process": [], "worker": []}
    outside: dict[str, list[float]] = {"in-process": [], "worker": []}  # seconds per step beyond its compute
    startup: dict[str, list[float]] = {"in-process": [], "worker": []}
    runners = {"in-process": run_inprocess, "worker": run_worker}
    for r in range(args.rounds):
        order = ["in-process", "worker"] if r % 2 == 0 else ["worker", "in-process"]
        line = []
        for mode in order:
            stamps, step_s, t0 = runners[mode](config(f"{mode}_{r}"))
            rates[mode].append(steady_rate(stamps, args.warmup))
            compute[mode].append(1.0 / statistics.median(step_s[args.warmup:]))
            gaps = [b - a - s for a, b, s in zip(stamps[args.warmup:], stamps[args.warmup + 1:], step_s[args.warmup + 1:])]
            outside[mode].append(statistics.median(gaps))
            startup[mode].append(stamps[0] - step_s[0] - t0)
            line.append(f"{mode} {rates[mode][-1]:.2f} steps/s (start-up {startup[mode][-1]:.2f} s)")
        print(f"round {r + 1}: " + ", ".join(line))
    med = {m: statistics.median(v) for m, v in rates.items()}
    ratio = med["worker"] / med["in-process"]
    per_round = [w / i for w, i in zip(rates["worker"], rates["in-process"])]
    print(f"\nsteady state, median over rounds: in-process {med['in-process']:.3f} steps/s, "
          f"worker {med['worker']:.3f} steps/s")
    print(f"worker / in-process = {ratio:.4f}  -> overhead {100 * (1 - ratio):+.2f} % "
          f"(per round: {', '.join(f'{100 * (1 - x):+.1f} %' for x in per_round)}; target <= 2 %)")
    cm = {m: statistics.median(v) for m, v in compute.items()}
    print(f"compute only (median 1 / step time measured inside each): in-process {cm['in-process']:.3f}, "
          f"worker {cm['worker']:.3f} steps/s")
    om = {m: statistics.median(v) for m, v in outside.items()}
    step_time = 1.0 / med["in-process"]
    extra = om["worker"] - om["in-process"]
    print(f"time per step outside the step's compute (median): in-process {1e3 * om['in-process']:.3f} ms, "
          f"worker {1e3 * om['worker']:.3f} ms -> the channel adds {1e3 * extra:.3f} ms per step = "
          f"{100 * extra / step_time:.3f} % of a {1e3 * step_time:.1f} ms step")
    cost = channel_cost()
    print(f"channel CPU cost per step event (real pipe, both sides): {1e6 * cost:.1f} us = "
          f"{100 * cost / step_time:.4f} % of a {1e3 * step_time:.1f} ms step")
    su = {m: statistics.median(v) for m, v in startup.items()}
    print(f"start-up to the first step (median): in-process {su['in-process']:.2f} s (model build), "
          f"worker {su['worker']:.2f} s (interpreter, imports, model build): +{su['worker'] - su['in-process']:.2f} s "
          "once per run")


if __name__ == "__main__":
    main()
