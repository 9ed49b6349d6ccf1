"""`train` and `resume`: run a relation LoRA training from a YAML config, or continue one."""

from __future__ import annotations

import argparse
import re
import sys

from .progress import training_bar


def _report(result) -> int:
    print(f"{result.status} at step {result.step}")
    print(f"checkpoint:    {result.checkpoint}")
    print(f"triplet:       {result.triplet_path}")
    print(f"relation-only: {result.relation_path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    launch = _launch(args)
    if launch.distributed:
        from ..training.config import TrainConfig

        config = TrainConfig.load_yaml(args.config)
        if args.output_dir:
            config.output_dir = args.output_dir
        _memory_overrides(config, args)
        return _run_several(config, launch, args.resume, args.overwrite, args.progress)
    if args.progress == "jsonl":  # the worker's JSON lines in a terminal (the node starts training.worker itself)
        from ..training.worker import run_worker

        return run_worker(args.config, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite,
                          control=args.control, overrides=_memory_flags(args))
    from ..training.config import TrainConfig

    config = TrainConfig.load_yaml(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    _memory_overrides(config, args)
    return _run(config, resume=args.resume, overwrite=args.overwrite, progress=args.progress)


def cmd_resume(args: argparse.Namespace) -> int:
    """`resume DIR`: the run's saved settings, then exactly what `train --resume` does."""
    from ..training.runs import saved_config

    launch = _launch(args)
    if launch.distributed and args.checkpoint:
        raise ValueError("resume --checkpoint runs in one process: leave out --nproc / --nnodes, or move the newer "
                         "checkpoints out of checkpoints/ to resume from an older one on several processes")
    config = saved_config(args.run_dir, args.checkpoint)
    if launch.distributed:
        return _run_several(config, launch, True, False, args.progress)
    return _run(config, resume=True, overwrite=False, progress=args.progress, checkpoint=args.checkpoint)


def _run(config, resume: bool, overwrite: bool, progress: str, checkpoint: str | None = None) -> int:
    """The one path of `train` and `resume`: the run folder's lock, the plan's report, the memory
    fallback, Ctrl+C / SIGTERM -> a checkpoint at the current step (twice: at once), history.json,
    the result."""
    from ..training.allocator import apply_allocator_environment

    apply_allocator_environment()  # the native allocator with expandable segments, before CUDA starts
    from ..training.fallback import execute_with_fallback
    from ..training.protocol import Status
    from ..training.runs import run_training
    from ..training.worker import StopRequest

    stop = StopRequest()
    stop.parent_pid = None  # a terminal user: only signals stop the run
    restore = stop.install_signal_handlers()
    bar: list = []

    def say(text: str) -> None:
        (bar[0].write if bar else print)(text)

    def on_plan(plan) -> None:
        print(plan.report(), flush=True)
        if progress == "bar":
            bar.extend(training_bar(plan.config.num_steps, plan.step))

    def update(info) -> None:
        if bar:
            bar[1](info)

    def executor(plan, **kw):
        return execute_with_fallback(plan, on_memory=lambda choice: say(choice.summary()),
                                     on_retry=lambda message, _options: say(message), **kw)

    try:
        _, result = run_training(config, resume, overwrite, checkpoint=checkpoint, on_plan=on_plan,
                                 progress=update, should_cancel=stop, executor=executor)
    finally:
        stop.finished.set()  # the checkpoint is written: a console-close handler may let the process end
        restore()
        if bar:
            bar[0].close()
    if result.status == Status.CANCELLED:
        print(f"stopped ({stop.reason}): " + (f"checkpoint {result.checkpoint.name} written at step {result.step}; "
                                              "run the same command again to continue"
                                              if result.checkpoint else "before the first step, nothing written"))
    return _report(result)


def _launch(args: argparse.Namespace):
    from ..training.launch import Launch

    return Launch(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port).validate()


def _run_several(config, launch, resume: bool, overwrite: bool, progress: str) -> int:
    """`train --nproc N` (and several machines): the worker under torchrun, followed through the
    worker client as the ComfyUI node follows it; rank 0 reports, this process draws the bar.
    Ctrl+C / SIGTERM: torchrun passes the signal to every process and this one sends `cancel`:
    one checkpoint at the step all processes reached. On a machine other than 0 torchrun runs
    in the foreground: machine 0 reports the run."""
    import json
    import signal
    import subprocess

    from ..training.launch import check_batch, check_devices
    from ..training.protocol import END_EVENTS, Event, Status
    from ..training.worker import StopRequest
    from ..training.worker_client import run_training_worker, worker_command, worker_environment, write_temp_config

    check_devices(config.device, launch.nproc)
    check_batch(config.batch_size, launch.world_size)
    if not launch.reports:
        path = write_temp_config(config)  # this machine's own copy: no shared file system needed
        try:
            print(f"node {launch.node_rank}: {launch.nproc} training process(es) join the run of node 0 at "
                  f"{launch.master_addr}:{launch.master_port or 29500} (node 0 reports the progress and writes the "
                  "files)", flush=True)
            # Ctrl+C reaches torchrun too (the same terminal): it stops its processes with the
            # others; this process only waits for it (Python's default would kill torchrun).
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                code = subprocess.call(worker_command(path, resume, overwrite, launch=launch),
                                       env=worker_environment())
            finally:
                signal.signal(signal.SIGINT, previous)
        finally:
            path.unlink(missing_ok=True)
        print(f"node {launch.node_rank}: training processes ended (exit code {code})")
        return code
    stop = StopRequest()
    stop.parent_pid = None  # a terminal user: only signals stop the run
    restore = stop.install_signal_handlers()
    bar: list = []
    ended = []  # once the last event came: torchrun's own report (failure, shutdown) is not shown

    def say(text: str) -> None:
        if bar:
            bar[0].write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def on_event(ev) -> None:
        if ev.event in END_EVENTS:
            ended.append(ev)
        if progress == "jsonl":
            print(json.dumps(ev.raw), flush=True)
            return
        if ev.event == Event.START:
            print(ev.message, flush=True)
            if progress == "bar":
                bar.extend(training_bar(int(ev.total or 0), int(ev.step or 0)))
        elif ev.event == Event.MEMORY and ev.message:
            say(ev.message)
        elif ev.event == Event.STEP and bar:
            bar[1](_StepView(ev))

    def on_stderr(line: str) -> None:
        if not ended and not _TORCHRUN_LOG.match(line):
            say(line)

    try:
        result = run_training_worker(config, resume=resume, overwrite=overwrite, on_event=on_event,
                                     should_cancel=stop, launch=launch, on_stderr=on_stderr)
    finally:
        stop.finished.set()
        restore()
        if bar:
            bar[0].close()
    if progress == "jsonl":
        return 0
    if result.status == Status.CANCELLED:  # the event's message names the signal or the cancel
        print(f"{ended[-1].message}" + ("; run the same command with --resume to continue" if result.checkpoint else ""))
    return _report(result)


# torchrun's own log lines (glog format: level, date, time, pid, file): not shown beside the bar
_TORCHRUN_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*torch/distributed/")


class _StepView:
    """A step event as the bar's callback reads a StepInfo."""

    def __init__(self, ev) -> None:
        self.step, self.branch, self.lr = int(ev.step), ev.branch or "", float(ev.lr or 0.0)
        self.losses = {k: (float("nan") if v is None else v) for k, v in (ev.losses or {}).items()}
        for k in ("total", "mse", "masked", "rcl"):
            self.losses.setdefault(k, float("nan"))


def _memory_flags(args: argparse.Namespace) -> dict:
    """The memory flags given on the command line (None: the config's value stays)."""
    names = ("base_dtype", "blocks_to_swap", "gradient_checkpointing", "offload_activations", "shard_base")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _memory_overrides(config, args: argparse.Namespace) -> None:
    """--base-dtype, --blocks-to-swap, --gradient-checkpointing, --offload-activations, --shard-base over the YAML."""
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
    g.add_argument("--shard-base", type=_auto_bool, metavar="auto|on|off",
                   help="the frozen base blocks sharded over the processes of --nproc N (memory, not speed)")


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (torchrun; README \"Several GPUs\"): batch_size is the global batch")
    g.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="training processes on this machine, one per GPU (default 1: no torchrun)")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines taking part (default 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="R",
                   help="this machine's place, 0 to M-1; machine 0 writes the run folder and shows the progress")
    g.add_argument("--master-addr", metavar="HOST", help="address of machine 0, reachable from every machine")
    g.add_argument("--master-port", type=int, metavar="PORT", help="a free TCP port on machine 0 (default 29500)")


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
                        "the same way when stdin closes (the parent is gone)")
    _add_launch_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("run_dir", help="the run's output folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a specific checkpoint_<step>.pt instead of the last one")
    p.add_argument("--progress", choices=("bar", "none"), default="bar", help="bar: a progress bar; none: quiet")
    _add_launch_args(p)
    p.set_defaults(func=cmd_resume)
