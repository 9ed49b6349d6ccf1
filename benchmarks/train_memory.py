"""Peak GPU memory of a full-size Mochi LoRA-triplet training step: estimator vs meta-device trace.

For each option combination at 480x848 (37 and 61 frames), the analytic estimate
(`training/memory/estimate.py`) and the measurement of the real training step traced on the
meta device at full size (`training/memory/trace.py`: diffusers' MochiTransformer3DModel with
48 blocks, our peft triplet, the flow loss and backward, attention as a flash kernel holds it),
with their ratio. Needs no GPU and little memory (meta tensors have no data): about 40 s per
trace on one CPU core. On a machine with a GPU, --gpu also measures the real peak and s/step.

    python benchmarks/train_memory.py [--frames 37 61] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from dreamrelation_core.training.memory.estimate import GIB, MARGIN, MochiDims, estimate, fastest_fitting  # noqa: E402
from dreamrelation_core.training.memory.setup import MemoryOptions  # noqa: E402
from dreamrelation_core.training.memory.trace import trace_step  # noqa: E402

GPU_SIZES = (8, 12, 16, 24, 48, 80)


def combos(quick: bool) -> list[MemoryOptions]:
    """bf16 / fp8 with and without checkpointing, then the memory-saving options on fp8."""
    out = [MemoryOptions("bf16", 0, False), MemoryOptions("fp8", 0, False),
           MemoryOptions("bf16", 0, True), MemoryOptions("fp8", 0, True)]
    if not quick:
        out += [MemoryOptions("fp8", 16, True), MemoryOptions("fp8", 32, True), MemoryOptions("fp8", 48, True),
                MemoryOptions("fp8", 0, True, True), MemoryOptions("fp8", 48, True, True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[37, 61])
    ap.add_argument("--size", default="480x848")
    ap.add_argument("--quick", action="store_true", help="fewer option combinations")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    dims = MochiDims()
    print(f"Mochi {dims.layers} blocks, width {dims.d}/{dims.text_width}, LoRA rank 16 triplet + AdamW; {h}x{w}")
    print("GiB of live tensors at the peak (no CUDA context, no fragmentation)\n")
    print("| frames | options | estimate | trace | ratio | weights | swap buf | LoRA+opt | activations | attention | trace s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for frames in args.frames:
        todo = combos(args.quick)
        for gib in GPU_SIZES:  # the option sets `memory --fit` picks: measured too
            fit = fastest_fitting(frames, h, w, gib, dims)
            if fit is not None and fit.options not in todo:
                todo.append(fit.options)
        for opts in todo:
            est = estimate(frames, h, w, opts, dims)
            t0 = time.perf_counter()
            tr = trace_step({}, frames, h, w, opts)
            dt = time.perf_counter() - t0
            ratio = est.peak / tr.peak
            worst = max(worst, abs(ratio - 1))
            parts = " | ".join(f"{tr.parts[k] / GIB:.2f} / {est.parts[k] / GIB:.2f}"
                               for k in ("weights", "swap_buffers", "lora", "activations", "attention"))
            print(f"| {frames} | {opts.label()} | {est.peak_gib:.2f} | {tr.peak_gib:.2f} | {ratio:.3f} | {parts} | {dt:.0f} |",
                  flush=True)
    print(f"\nparts: trace / estimate. Largest |estimate/trace - 1|: {100 * worst:.1f} %")
    print(f"\nFastest option set per GPU size (estimate and step-time model; needs = {MARGIN.describe()}):")
    for frames in args.frames:
        for gib in GPU_SIZES:
            est = fastest_fitting(frames, h, w, gib, dims)
            txt = (f"{est.options.label()}: peak {est.peak_gib:.2f} GiB, needs {est.needed_gib():.2f}, "
                   f"modelled {est.seconds:.1f} s/step") if est else "none fits"
            print(f"  {frames} frames, {gib:>2} GiB: {txt}")
    print("\nNo GPU figures: this machine has no GPU (peak and s/step on a GPU are still to be measured).")


if __name__ == "__main__":
    main()
