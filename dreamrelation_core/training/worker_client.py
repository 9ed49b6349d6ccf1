"""Run training in a worker process and follow it (the parent side; the ComfyUI Train node uses it).

    result = run_training_worker(config, resume=True, on_event=show, should_cancel=interrupted)

starts `python -m dreamrelation_core.training.worker <config> --control stdin [--resume]` with the
parent's own interpreter (`sys.executable`), or torchrun running it in several processes
(`launch=Launch(nproc=N)`, training.launch: rank 0 alone reads stdin and writes events), reads
its events (see training.worker and training.protocol), hands each to `on_event` as a
`WorkerEvent`, and returns a `WorkerResult` when the worker ends.

- Cancel: when `should_cancel()` turns true, the worker is told (`cancel` on its stdin); it
  finishes the step in progress, writes a checkpoint at that step and the LoRA files, and the
  result has status "cancelled". When `on_event` raises (ComfyUI raises its interrupt from inside
  the progress-bar update), the worker is cancelled the same way, the call waits for the
  checkpoint, and the exception is re-raised.
- Errors: the worker's error event becomes a TrainingError carrying its one-line message. A worker
  that dies without one (killed, crashed) gives a TrainingError with its exit code and the last
  line it wrote on stderr. Under torchrun the error also names the process that failed first
  (torchrun's summary) and the one-line errors of the other ranks.
- The worker stops by itself, with a checkpoint, if this process dies (its stdin closes).
- A TrainConfig is handed over as a temporary YAML file that the worker deletes once read (and
  this side when the worker ends); see write_temp_config.
A training run's isolation is the point: an out-of-memory error or a crash ends the worker, not
the caller, and all of the worker's GPU memory is returned when it exits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import TrainingError
from .config import TrainConfig
from .launch import Launch, launcher_failure, module_command, torchrun_command
from .lock import pid_running
from .protocol import CANCEL_COMMAND, END_EVENTS, EVENTS, PROTOCOL_VERSION, WORKER_MODULE, Event, read_history

log = logging.getLogger("dreamrelation")

# A failed training process other than rank 0 writes this on stderr (training.worker.RANK_ERROR_PREFIX).
_RANK_ERROR_PREFIX = "dreamrelation training process rank"


@dataclass
class WorkerEvent:
    """One line of the worker's channel. Fields the event does not carry are None."""

    event: str
    step: int | None = None
    total: int | None = None
    branch: str | None = None
    losses: dict[str, float] | None = None  # total, mse, masked, rcl (NaN where not computed)
    lr: float | None = None
    step_s: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    checkpoint: str | None = None
    lora: dict[str, str] | None = None  # triplet, relation
    run_dir: str | None = None
    history: str | None = None  # path of history.json (done / cancelled)
    action: str | None = None  # start: new / resume / finished
    status: str | None = None  # done: finished / stopped / already finished
    message: str | None = None
    options: dict[str, Any] | None = None  # memory: the resolved memory options
    retry: bool | None = None  # memory: an out-of-memory retry one rung down the ladder
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, line: str) -> WorkerEvent:
        data = json.loads(line)
        if not isinstance(data, dict) or data.get("event") not in EVENTS:
            raise ValueError(f"not a worker event: {line[:200]!r}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "raw"}
        ev = cls(**known, raw=data)
        if ev.losses is not None:
            ev.losses = {k: (math.nan if v is None else float(v)) for k, v in ev.losses.items()}
        return ev

    def history_entry(self) -> dict[str, Any]:
        """A step event as a trainer history entry (step, branch, lr, loss terms)."""
        return {"step": self.step, "branch": self.branch, "lr": self.lr, **(self.losses or {})}


@dataclass
class WorkerResult:
    status: str  # one of protocol.STATUSES
    step: int
    total: int
    action: str  # what the run did: one of protocol.ACTIONS (new, resume, finished)
    run_dir: Path
    checkpoint: Path | None
    triplet_path: Path | None
    relation_path: Path | None
    message: str  # the plan's report (new / resumed / already finished, changes applied), the memory
    # options and retries, the outcome
    history: list[dict[str, Any]]  # every step of the run (earlier sessions too)
    returncode: int
    memory: list[str] = field(default_factory=list)  # the memory plan and each out-of-memory retry, in order


def worker_command(config_path: str | os.PathLike, resume: bool = True, overwrite: bool = False,
                   python: str | None = None, remove_config: bool = False, launch: Launch | None = None) -> list[str]:
    """The worker's command line: this interpreter, the worker module (protocol.WORKER_MODULE); under
    torchrun when `launch` asks for several processes (training.launch)."""
    args = [str(config_path), "--control", "stdin"]
    if resume:
        args.append("--resume")
    if overwrite:
        args.append("--overwrite")
    if remove_config:
        args.append("--remove-config")
    if launch is not None and launch.distributed:
        return torchrun_command(WORKER_MODULE, args, launch, python)
    return module_command(WORKER_MODULE, args, python)


# The temporary config handed to a worker: `dreamrelation_train_<parent pid>_<random>.yaml` in the
# system's temp folder. The worker deletes it once read, the parent when the worker ends; one left
# by a parent and worker both killed early is removed by the next start (its parent PID is gone).
_TEMP_CONFIG_PREFIX = "dreamrelation_train_"
_TEMP_CONFIG_RE = re.compile(r"^dreamrelation_train_(\d+)_[A-Za-z0-9_]+\.yaml$")


def write_temp_config(config: TrainConfig, folder: str | os.PathLike | None = None) -> Path:
    folder = Path(folder or tempfile.gettempdir())
    remove_stale_configs(folder)
    fd, name = tempfile.mkstemp(prefix=f"{_TEMP_CONFIG_PREFIX}{os.getpid()}_", suffix=".yaml", dir=folder)
    os.close(fd)
    return config.save_yaml(name)


def remove_stale_configs(folder: str | os.PathLike | None = None) -> list[Path]:
    """Temporary worker configs whose parent process is gone (the parent and worker were killed)."""
    removed = []
    folder = Path(folder or tempfile.gettempdir())
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _TEMP_CONFIG_RE.match(p.name)
        if m and not pid_running(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def worker_environment(base: dict[str, str] | None = None, platform: str | None = None) -> dict[str, str]:
    """The worker's environment: the parent's (or `base`), unbuffered UTF-8 output, and the
    worker's own allocator settings (never the parent's cudaMallocAsync; see memory.warmup)."""
    from .allocator import allocator_environment

    env = allocator_environment(os.environ if base is None else base, platform)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def _process_options(platform: str | None = None) -> dict[str, Any]:
    """Windows: no console window of its own for the worker (ComfyUI Desktop has none to share), and
    its own process group, so that closing ComfyUI's console does not kill it before the
    checkpoint (it notices the closed pipe, checkpoints and exits). Elsewhere nothing."""
    if (platform or sys.platform) != "win32":
        return {}
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
    return {"creationflags": flags}


class TrainingWorker:
    """One worker process and its channel: `start()`, `next_event()`, `cancel()`, `wait()`."""

    def __init__(self, config: TrainConfig | str | os.PathLike, resume: bool = True, overwrite: bool = False,
                 python: str | None = None, env: dict[str, str] | None = None,
                 stderr_log: str | os.PathLike | None = None, launch: Launch | None = None,
                 on_stderr: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.resume, self.overwrite, self.python = resume, overwrite, python
        self.env = env
        self.launch = launch if launch is not None and launch.distributed else None
        self.stderr_log = Path(stderr_log) if stderr_log else None
        self.on_stderr = on_stderr  # each stderr line as it arrives (the CLI shows them)
        self.proc: subprocess.Popen | None = None
        self.events: queue.Queue[WorkerEvent | None] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=80)  # torchrun's failure summary alone is ~35 lines
        self.rank_errors: list[str] = []  # the one-line errors of failed processes other than rank 0
        self._config_file: Path | None = None
        self._threads: list[threading.Thread] = []
        self.cancel_sent = False

    # -- process --------------------------------------------------------------------------------
    def start(self) -> TrainingWorker:
        if isinstance(self.config, TrainConfig):
            self._config_file = write_temp_config(self.config)
            path = self._config_file
        else:
            path = Path(self.config)
        self.proc = subprocess.Popen(
            worker_command(path, self.resume, self.overwrite, self.python, launch=self.launch,
                           remove_config=self._config_file is not None and self.launch is None),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_environment(self.env),
            text=True, encoding="utf-8", errors="replace", bufsize=1, **_process_options(),
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, name="dreamrelation-worker-out", daemon=True),
            threading.Thread(target=self._read_stderr, name="dreamrelation-worker-err", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.events.put(WorkerEvent.parse(line))
            except ValueError:  # not ours: keep it with the diagnostics
                self.stderr_tail.append(line)
        self.events.put(None)  # end of the channel

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        log: IO[str] | None = None
        if self.stderr_log is not None:
            self.stderr_log.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.stderr_log, "a", encoding="utf-8")
        try:
            for line in self.proc.stderr:
                if log is not None:
                    log.write(line)
                if line.strip():
                    self.stderr_tail.append(line.rstrip())
                    if line.startswith(_RANK_ERROR_PREFIX):
                        self.rank_errors.append(line.strip())
                if self.on_stderr is not None:
                    self.on_stderr(line.rstrip("\n"))
        finally:
            if log is not None:
                log.close()

    def next_event(self, timeout: float | None = None) -> WorkerEvent | None:
        """The next event; None at the end of the channel. Raises queue.Empty on timeout."""
        return self.events.get(timeout=timeout)

    def cancel(self) -> None:
        """Ask for a checkpoint at the current step and an exit (`cancel` on the worker's stdin)."""
        if self.proc is None or self.proc.stdin is None or self.cancel_sent:
            return
        self.cancel_sent = True
        try:
            self.proc.stdin.write(CANCEL_COMMAND + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):  # already gone
            pass

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def kill(self, grace_s: float = 30.0) -> None:
        """End the worker now. Under torchrun: SIGTERM first (torchrun ends its processes, which
        run in sessions of their own), then SIGKILL after `grace_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.launch is not None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()

    def close(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        if self._config_file is not None:
            self._config_file.unlink(missing_ok=True)
            self._config_file = None

    def failure_detail(self) -> str:
        """What the other processes said about a failure under torchrun: their one-line errors, and
        which process failed first and how (torchrun's summary); empty for one process."""
        if self.launch is None:
            return ""
        parts = list(dict.fromkeys(self.rank_errors))
        first = launcher_failure(self.stderr_tail)
        if first is not None and first.rank != 0:
            parts.append(first.describe())
        return "; ".join(parts)

    def last_stderr_line(self) -> str:
        for line in reversed(self.stderr_tail):
            if line.strip() and not line.startswith(" "):
                return line.strip()
        return ""


def run_training_worker(
    config: TrainConfig | str | os.PathLike,
    resume: bool = True,
    overwrite: bool = False,
    on_event: Callable[[WorkerEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    poll_s: float = 0.1,
    cancel_timeout_s: float = 900.0,
    python: str | None = None,
    env: dict[str, str] | None = None,
    stderr_log: str | os.PathLike | None = None,
    launch: Launch | None = None,
    on_stderr: Callable[[str], None] | None = None,
) -> WorkerResult:
    """Train `config` (a TrainConfig or a YAML path) in a worker process; see the module docstring.

    `should_cancel` is polled every `poll_s` seconds; `cancel_timeout_s` bounds the wait for the
    checkpoint after a cancel before the worker is killed. `launch`: several processes under
    torchrun (training.launch; this machine must hold rank 0, the one that reports). `on_stderr`
    receives each line the worker writes on stderr."""
    if launch is not None and not launch.reports:
        raise TrainingError(f"node rank {launch.node_rank} does not report: only machine 0 follows a run's events")
    worker = TrainingWorker(config, resume, overwrite, python, env, stderr_log, launch, on_stderr).start()
    history: list[dict[str, Any]] = []
    memory: list[str] = []
    start: WorkerEvent | None = None
    end: WorkerEvent | None = None
    pending: BaseException | None = None  # raised by on_event: re-raised once the worker stopped
    cancelled_at: float | None = None
    killed = False
    try:
        while True:
            if not worker.cancel_sent and should_cancel is not None and should_cancel():
                worker.cancel()
            if worker.cancel_sent:
                cancelled_at = cancelled_at or time.monotonic()
                if not killed and time.monotonic() - cancelled_at > cancel_timeout_s:
                    worker.kill()
                    killed = True
            try:
                ev = worker.next_event(timeout=poll_s)
            except queue.Empty:
                continue
            if ev is None:
                break
            if ev.event == Event.START:
                start = ev
                if ev.raw.get("protocol") != PROTOCOL_VERSION:
                    raise TrainingError(f"training worker speaks protocol {ev.raw.get('protocol')}, "
                                        f"expected {PROTOCOL_VERSION}: the pack's files are from different versions")
            elif ev.event == Event.STEP:
                history.append(ev.history_entry())
            elif ev.event == Event.MEMORY and ev.message:
                memory.append(ev.message)
            elif ev.event in END_EVENTS:
                end = ev
            if on_event is not None and pending is None:
                try:
                    on_event(ev)
                except BaseException as e:  # ComfyUI's interrupt arrives here: checkpoint first
                    pending = e
                    worker.cancel()
        rc = worker.wait()
    except BaseException:
        # KeyboardInterrupt / a protocol error: stop the worker with a checkpoint, then go on raising.
        worker.cancel()
        try:
            worker.wait(timeout=cancel_timeout_s)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker.close()
        raise
    worker.close()
    if pending is not None:
        raise pending
    if end is None:
        detail = worker.last_stderr_line()
        first = launcher_failure(worker.stderr_tail) if worker.launch is not None else None
        if killed:
            how = f"did not stop within {cancel_timeout_s:.0f} s of the cancel and was killed"
        elif first is not None:  # several processes: torchrun's summary says which one failed first
            how = f"ended: {first.describe()},"
            detail = "; ".join(worker.rank_errors) or detail
        elif rc < 0:
            how = f"was killed by signal {-rc}" + (" (out of system memory?)" if rc == -9 else "")
        else:
            how = f"exited with code {rc}"
        raise TrainingError(f"the training worker {how} without a result"
                            + (f"; its last message: {detail}" if detail else ""))
    if rc != 0 and end.event != Event.ERROR and worker.launch is not None:
        # the run ended (its event says how) but torchrun reported a failure: keep what it said
        first = launcher_failure(worker.stderr_tail)
        log.warning("torchrun exited with code %d after the run's %s event%s", rc, end.event,
                    f": {first.describe()}" if first is not None else "; " + " | ".join(list(worker.stderr_tail)[-5:]))
    if end.event == Event.ERROR:
        message = end.message or f"training failed (worker exit code {rc})"
        detail = worker.failure_detail()
        raise TrainingError(f"{message} ({detail})" if detail else message)
    return _result(end, start, history, rc, memory)


def _result(end: WorkerEvent, start: WorkerEvent | None, history: list[dict[str, Any]], rc: int,
            memory: list[str]) -> WorkerResult:
    lora = end.lora or {}
    sentences = [f"{m[0].upper()}{m[1:]}{'' if m.endswith('.') else '.'}" for m in memory if m]
    message = " ".join(m for m in ((start.message if start else None), *sentences, end.message) if m)
    path = lambda p: Path(p) if p else None  # noqa: E731
    return WorkerResult(
        status=end.status or end.event, step=int(end.step or 0), total=int(end.total or 0),
        action=(start.action if start else "") or "", run_dir=Path(end.run_dir or ""), checkpoint=path(end.checkpoint),
        triplet_path=path(lora.get("triplet")), relation_path=path(lora.get("relation")), message=message,
        history=read_history(end.history, history) if end.history else history, returncode=rc, memory=memory,
    )
