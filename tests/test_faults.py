"""Fault injection on real training runs (tiny model, 6 steps, a checkpoint every step): kill -9 at
random moments and in the middle of checkpoint writes (several trials, fixed seed), two trainers on
one folder, Ctrl+C in `resume`, a broken newest checkpoint, a full disk during a checkpoint write.
After each fault the run is resumed to its end, and its LoRA must be bit-identical to the LoRA of
an uninterrupted run: nothing lost, nothing mixed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamrelation_core.cli import main
from dreamrelation_core.data.cache import Encoders, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.errors import DiskFullError
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.lock import LOCK_FILE
from dreamrelation_core.training.runs import run_training
from dreamrelation_core.training.trainer import TRIPLET_FILE, list_checkpoints
from fixtures.faults import fill_disk

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
SEED = 1234  # of the fault schedule
pytestmark = pytest.mark.skipif(os.name != "posix", reason="kills processes with SIGKILL / SIGINT")

# `train --resume` in a child that kills itself (SIGKILL: no cleanup) after `budget` bytes of its
# checkpoint writes: a kill in the middle of a checkpoint write, at a chosen byte.
DIE_IN_WRITE = """
import os, signal, sys
from dreamrelation_core import fileio
from dreamrelation_core.cli import main

budget = [int(sys.argv[2])]
real = fileio._open_for_write

class Dying:
    def __init__(self, f):
        self._f = f
    def write(self, data):
        data = bytes(data)
        if len(data) >= budget[0]:
            self._f.write(data[:budget[0]])
            self._f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        budget[0] -= len(data)
        return self._f.write(data)
    def __getattr__(self, name):
        return getattr(self._f, name)

fileio._open_for_write = lambda p: Dying(real(p)) if ".checkpoint_" in p.name else real(p)
sys.exit(main(["train", sys.argv[1], "--resume", "--progress", "none"]))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_data")
    data = write_synthetic_dataset(root / "data", num_videos=1, num_frames=7, size=(32, 32))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32),
                    max_text_len=16)
    return root / "cache"


def cfg(cache: Path, run: Path, **kw) -> TrainConfig:
    base = dict(cache_dir=str(cache), output_dir=str(run), num_steps=STEPS, warmup_steps=1, checkpoint_every=1,
                rank=2, alpha=2.0, device="cpu", save_dtype="fp32", keep_checkpoints=2, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> tuple[dict[str, torch.Tensor], int]:
    """The LoRA of a run that nothing interrupted, and the size of one of its checkpoints."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    _, result = run_training(cfg(cache, run))
    assert result.status == "finished" and result.step == STEPS
    return load_file(run / TRIPLET_FILE), list_checkpoints(run)[-1].stat().st_size


def assert_same_lora(run: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(run / TRIPLET_FILE)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "the resumed run's LoRA differs"


def finish(cache: Path, run: Path, expected: dict[str, torch.Tensor]) -> str:
    """Resume in this process to the end; the LoRA equals the uninterrupted one; nothing left over."""
    plan, result = run_training(cfg(cache, run), resume=True)
    assert result.step == STEPS and result.status in ("finished", "already finished")
    assert_same_lora(run, expected)
    assert not list(run.rglob("*.tmp")) and not (run / LOCK_FILE).exists()
    return plan.report()


def _child(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_kill_9_at_random_moments_and_inside_checkpoint_writes(cache, uninterrupted, tmp_path):
    expected, ckpt_size = uninterrupted
    rng = random.Random(SEED)
    trials = [("write", rng.randrange(1, STEPS * ckpt_size)) for _ in range(2)] + [("moment", rng.uniform(0, 1.5))]
    for i, (kind, where) in enumerate(trials):
        run = tmp_path / f"trial{i}"
        path = cfg(cache, run).save_yaml(tmp_path / f"trial{i}.yaml")
        if kind == "write":  # dies `where` bytes into its checkpoint writes (write number where // size)
            proc = _child(["-c", DIE_IN_WRITE, str(path), str(where)])
        else:  # killed from outside, `where` seconds after its first checkpoint
            proc = _child(["-m", "dreamrelation_core", "train", str(path), "--resume", "--progress", "none"])
            deadline = time.monotonic() + 120
            while not list_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(where)
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
        # a write kill always happens (the offset lies inside the run's checkpoint bytes); a kill
        # from outside may come after the run ended
        assert proc.returncode == -signal.SIGKILL or (kind == "moment" and proc.returncode == 0), err[-2000:]
        report = finish(cache, run, expected)
        if kind == "write":
            assert "taken over" in report and "Removed 1 temporary file(s) left by interrupted writes" in report


def test_two_trainers_on_one_folder(cache, uninterrupted, tmp_path, capsys):
    expected, _ = uninterrupted
    run = tmp_path / "run"
    first = _child(["-m", "dreamrelation_core", "train", str(cfg(cache, run).save_yaml(tmp_path / "a.yaml")),
                    "--progress", "none"])
    deadline = time.monotonic() + 120
    while not (run / LOCK_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    other = str(cfg(cache, run, seed=7).save_yaml(tmp_path / "b.yaml"))
    for flags in (["--resume"], ["--overwrite"], []):  # refused at once, whatever the flags
        assert main(["train", other, "--progress", "none", *flags]) == 1
        assert f"in use by another training run (PID {first.pid} " in capsys.readouterr().err
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-2000:]
    assert_same_lora(run, expected)  # the first run, unmixed
    assert TrainConfig.load_yaml(run / "config.yaml").seed == 0


def test_ctrl_c_in_resume_checkpoints_the_current_step(cache, uninterrupted, tmp_path):
    expected, _ = uninterrupted
    run = tmp_path / "run"
    run_training(cfg(cache, run), max_steps=1)
    proc = _child(["-m", "dreamrelation_core", "resume", str(run), "--progress", "none"])
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "checkpoint_000002.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    last = max(int(p.stem.split("_")[-1]) for p in list_checkpoints(run))
    assert f"stopped (signal SIGINT): checkpoint checkpoint_{last:06d}.pt written at step {last}" in out
    assert 2 <= last < STEPS
    assert json.loads((run / "history.json").read_text())[-1]["step"] == last  # history written too
    finish(cache, run, expected)


def test_broken_newest_checkpoint(cache, uninterrupted, tmp_path):
    expected, _ = uninterrupted
    run = tmp_path / "run"
    run_training(cfg(cache, run), max_steps=4)
    newest = run / "checkpoints" / "checkpoint_000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    report = finish(cache, run, expected)
    assert "Skipped checkpoint_000004.pt" in report and "Resuming run run at step 3" in report
    assert (run / "checkpoints" / "checkpoint_000004.pt.broken").is_file()


def test_full_disk_during_a_checkpoint_write(cache, uninterrupted, tmp_path, monkeypatch):
    expected, ckpt_size = uninterrupted
    run = tmp_path / "run"
    fill_disk(monkeypatch, limit=ckpt_size // 3, when=lambda p: p.name.startswith(".checkpoint_000003.pt."))
    with pytest.raises(DiskFullError, match=r"checkpoint_000003\.pt: not written, the disk is full"):
        run_training(cfg(cache, run))
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint_000001.pt", "checkpoint_000002.pt"]
    monkeypatch.undo()  # space freed
    finish(cache, run, expected)
