"""`train` and `resume`: run a relation LoRA training from a YAML config, or continue one."""

from __future__ import annotations

import argparse

from .progress import training_bar


def _report(result) -> int:
    print(f"{result.status} at step {result.step}")
    print(f"checkpoint:    {result.checkpoint}")
    print(f"triplet:       {result.triplet_path}")
    print(f"relation-only: {result.relation_path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.progress == "jsonl":  # worker mode: every outcome, errors included, is an event on stdout
        from ..training.worker import run_worker

        return run_worker(args.config, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite,
                          control=args.control, overrides=_memory_flags(args))
    from ..training.allocator import apply_allocator_environment

    apply_allocator_environment()  # the native allocator with expandable segments, before CUDA starts
    from ..training.config import TrainConfig
    from ..training.fallback import execute_with_fallback
    from ..training.runs import plan_run

    config = TrainConfig.load_yaml(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    _memory_overrides(config, args)
    from ..training.worker import StopRequest

    plan = plan_run(config, resume=args.resume, overwrite=args.overwrite)
    print(plan.report())
    stop = StopRequest()  # Ctrl+C: checkpoint at the current step, then exit (twice: at once)
    stop.parent_pid = None
    restore = stop.install_signal_handlers()
    bar, update = training_bar(plan.config.num_steps, plan.step) if args.progress == "bar" else (None, None)

    def say(text: str) -> None:
        (bar.write if bar is not None else print)(text)

    try:
        return _report(execute_with_fallback(plan, progress=update, should_cancel=stop,
                                             on_memory=lambda choice: say(choice.summary()),
                                             on_retry=lambda message, _options: say(message)))
    finally:
        stop.finished.set()  # the checkpoint is written: a console-close handler may let the process end
        restore()
        if bar is not None:
            bar.close()


def cmd_resume(args: argparse.Namespace) -> int:
    from ..training.trainer import Trainer

    trainer = Trainer.resume(args.run_dir, checkpoint=args.checkpoint)
    print(trainer.memory.summary())
    bar, update = training_bar(trainer.config.num_steps, trainer.step)
    try:
        return _report(trainer.train(progress=update))
    finally:
        bar.close()


def _memory_flags(args: argparse.Namespace) -> dict:
    """The memory flags given on the command line (None: the config's value stays)."""
    names = ("base_dtype", "blocks_to_swap", "gradient_checkpointing", "offload_activations")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _memory_overrides(config, args: argparse.Namespace) -> None:
    """--base-dtype, --blocks-to-swap, --gradient-checkpointing, --offload-activations over the YAML."""
    for name, value in _memory_flags(args).items():
        setattr(config, name, value)
    config.validate()


def _auto_int(text: str):
    return "auto" if text == "auto" else int(text)


def _auto_bool(text: str):
    choices = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return choices[text.lower()]


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory (default: the config's; auto picks the fastest setting that fits the GPU)")
    g.add_argument("--base-dtype", choices=("auto", "bf16", "fp8", "fp32"), help="storage of the frozen base weights")
    g.add_argument("--blocks-to-swap", type=_auto_int, metavar="N|auto", help="blocks streamed from CPU memory")
    g.add_argument("--gradient-checkpointing", type=_auto_bool, metavar="auto|on|off")
    g.add_argument("--offload-activations", type=_auto_bool, metavar="auto|on|off")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a relation LoRA triplet from a YAML config")
    p.add_argument("config", help="YAML file of TrainConfig options (see README)")
    _add_memory_args(p)
    p.add_argument("--output-dir", help="override output_dir of the config")
    p.add_argument("--overwrite", action="store_true", help="start over even if output_dir has checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir if there is one (settings that differ from the saved run are "
                        "applied when safe - num_steps, checkpoint_every - or refused, each listed); else a new run")
    p.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                   help="bar: a progress bar; jsonl: one JSON event per line on stdout (worker mode, see "
                        "dreamrelation_core/training/worker.py); none: quiet")
    p.add_argument("--control", choices=("none", "stdin"), default="none",
                   help="stdin: read `cancel` lines on stdin (checkpoint at the current step, then exit) and stop "
                        "the same way when stdin closes (the parent is gone); used by worker_client")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("run_dir", help="the run's output folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a specific checkpoint_<step>.pt instead of the last one")
    p.set_defaults(func=cmd_resume)
