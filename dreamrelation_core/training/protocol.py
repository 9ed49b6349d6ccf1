"""The worker protocol in one place: event names, the cancel command, exit codes, run statuses and
the history file. `worker` (the process) and `worker_client` (the parent) both speak it; the CLI,
`runs`, the trainer and the ComfyUI Train node use its names instead of bare strings.

Light on purpose (no torch): the client and the nodes import it before any model loads. The wire
format (each event's keys) is described in `worker`'s docstring.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..fileio import write_text

PROTOCOL_VERSION = 1  # the "protocol" key of the start event; the client refuses another version

# The module the parent starts as the worker: `python -m dreamrelation_core.training.worker`.
WORKER_MODULE = "dreamrelation_core.training.worker"


class Event:
    """The "event" value of each line the worker writes on stdout."""

    START = "start"  # the plan (an Action: new / resume / finished), before the model loads
    MEMORY = "memory"  # the memory options chosen before step 1; again for each out-of-memory retry
    STEP = "step"  # after every step: losses, lr, speed
    CHECKPOINT = "checkpoint"  # after every checkpoint written
    DONE = "done"  # the run ended normally (status: Status.FINISHED, STOPPED or ALREADY_FINISHED)
    CANCELLED = "cancelled"  # the run stopped on a cancel, with a checkpoint at the current step
    ERROR = "error"  # the run failed: one readable line


EVENTS = (Event.START, Event.MEMORY, Event.STEP, Event.CHECKPOINT, Event.DONE, Event.ERROR, Event.CANCELLED)
END_EVENTS = (Event.DONE, Event.CANCELLED, Event.ERROR)  # the last event of a run: one of these

CANCEL_COMMAND = "cancel"  # the line the parent writes on the worker's stdin to stop the run with a checkpoint


class Exit:
    """The worker process's exit codes."""

    OK = 0  # a "done" event
    ERROR = 1  # an "error" event
    USAGE = 2  # bad command line (the code argparse uses too): no event at all
    CANCELLED = 3  # a "cancelled" event


class Status:
    """How a run ended: `TrainResult.status`, the "status" of the done event, `WorkerResult.status`."""

    FINISHED = "finished"  # reached num_steps
    STOPPED = "stopped"  # stopped early by max_steps (a caller's limit), checkpoint and LoRA files written
    ALREADY_FINISHED = "already finished"  # the run had reached num_steps before: nothing trained
    CANCELLED = "cancelled"  # a cancel or a signal: checkpoint at the current step (if any step ran)


STATUSES = (Status.FINISHED, Status.STOPPED, Status.ALREADY_FINISHED, Status.CANCELLED)


class Action:
    """What a request does with its run folder: `RunPlan.action`, the "action" of the start event,
    `WorkerResult.action`."""

    NEW = "new"  # no run there (or overwrite): train from step 0
    RESUME = "resume"  # continue the run from its newest readable checkpoint
    FINISHED = "finished"  # the run had reached num_steps: nothing to train, its LoRA files handed back


ACTIONS = (Action.NEW, Action.RESUME, Action.FINISHED)

# ---------------------------------------------------------------------------------------------
# the history file

HISTORY_FILE = "history.json"  # in the run folder: one entry per step (step, branch, lr, loss terms)


def write_history(run_dir: str | os.PathLike, history: Iterable[dict[str, Any]]) -> Path:
    """`<run_dir>/history.json`, atomically; NaN losses written as null (JSON has no NaN)."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items()} for h in history]
    return write_text(Path(run_dir) / HISTORY_FILE, json.dumps(clean))


def read_history(path: str | os.PathLike, fallback: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """A history file's entries, null read back as NaN; `fallback` when it is missing or unreadable.
    `path` is the file or the run folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return list(fallback)
    if not isinstance(data, list):
        return list(fallback)
    return [{k: (math.nan if v is None else v) for k, v in h.items()} for h in data if isinstance(h, dict)]
