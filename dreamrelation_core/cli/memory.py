"""`memory`: predicted peak GPU memory of a training step, and the fastest options that fit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 480x848, got {text!r}") from None
    return h, w


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text.lower() == "on"


def _dims(config_dir: str | None, base_model: str = "mochi"):
    from ..training.memory.estimate import MochiDims
    from ..training.memory.wan_dims import WanDims

    wan = base_model.startswith("wan")
    if not config_dir:
        # the released model of that name; Mochi 1's dimensions equal diffusers' defaults (tested)
        return WanDims.named(base_model) if wan else MochiDims()
    path = Path(config_dir)
    path = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no transformer config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return WanDims.from_config(cfg) if wan else MochiDims.from_config(cfg)


def options_text(options) -> str:
    """The options as TrainConfig YAML lines."""
    return (f"base_dtype: {options.base_dtype}\nblocks_to_swap: {options.blocks_to_swap}\n"
            f"gradient_checkpointing: {str(options.gradient_checkpointing).lower()}\n"
            f"offload_activations: {str(options.offload_activations).lower()}\n"
            f"shard_base: {str(options.shard_base).lower()}")


def _per_rank(args: argparse.Namespace) -> tuple[int, int]:
    """(processes, clips per rank) from --nproc and the global --batch; refuses what cannot run."""
    world = args.nproc
    batch = world if args.batch is None else args.batch
    if world < 1:
        raise ValueError(f"--nproc must be >= 1, got {world}")
    if batch < world or batch % world:
        raise ValueError(f"--batch {batch} must be a multiple of --nproc {world} (each process takes batch / nproc clips)")
    if args.shard_base and world < 2:
        raise ValueError("--shard-base needs --nproc 2 or more: with one process there is no other GPU to share the "
                         "base with")
    if args.shard_base and args.blocks_to_swap:
        raise ValueError("--shard-base and --blocks-to-swap exclude each other (a sharded base keeps 1/N of each block "
                         "on every GPU already)")
    return world, batch // world


def cmd_memory(args: argparse.Namespace) -> int:
    from ..training.memory.attention import describe_cost
    from ..training.memory.estimate import MARGIN, estimate, fastest_fitting, host_estimate, latent_shape
    from ..training.memory.setup import MemoryOptions

    height, width = args.size
    dims = _dims(args.transformer_config, args.base_model)
    world, batch = _per_rank(args)
    if args.fit is not None:
        est = fastest_fitting(args.frames, height, width, args.fit, dims, args.rank, attention=args.attention,
                              batch=batch, world=world)
        if est is None:
            print(f"no option set fits {args.fit} GiB at {args.frames} frames, {height}x{width}"
                  + (" with the math attention kernel" if args.attention == "math" else "")
                  + ": use fewer frames or a smaller size")
            return 1
        print(f"fastest option set that fits {args.fit} GiB (needs {MARGIN.describe()}; "
              f"modelled step time {est.seconds:.1f} s, see docs/method.md):")
        print(options_text(est.options))
    else:
        opts = MemoryOptions(args.base_dtype, args.blocks_to_swap, args.gradient_checkpointing, args.offload_activations,
                             args.shard_base)
        est = estimate(args.frames, height, width, opts, dims, args.rank, args.attention, batch, world)
    print(est.report())
    if args.attention != "flash":
        flash = estimate(args.frames, height, width, est.options, dims, args.rank, batch=batch, world=world)
        print(describe_cost(args.attention, flash.peak_gib, est.peak_gib))
    shape = dims.latent_shape(args.frames, height, width) if hasattr(dims, "latent_shape") else latent_shape(
        args.frames, height, width)
    host = host_estimate(shape, est.options, dims, batch)
    print(host.report())
    if world > 1:  # every process loads the whole base before sharding or training on it
        print(f"  (RAM of one process: {world} processes on one machine need about {world} x the model while loading)")
    print(f"peak_gib={est.peak_gib:.2f}")
    print(f"host_gib={host.peak_gib:.2f}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory", help="predict the peak GPU memory of a training step; --fit GIB finds the fastest options that fit",
        description="Analytic peak GPU memory of one training step (validated against a meta-device trace of the "
                    "real step, see benchmarks/train_memory.py), and the host memory (RAM) of the run. The last two lines are "
                    "peak_gib=<GPU: live tensors at the peak> and host_gib=<RAM at its peak>.",
    )
    p.add_argument("--base-model", default="mochi",
                   choices=("mochi", "wan2.1-1.3b", "wan2.1-14b", "wan2.2-a14b", "wan2.2-5b"),
                   help="which model's dimensions (default mochi; wan2.2-a14b: one 14B expert)")
    p.add_argument("--frames", type=int, required=True, help="clip length in frames (Mochi 1 + 6k: 37, 61, ...; Wan 1 + 4k: 81)")
    p.add_argument("--size", type=_size, required=True, help="HEIGHTxWIDTH of the clip, e.g. 480x848 (Wan: 480x832)")
    p.add_argument("--base-dtype", choices=("bf16", "fp8"), default="bf16", help="storage of the frozen weights")
    p.add_argument("--blocks-to-swap", type=int, default=0, help="transformer blocks streamed from CPU memory")
    p.add_argument("--gradient-checkpointing", type=_on_off, default=True, help="on (default) or off")
    p.add_argument("--offload-activations", action="store_true", help="checkpointed block inputs in CPU memory")
    p.add_argument("--fit", type=float, metavar="GIB", help="GPU memory in GiB: print the fastest option set that fits")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes of train --nproc N (one per GPU): the figures are one GPU's; with --fit, sharding "
                        "the base is one of the options")
    p.add_argument("--batch", type=int, help="global batch_size, a multiple of --nproc (default: one clip per process)")
    p.add_argument("--shard-base", action="store_true",
                   help="the frozen base blocks sharded over the --nproc processes (FSDP2): memory, not speed")
    p.add_argument("--attention", choices=("flash", "efficient", "math"), default="flash",
                   help="the GPU's attention kernel: flash/efficient (Ampere or newer), math (older GPUs with bf16: "
                        "S x S score matrices)")
    p.add_argument("--transformer-config", help="a diffusers transformer config.json (or its folder) of the --base-model "
                   "family; default: the released model's")
    p.set_defaults(func=cmd_memory)
