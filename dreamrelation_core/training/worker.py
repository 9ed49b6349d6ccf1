"""Training as a worker process that reports on a JSON-lines channel (the worker side).

Started as `python -m dreamrelation_core.training.worker CONFIG --control stdin [--resume]
[--overwrite] [--remove-config]` (`worker_client` starts it, with `--remove-config` when CONFIG is
a temporary file it wrote: the worker deletes it once read; the CLI's `train --progress jsonl`
runs the same `run_worker` in a terminal), or under torchrun, one process per GPU
(training.launch). Under torchrun every process joins the group; rank 0 alone takes the run
folder's lock, plans, writes the events below and reads stdin; it hands the plan (and, when the
run resumes, the checkpoint's state) to the others over the group, which train the same steps and
write nothing (`runs.execute_follower`). A cancel or a signal reaching any process stops all of
them at the same step (the trainer agrees it); every process then exits 0 (torchrun reports any
other code as a failure): the event says how the run ended. A failing process other than rank 0
writes `RANK_ERROR_PREFIX <rank>: <message>` on stderr; rank 0 then reports the lost process.
There is no out-of-memory retry under several processes. Event names, the cancel command, exit codes, run
statuses and the history file are defined in `protocol`. The run goes through
`training.runs.run_training`: a run folder another trainer holds is an error event naming it.
It writes one JSON object per line on stdout and nothing else there: everything else the process
prints goes to stderr (stdout is moved to stderr at start and the channel keeps a private copy of the original stdout).

Events (keys absent where they do not apply; NaN losses are null):
    {"event": "start", "protocol": 1, "pid", "action": "new"|"resume"|"finished", "step", "total",
     "run_dir", "message"}                          # the plan (training.runs), before the model loads
    {"event": "memory", "message", "options": {base_dtype, blocks_to_swap, gradient_checkpointing,
     offload_activations, shard_base}, "retry": bool}           # the memory options chosen (estimate, free memory),
                                                    # before step 1; again for each out-of-memory retry
    {"event": "step", "step", "total", "branch", "losses": {"total", "mse", "masked", "rcl"}, "lr",
     "step_s", "it_s", "eta_s"}                     # after every step
    {"event": "checkpoint", "step", "total", "checkpoint"}   # after every checkpoint written
    {"event": "done", "status": "finished"|"stopped"|"already finished", "step", "total", "run_dir",
     "checkpoint", "lora": {"triplet", "relation"}, "history", "message"}          # exit code 0
    {"event": "cancelled", "step", "total", "run_dir", "checkpoint", "lora", "history", "message"}
                                                    # exit code 3
    {"event": "error", "message", "step"?}          # one readable line; exit code 1
The traceback of an unexpected error goes to stderr and to `<run_dir>/worker_error.log` (when the
run folder remains).

Stopping (`--control stdin`): the parent writes the line `cancel` on the worker's stdin. This works
the same on Linux, macOS and Windows (sending SIGINT to one child process is not portable to
Windows). SIGINT / SIGTERM (Ctrl+C in a terminal; SIGBREAK on Windows) are honoured too. Either
way the worker finishes the step in progress, writes a checkpoint at that step and the LoRA files,
and exits with a "cancelled" event: nothing is lost. If the parent dies, the worker's stdin reaches
end-of-file (and, on POSIX, its parent pid changes): it stops the same way, with a checkpoint. A
second SIGINT stops at once, without a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import DreamRelationError
from .config import TrainConfig
from .protocol import CANCEL_COMMAND, HISTORY_FILE, PROTOCOL_VERSION, Action, Event, Exit, Status

if TYPE_CHECKING:  # torch and the trainer load in run_worker: the client imports this module, light
    from .trainer import StepInfo

log = logging.getLogger("dreamrelation")

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = Exit.OK, Exit.ERROR, Exit.CANCELLED
ERROR_LOG = "worker_error.log"


# ---------------------------------------------------------------------------------------------
# the channel


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class _Tolerant:
    """A text stream whose writes never raise: once the parent is gone, stderr is a broken pipe,
    and a warning printed then must not stop the worker before its checkpoint."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Channel:
    """JSON lines on a private copy of the process's stdout; stdout itself is moved to stderr so
    that stray prints (libraries, warnings) cannot corrupt the channel. A closed pipe (parent gone)
    is noted and further events are dropped: the worker still finishes its checkpoint."""

    def __init__(self, stream: IO[str] | None = None, silent: bool = False) -> None:
        """`silent`: a training process other than rank 0 (several processes share torchrun's
        stdout): its stdout is moved to stderr all the same, and its events are dropped."""
        if stream is None:
            sys.stdout.flush()
            fd = os.dup(1)
            os.dup2(2, 1)  # fd 1 -> stderr: print() and C-level writes go there now
            stream = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
            sys.stderr = _Tolerant(sys.stderr)
            sys.stdout = sys.stderr
        if silent:
            stream.close()
        self.stream = stream
        self.closed = silent
        self.lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps(_json_safe({"event": event, **{k: v for k, v in fields.items() if v is not None}}),
                          separators=(",", ":"), allow_nan=False)
        with self.lock:
            if self.closed:
                return
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # broken pipe / closed: the parent went away
                self.closed = True


# ---------------------------------------------------------------------------------------------
# stop requests


class StopRequest:
    """Set once by whichever comes first: a `cancel` line, stdin closing, a signal, the parent gone."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.finished = threading.Event()  # set once the run has stopped and its files are written
        self.reason = ""
        self.signals = 0
        self.parent_pid = os.getppid() if os.name == "posix" else None

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def __call__(self) -> bool:
        if self.parent_pid is not None and not self.event.is_set() and os.getppid() != self.parent_pid:
            self.set("the parent process is gone")
        return self.event.is_set()

    def watch_stdin(self, stream: IO[str] | None = None) -> threading.Thread:
        stream = stream or sys.stdin

        def read() -> None:
            try:
                for line in stream:
                    cmd = line.strip().lower()
                    if cmd == CANCEL_COMMAND:
                        self.set("cancel requested")
                    elif cmd:
                        print(f"worker: unknown control command {cmd!r} (expected {CANCEL_COMMAND!r})", file=sys.stderr)
            except (OSError, ValueError):
                pass
            self.set("the control channel (stdin) closed: parent gone")

        t = threading.Thread(target=read, name="dreamrelation-control", daemon=True)
        t.start()
        return t

    def install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT / SIGTERM / SIGBREAK set the request (a second one stops at once). Returns a
        function that puts the previous handlers back."""

        def handler(signum, _frame) -> None:
            self.signals += 1
            if self.signals > 1:
                raise KeyboardInterrupt  # asked twice: stop now
            self.set(f"signal {signal.Signals(signum).name}")

        previous = {}
        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                sig = getattr(signal, name)
                try:
                    previous[sig] = signal.signal(sig, handler)
                except (ValueError, OSError):  # not the main thread / not settable here
                    pass

        close_handler = install_console_close_handler(self)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)
            if close_handler is not None:
                close_handler()

        return restore


# Windows console events (wincon.h): Ctrl+C and Ctrl+Break reach the signal handlers above; closing
# the console window, logging off and shutting down end the process once the handler returns, at
# the latest about 5 s after the event (the system's limit).
CTRL_C_EVENT, CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT = 0, 1, 2, 5, 6
CLOSE_WAIT_S = 4.5  # the part of those 5 s the worker uses to finish the step and write the checkpoint


def console_event_handler(stop: StopRequest, finished: threading.Event,
                          wait_s: float = CLOSE_WAIT_S) -> Callable[[int], bool]:
    """The console control handler's logic: on close / log-off / shut-down, ask for a checkpoint
    and hold the process open until it is written (`finished`) or `wait_s` runs out."""
    names = {CTRL_CLOSE_EVENT: "the console window was closed", CTRL_LOGOFF_EVENT: "the user logged off",
             CTRL_SHUTDOWN_EVENT: "the system is shutting down"}

    def handle(event: int) -> bool:
        if event not in names:
            return False  # Ctrl+C / Ctrl+Break: the signal handlers
        stop.set(names[event])
        finished.wait(wait_s)
        return True

    return handle


def install_console_close_handler(stop: StopRequest) -> Callable[[], None] | None:
    """On Windows, `console_event_handler` as the process's console control handler (a worker
    started by ComfyUI has no console of its own: closing ComfyUI's console closes its stdin
    instead, and it checkpoints without a time limit). Returns the uninstaller; None elsewhere."""
    if sys.platform != "win32":
        return None
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    routine = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)(console_event_handler(stop, stop.finished))
    if not kernel32.SetConsoleCtrlHandler(routine, True):
        return None

    def remove() -> None:
        kernel32.SetConsoleCtrlHandler(routine, False)

    remove.routine = routine  # the C callback must outlive the registration
    return remove


# ---------------------------------------------------------------------------------------------
# errors as one line


def one_line(message: str) -> str:
    return " ".join(part.strip().lstrip("-").strip() for part in str(message).splitlines() if part.strip())


def is_out_of_memory(e: BaseException) -> bool:
    from .fallback import is_out_of_memory as oom

    return oom(e)


def out_of_memory_advice(e: BaseException, config: TrainConfig | None, clip_shape: tuple | None, step: int | None,
                         choice=None) -> str:
    """What ran out, at which settings, and what to lower. `choice`: the resolved memory options
    (memory.policy.Choice) when the run got that far; else the request's (possibly 'auto') values."""
    from .memory.policy import MEMORY_OPTIONS, memory_advice, user_fixed

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = f" at step {step + 1}" if step is not None else " while loading / setting up"
    now = []
    if clip_shape is not None:  # latent [12, T, h, w]
        t, h, w = clip_shape[-3:]
        now.append(f"clips of {6 * (t - 1) + 1} frames at {8 * h}x{8 * w}")
    if config is not None:
        now.append(f"rank {config.rank}")
    options = choice.options if choice is not None else None
    if options is not None:
        now.append(f"memory options {options.label()}")
    elif config is not None:
        for name in MEMORY_OPTIONS:
            value = getattr(config, name)
            now.append(f"{name} {('on' if value else 'off') if isinstance(value, bool) else value}")
    ctx = f" ({', '.join(now)})" if now else ""
    fixed = user_fixed(config) if config is not None else set()
    advice = memory_advice(options, fixed, choice.blocks if choice is not None else 0)
    return f"out of GPU memory{where}{ctx}: {advice}. [{first}]"


def describe_failure(e: BaseException, config: TrainConfig | None = None, clip_shape: tuple | None = None,
                     step: int | None = None, log_file: Path | None = None, choice=None) -> str:
    """The error event's message: the library's own message for known errors, advice for OOM."""
    from .memory.host import host_out_of_memory_message, is_host_out_of_memory

    if is_host_out_of_memory(e):  # RAM, not the GPU: its own advice (HostMemoryError speaks for itself)
        return host_out_of_memory_message(e)
    if is_out_of_memory(e):
        return out_of_memory_advice(e, config, clip_shape, step, choice)
    if isinstance(e, (DreamRelationError, ValueError, FileNotFoundError)):
        return one_line(str(e))
    if isinstance(e, KeyboardInterrupt):
        return "stopped at once (interrupted twice): no checkpoint written for the step in progress"
    where = f"; traceback in {log_file}" if log_file else "; traceback on the worker's stderr"
    at = f" at step {step + 1}" if step is not None else ""
    return one_line(f"unexpected error in the training worker{at}: {type(e).__name__}: {e}{where}")


# ---------------------------------------------------------------------------------------------
# the worker


class _Rate:
    """Steps per second over the last few steps."""

    def __init__(self, window: int = 20) -> None:
        self.times: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> float:
        self.times.append(seconds)
        total = sum(self.times)
        return len(self.times) / total if total > 0 else 0.0


def run_worker(
    config_path: str | os.PathLike,
    output_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    control: str = "none",
    channel: Channel | None = None,
    overrides: dict[str, Any] | None = None,
    remove_config: bool = False,
) -> int:
    """Run one training request and report it on the channel; returns the process exit code.

    `remove_config`: the config file is a temporary one written for this worker (worker_client):
    it is deleted as soon as it has been read, so that it never outlives the worker."""
    from .allocator import apply_allocator_environment

    apply_allocator_environment()  # before anything starts CUDA (the client's environment already has it)
    channel = channel or Channel(silent=launched_rank() != 0)  # under torchrun rank 0 alone speaks
    stop = StopRequest()
    restore = stop.install_signal_handlers()
    try:
        return _run(stop, config_path, output_dir, resume, overwrite, control, channel, overrides, remove_config)
    finally:
        stop.finished.set()  # a console-close handler waiting for the checkpoint may let the process end
        restore()


def launched_rank() -> int:
    """This process's rank as torchrun set it (RANK), 0 when not started by torchrun. Read before
    the process group exists: it decides who speaks on stdout and who reads stdin."""
    try:
        return int(os.environ.get("RANK", "0") or 0) if _launched_size() > 1 else 0
    except ValueError:
        return 0


def _launched_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


# The line a training process other than rank 0 writes on stderr when it fails (its channel is
# silent); the client adds it to the error it reports.
RANK_ERROR_PREFIX = "dreamrelation training process rank"


def _run(stop: StopRequest, config_path, output_dir, resume: bool, overwrite: bool, control: str, channel: Channel,
         overrides: dict[str, Any] | None, remove_config: bool = False) -> int:
    from . import distributed
    from .fallback import execute_with_fallback
    from .runs import Handoff, execute, execute_follower, handoff, run_training

    rank = launched_rank()
    if control == "stdin":
        if rank == 0:  # every process inherits torchrun's stdin: rank 0 alone reads the commands
            stop.watch_stdin()
    else:
        stop.parent_pid = None  # a terminal user: only signals stop the run
    config: TrainConfig | None = None
    plan = None
    world = distributed.World()
    handed_off = False  # rank 0 has sent the others its plan (or that there is none)
    state: dict[str, Any] = {"step": None, "clip_shape": None, "choice": None}
    try:
        try:
            config = TrainConfig.load_yaml(config_path)
        finally:
            if remove_config and _launched_size() <= 1:  # several processes read it: the client removes it
                Path(config_path).unlink(missing_ok=True)
        if output_dir:
            config.output_dir = output_dir
        for name, value in (overrides or {}).items():  # the command line's memory flags
            setattr(config, name, value)
        config.validate()
        if _launched_size() > 1:
            world = distributed.init_from_env(config.device)
        if not world.main:
            execute_follower(distributed.broadcast_object(None), should_cancel=stop)
            return EXIT_OK
        rate = _Rate()

        def on_plan(p) -> None:
            nonlocal plan, handed_off
            plan = p
            channel.emit(Event.START, protocol=PROTOCOL_VERSION, pid=os.getpid(), action=p.action, step=p.step,
                         total=p.config.num_steps, run_dir=p.run_dir, message=p.report())
            state["step"] = p.step
            if world.active:
                handed_off = True
                distributed.broadcast_object(handoff(p))

        def progress(info: StepInfo) -> None:
            state["step"] = info.step
            channel.emit(Event.STEP, step=info.step, total=info.num_steps, branch=info.branch, losses=info.losses,
                         lr=info.lr, step_s=info.step_time, it_s=rate.add(info.step_time), eta_s=info.eta)

        def checkpoint(path: Path) -> None:
            channel.emit(Event.CHECKPOINT, step=state["step"], total=plan.config.num_steps, checkpoint=path)

        def memory(choice) -> None:
            state["choice"] = choice
            channel.emit(Event.MEMORY, message=choice.summary(), options=_options_dict(choice.options), retry=False)

        def retry(message: str, options) -> None:
            channel.emit(Event.MEMORY, message=message, options=_options_dict(options), retry=True)

        def executor(p, **kw):
            if world.active:  # no memory ladder: every process would have to step down together
                return execute(p, on_memory=memory, **kw)
            return execute_with_fallback(p, on_memory=memory, on_retry=retry, **kw)

        plan, result = run_training(config, resume=resume, overwrite=overwrite, on_plan=on_plan, progress=progress,
                                    should_cancel=stop, on_checkpoint=checkpoint, executor=executor)
    except BaseException as e:  # noqa: B036 - every failure becomes the error event
        if not world.main:
            return _follower_failed(e, world)
        if world.active and not handed_off:  # the others wait for a plan: there is none
            handed_off = True
            try:
                distributed.broadcast_object(Handoff(None))
            except BaseException:  # noqa: B036 - the group itself is broken: torchrun stops the others
                pass
        log_file = _log_traceback(e, plan)
        step = state["step"] if state["step"] is not None and plan is not None and plan.action != Action.FINISHED else None
        shape = None
        try:
            if config is not None and config.cache_dir:
                from safetensors import safe_open

                first = next(iter(sorted(Path(config.cache_dir).glob("*.safetensors"))), None)
                if first is not None:
                    with safe_open(str(first), framework="pt") as f:
                        shape = tuple(f.get_slice("mean").get_shape())
        except Exception:
            shape = None
        message = describe_failure(e, plan.config if plan else config, shape, step, log_file, state["choice"])
        if world.active:
            message = _several_processes_note(e, message, step)
        channel.emit(Event.ERROR, message=message, step=step)
        return EXIT_ERROR
    lora = {"triplet": result.triplet_path, "relation": result.relation_path} if result.relation_path else None
    history = plan.run_dir / HISTORY_FILE if (plan.run_dir / HISTORY_FILE).is_file() else None
    fields = dict(step=result.step, total=plan.config.num_steps, run_dir=result.run_dir, checkpoint=result.checkpoint,
                  lora=lora, history=history)
    if result.status == Status.CANCELLED:
        if result.checkpoint is None:
            msg = f"cancelled before the first step ({stop.reason}): nothing was written"
        else:
            msg = (f"cancelled at step {result.step} ({stop.reason}): checkpoint {result.checkpoint.name} written; "
                   f"resume continues from step {result.step}")
        channel.emit(Event.CANCELLED, message=msg, **fields)
        # torchrun counts any exit code but 0 as a failure (and reports it): the event says cancelled
        return EXIT_OK if world.active else EXIT_CANCELLED
    msg = (f"already finished at step {result.step}: nothing trained" if result.status == Status.ALREADY_FINISHED
           else f"{result.status} at step {result.step}")
    channel.emit(Event.DONE, status=result.status, message=msg, **fields)
    return EXIT_OK


def is_peer_failure(e: BaseException) -> bool:
    """An error of torch.distributed's communication: another process died or the network failed."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError"}:
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in (
        "gloo", "nccl", "connection closed", "connection reset", "broken pipe", "socket"))


def _several_processes_note(e: BaseException, message: str, step: int | None) -> str:
    """The error event's message under several processes: what a lost peer or an out-of-memory means there."""
    if is_peer_failure(e):
        at = f" during step {step + 1}" if step is not None else ""
        return one_line(f"another training process stopped{at} (killed, crashed or out of memory; see its rank's "
                        "stderr): every process stopped, the last checkpoint is kept and resume continues from it. "
                        f"[{_first_sentence(e)}]")
    if is_out_of_memory(e):
        return (f"{message} With several processes there is no automatic retry with less memory: set the memory "
                "options yourself (`python -m dreamrelation_core memory --fit GIB` names the fastest that fit one GPU).")
    return message


def _first_sentence(e: BaseException) -> str:
    """The communication library's message without its source location, to its first full stop."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
    return f"{type(e).__name__}: {text.split('. ')[0].rstrip('.')}"


def _follower_failed(e: BaseException, world) -> int:
    """A rank other than 0 failed: its traceback and one line on stderr (its channel is silent)."""
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    if not is_peer_failure(e):  # a lost peer is rank 0's to report
        print(f"{RANK_ERROR_PREFIX} {world.rank}: {describe_failure(e)}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def _options_dict(options) -> dict[str, Any]:
    return {"base_dtype": options.base_dtype, "blocks_to_swap": options.blocks_to_swap,
            "gradient_checkpointing": options.gradient_checkpointing,
            "offload_activations": options.offload_activations, "shard_base": options.shard_base}


def _log_traceback(e: BaseException, plan) -> Path | None:
    """Traceback to stderr, and into the run folder when one remains (a failed new run leaves none)."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    print(text, file=sys.stderr, end="")
    if isinstance(e, (DreamRelationError, ValueError, FileNotFoundError)) or plan is None or not plan.run_dir.is_dir():
        return None
    path = plan.run_dir / ERROR_LOG
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}")
    except OSError:
        return None
    return path


# ---------------------------------------------------------------------------------------------
# the entry point: python -m dreamrelation_core.training.worker


_USAGE = """usage: python -m dreamrelation_core.training.worker CONFIG [--control none|stdin] [--resume]
       [--overwrite] [--output-dir DIR] [--remove-config]

Run one training as a worker: JSON-line events on stdout (see dreamrelation_core/training/worker.py).
Under torchrun (WORLD_SIZE > 1) every process joins the group; rank 0 alone reads stdin and writes
the events (training/launch.py starts it so).

  CONFIG            YAML file of TrainConfig options
  --control stdin   read `cancel` lines on stdin and stop the same way when stdin closes (default: none)
  --resume          continue the run in output_dir if there is one
  --overwrite       start over even if output_dir has checkpoints
  --output-dir DIR  override output_dir of the config
  --remove-config   delete the config file once read (worker_client hands the worker a temporary one)
"""
_FLAGS = {"--resume": "resume", "--overwrite": "overwrite", "--remove-config": "remove_config"}
_VALUES = {"--control": "control", "--output-dir": "output_dir"}


def parse_arguments(argv: list[str]) -> dict[str, Any]:
    """The worker's command line as run_worker's keyword arguments; ValueError names what is wrong.
    (Parsed here, not with argparse: the command-line tools stay in cli/, and this line is the client's.)"""
    out: dict[str, Any] = {"control": "none"}
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in _VALUES:
            if not eq:
                if not rest:
                    raise ValueError(f"{name} needs a value")
                value = rest.pop(0)
            out[_VALUES[name]] = value
        elif arg in _FLAGS:
            out[_FLAGS[arg]] = True
        elif arg.startswith("-") or "config_path" in out:
            raise ValueError(f"unexpected argument {arg!r}")
        else:
            out["config_path"] = arg
    if "config_path" not in out:
        raise ValueError("the CONFIG file is missing")
    if out["control"] not in ("none", "stdin"):
        raise ValueError(f"--control takes none or stdin, not {out['control']!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    """The worker process: exit code Exit.OK, Exit.ERROR or Exit.CANCELLED (Exit.USAGE: bad arguments)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(_USAGE, end="")
        return Exit.OK
    try:
        kwargs = parse_arguments(argv)
    except ValueError as e:
        print(f"{_USAGE}\nerror: {e}", file=sys.stderr)
        return Exit.USAGE
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)  # as the CLI
    code = run_worker(**kwargs)
    if code == EXIT_OK:  # a failed group may hang in its teardown: the process's end frees it then
        from .distributed import shutdown

        shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
