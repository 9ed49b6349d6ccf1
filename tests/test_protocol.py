"""The worker protocol module: the history file's round trip, statuses named in one place, and the
worker's own entry point (`python -m dreamrelation_core.training.worker`) and its exit codes."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from dreamrelation_core.training import protocol, worker
from dreamrelation_core.training.protocol import (
    ACTIONS,
    EVENTS,
    HISTORY_FILE,
    STATUSES,
    WORKER_MODULE,
    Action,
    Event,
    Exit,
    Status,
    read_history,
    write_history,
)
from dreamrelation_core.training.worker_client import worker_command

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("dreamrelation_core", "nodes") for p in (ROOT / d).rglob("*.py")]


def test_history_round_trip_keeps_nan(tmp_path):
    history = [{"step": 1, "branch": "relation", "lr": 1e-4, "total": 0.5, "rcl": math.nan},
               {"step": 2, "branch": "triplet", "lr": 1e-4, "total": math.nan, "rcl": 0.25}]
    path = write_history(tmp_path, history)
    assert path == tmp_path / HISTORY_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))  # strict JSON: NaN written as null
    assert raw[0]["rcl"] is None and raw[1]["total"] is None and raw[1]["rcl"] == 0.25
    assert "NaN" not in path.read_text(encoding="utf-8")
    for where in (tmp_path, path):  # the run folder or the file itself
        back = read_history(where)
        assert [h["step"] for h in back] == [1, 2] and back[0]["branch"] == "relation"
        assert math.isnan(back[0]["rcl"]) and math.isnan(back[1]["total"]) and back[0]["total"] == 0.5
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file left


def test_history_missing_or_unreadable_gives_the_fallback(tmp_path):
    fallback = [{"step": 7, "total": 1.0}]
    assert read_history(tmp_path / "nothing" / HISTORY_FILE, fallback) == fallback
    assert read_history(tmp_path) == []
    (tmp_path / HISTORY_FILE).write_text("[{\"step\": 1", encoding="utf-8")  # cut short
    assert read_history(tmp_path, fallback) == fallback
    (tmp_path / HISTORY_FILE).write_text("{\"step\": 1}", encoding="utf-8")  # not a list
    assert read_history(tmp_path, fallback) == fallback


def _constants(cls) -> dict[str, str]:
    return {k: v for k, v in vars(cls).items() if k.isupper()}


def test_statuses_and_events_are_named_once_and_used_by_name():
    assert set(STATUSES) == set(_constants(Status).values()) and len(STATUSES) == 4
    assert set(EVENTS) == set(_constants(Event).values()) and len(EVENTS) == 7
    assert set(ACTIONS) == set(_constants(Action).values()) and len(ACTIONS) == 3
    used: set[str] = set()
    actions: set[str] = set()
    literal = re.compile(r"""(status|event|action)\s*(==|!=|in)\s*\(?\s*["']""")
    plan_literal = re.compile(r"""RunPlan\(\s*["']""")
    for path in SOURCES:
        if path.name == "protocol.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not literal.search(text), f"{path.relative_to(ROOT)} compares a status / event / action with a string"
        assert not plan_literal.search(text), f"{path.relative_to(ROOT)} makes a RunPlan with a bare action string"
        used |= set(re.findall(r"\bStatus\.([A-Z_]+)", text))
        actions |= set(re.findall(r"\bAction\.([A-Z_]+)", text))
    # every status the code can take is a documented one, and each documented one is taken somewhere
    assert used == set(_constants(Status)), used
    assert actions == set(_constants(Action)), actions
    worker_doc = worker.__doc__
    for status in (Status.FINISHED, Status.STOPPED, Status.ALREADY_FINISHED):  # the done event's statuses
        assert f'"{status}"' in worker_doc
    for event in EVENTS:
        assert f'"event": "{event}"' in worker_doc
    assert protocol.CANCEL_COMMAND == "cancel" and (Exit.OK, Exit.ERROR, Exit.CANCELLED) == (0, 1, 3)


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_worker_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", WORKER_MODULE, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == Exit.OK and "--control" in r.stdout and "--remove-config" in r.stdout
    r = subprocess.run([sys.executable, "-m", WORKER_MODULE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == Exit.USAGE and r.stdout == ""
    # a bad config, through the parent's own command line (run from elsewhere: the bootstrap finds the pack)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_steps: [1, 2\n", encoding="utf-8")
    cmd = worker_command(bad, resume=True)
    assert WORKER_MODULE in cmd and "--progress" not in cmd
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    events = _events(r.stdout)
    assert r.returncode == Exit.ERROR, r.stderr[-2000:]
    assert [e["event"] for e in events] == [Event.ERROR] and "bad.yaml" in events[0]["message"], events


def test_worker_arguments():
    from dreamrelation_core.training.worker import parse_arguments

    assert parse_arguments(["c.yaml", "--control", "stdin", "--resume", "--output-dir=out", "--remove-config"]) == {
        "config_path": "c.yaml", "control": "stdin", "resume": True, "output_dir": "out", "remove_config": True}
    assert parse_arguments(["c.yaml"]) == {"config_path": "c.yaml", "control": "none"}
    for bad, says in ((["c.yaml", "--control", "pipe"], "--control"), ([], "CONFIG"), (["a", "b"], "'b'"),
                      (["c.yaml", "--output-dir"], "needs a value"), (["c.yaml", "--progress", "jsonl"], "--progress")):
        try:
            parse_arguments(bad)
        except ValueError as e:
            assert says in str(e), (bad, e)
        else:
            raise AssertionError(f"{bad} accepted")
