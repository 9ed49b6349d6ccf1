"""Per-GPU peak memory of a training step with the frozen base sharded over N processes
(`shard_base`, FSDP2): the estimator against the meta-device trace, full-size Mochi and Wan 14B.

Each row is one rank's live tensors at the peak with one clip per rank (global batch = N), LoRA
rank 16, gradient checkpointing on: the whole base on every GPU (N does not matter) and the base
sharded over 2 and 8 processes. The trace runs the real step on the meta device (trace.py); FSDP2
itself cannot run there, so the trace stands in its memory pattern (each rank's 1/N of the block
weights resident, two whole blocks gathered in flight: block swap's two buffers). Neither figure is
a GPU measurement. About 40-80 s per trace on one CPU core.

    python benchmarks/shard_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from dreamrelation_core.training.memory.estimate import GIB, MochiDims, estimate  # noqa: E402
from dreamrelation_core.training.memory.setup import MemoryOptions  # noqa: E402
from dreamrelation_core.training.memory.trace import trace_step  # noqa: E402
from dreamrelation_core.training.memory.wan_dims import SIZES, WanDims  # noqa: E402


def mochi_config() -> dict:
    """diffusers' MochiTransformer3DModel defaults: the released Mochi 1."""
    from diffusers import MochiTransformer3DModel

    return {k: p.default for k, p in inspect.signature(MochiTransformer3DModel.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def wan14b_config() -> dict:
    return dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **SIZES["14b"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bf16 only")
    args = ap.parse_args()
    models = [("Mochi", "mochi", mochi_config(), MochiDims(), (61, 480, 848)),
              ("Wan 2.1 14B", "wan2.1", wan14b_config(), WanDims.named("wan2.1-14b"), (81, 480, 832))]
    dtypes = ("bf16",) if args.quick else ("bf16", "fp8")
    print("GiB of live tensors per GPU at the peak (no CUDA context, no fragmentation); estimates and meta-device "
          "traces, not GPU measurements\n")
    print("| model, clip | base | processes | estimate | trace | ratio | weights | gathered blocks | trace s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, base_model, config, dims, clip in models:
        for dtype in dtypes:
            for world, shard in ((1, False), (2, True), (8, True)):
                opts = MemoryOptions(dtype, 0, True, shard_base=shard)
                t0 = time.perf_counter()
                tr = trace_step(config, *clip, opts, base_model=base_model, world=world)
                dt = time.perf_counter() - t0
                est = estimate(*clip, opts, dims, world=world)
                what = f"{dtype}, sharded" if shard else f"{dtype}, whole"
                print(f"| {name} {clip[0]}x{clip[1]}x{clip[2]} | {what} | {world if shard else 'any'} | "
                      f"{est.peak_gib:.2f} | {tr.peak_gib:.2f} | {est.peak / tr.peak:.3f} | "
                      f"{tr.parts['weights'] / GIB:.2f} | {tr.parts['swap_buffers'] / GIB:.2f} | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()
