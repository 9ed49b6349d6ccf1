"""The run folder: its lock, one resume path for `train --resume` and `resume DIR`, walking back
past unreadable checkpoints, overwrite without reading them, stray names, temporary files of
killed writes, run.json, and the worker's temporary config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dreamrelation_core.cli import main
from dreamrelation_core.data.cache import Encoders, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.errors import RunLockedError, TrainingError
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.lock import LOCK_FILE, RunLock
from dreamrelation_core.training.runs import plan_run, run_training
from dreamrelation_core.training.trainer import list_checkpoints
from dreamrelation_core.training.worker_client import remove_stale_configs, run_training_worker, write_temp_config

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time\nfrom dreamrelation_core.training.lock import RunLock\n"
          "lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_folder_data")
    data = write_synthetic_dataset(root / "data", num_videos=1, num_frames=7, size=(32, 32))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32),
                    max_text_len=16)
    return root / "cache"


def cfg(cache: Path, run: Path, **kw) -> TrainConfig:
    base = dict(cache_dir=str(cache), output_dir=str(run), num_steps=4, warmup_steps=1, checkpoint_every=1, rank=2,
                alpha=2.0, device="cpu", save_dtype="fp32", keep_checkpoints=0)
    return TrainConfig(**{**base, **kw})


def steps(run: Path) -> list[int]:
    return [int(p.stem.split("_")[-1]) for p in list_checkpoints(run)]


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run (killed at the end)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# the lock


def test_second_trainer_refuses_at_once_naming_the_holder_then_takes_over_a_dead_one(cache, holder, capsys):
    run, proc = holder
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(RunLockedError, match=rf"{run} is in use by another training run \(PID {proc.pid} on host "
                                             r".+, running since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d; lock file .*"
                                             r"\.dreamrelation\.lock\)\. Wait for it to finish or stop it"):
        run_training(cfg(cache, run), resume=True)
    assert sorted(p.name for p in run.iterdir()) == before == [LOCK_FILE]  # nothing touched
    assert main(["train", str(cfg(cache, run).save_yaml(run.parent / "c.yaml")), "--resume", "--progress", "none"]) == 1
    assert f"PID {proc.pid}" in capsys.readouterr().err
    os.kill(proc.pid, signal.SIGKILL)  # the holder dies without releasing: its lock is stale
    proc.wait()
    plan, result = run_training(cfg(cache, run), resume=True)
    assert result.status == "finished" and plan.report().startswith(
        f"The run folder's lock was held by PID {proc.pid} on host ")
    assert "no longer running: taken over" in plan.report()
    assert not (run / LOCK_FILE).exists()  # released when the run ended


def test_the_worker_and_train_node_report_the_lock_the_same_way(cache, holder):
    run, proc = holder
    before = set(Path(tempfile.gettempdir()).glob(f"dreamrelation_train_{os.getpid()}_*.yaml"))
    with pytest.raises(TrainingError, match=rf"is in use by another training run \(PID {proc.pid} on host"):
        run_training_worker(cfg(cache, run))  # what the Train node calls; it raises this message as it is
    # the temporary config handed to the worker is gone (the worker deleted it once read)
    assert set(Path(tempfile.gettempdir()).glob(f"dreamrelation_train_{os.getpid()}_*.yaml")) == before


def test_lock_is_released_on_every_exit_and_removes_a_folder_it_made(tmp_path):
    run = tmp_path / "new_run"
    with pytest.raises(ZeroDivisionError):
        with RunLock(run):
            assert (run / LOCK_FILE).is_file()
            with RunLock(run):  # re-entrant in the holding thread
                pass
            assert (run / LOCK_FILE).is_file()
            raise ZeroDivisionError("a failing run")
    assert not run.exists()
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_dir_is_train_resume(cache, tmp_path, capsys):
    run = tmp_path / "run"
    run_training(cfg(cache, run, num_steps=4), max_steps=2)
    assert steps(run) == [1, 2] and len(json.loads((run / "history.json").read_text())) == 2
    assert main(["resume", str(run), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Resuming run run at step 2 of 4 (checkpoint checkpoint_000002.pt).") and "finished at step 4" in out
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [1, 2, 3, 4]  # history written
    assert main(["resume", str(run), "--progress", "none"]) == 0
    assert "already finished at step 4" in capsys.readouterr().out


def test_resume_walks_back_past_broken_checkpoints_and_keeps_them_aside(cache, tmp_path, capsys):
    run = tmp_path / "run"
    run_training(cfg(cache, run, num_steps=6), max_steps=4)
    ck = run / "checkpoints"
    (ck / "checkpoint_000004.pt").write_bytes((ck / "checkpoint_000004.pt").read_bytes()[:1000])  # truncated
    (ck / "checkpoint_000003.pt").write_bytes(os.urandom(5000))  # garbage
    (ck / "checkpoint_000040 copy.pt").write_bytes(b"a copy the user made")
    plan = plan_run(cfg(cache, run, num_steps=6), resume=True)
    text = plan.report()
    assert plan.step == 2 and "Resuming run run at step 2 of 6 (checkpoint checkpoint_000002.pt)" in text
    assert "Skipped checkpoint_000004.pt, which cannot be read" in text and "kept aside as checkpoint_000004.pt.broken" in text
    assert "Skipped checkpoint_000003.pt" in text and "weights_only" not in text  # torch's advice is not passed on
    assert "Ignored 1 file(s) in checkpoints/ that are not checkpoint_<step>.pt: 'checkpoint_000040 copy.pt'" in text
    assert main(["resume", str(run), "--progress", "none"]) == 0
    assert "finished at step 6" in capsys.readouterr().out
    names = sorted(p.name for p in ck.iterdir())
    assert "checkpoint_000004.pt.broken" in names and "checkpoint_000003.pt.broken" in names
    assert steps(run)[-1] == 6 and "checkpoint_000040 copy.pt" in names


def test_overwrite_never_reads_old_checkpoints(cache, tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "checkpoint_000040.pt").write_bytes(b"garbage")
    (ck / "checkpoint_000040 copy.pt").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match=r"none of its 1 checkpoint\(s\) can be read.*train --overwrite"):
        plan_run(cfg(cache, run), resume=True)
    plan, result = run_training(cfg(cache, run), overwrite=True)
    assert plan.report().startswith("Replacing the run at step 40") and result.status == "finished"
    assert steps(run) == [1, 2, 3, 4]


def test_temporary_files_of_killed_writes_are_removed_at_the_next_start(cache, tmp_path):
    run = tmp_path / "run"
    run_training(cfg(cache, run), max_steps=2)
    (run / "checkpoints" / ".checkpoint_000003.pt.abcd1234.tmp").write_bytes(b"\0" * 3000)
    (run / ".history.json.zz99yy88.tmp").write_text("[")
    plan, _ = run_training(cfg(cache, run), resume=True)
    assert "Removed 2 temporary file(s) left by interrupted writes (2.9 KiB)" in plan.report()
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("content, why", [('{"identity": 5}', "has no valid identity"),
                                          ("{garbage", "is unreadable (JSONDecodeError"),
                                          (None, "is missing")])
def test_malformed_run_json_is_a_reported_fallback(cache, tmp_path, content, why):
    run = tmp_path / "run"
    run_training(cfg(cache, run), max_steps=1)
    if content is None:
        (run / "run.json").unlink()
    else:
        (run / "run.json").write_text(content)
    plan = plan_run(cfg(cache, run), resume=True)
    assert f"run.json {why}" in plan.report() and "compared by path instead of by content" in plan.report()
    with pytest.raises(TrainingError, match="cache_dir: saved"):  # by path now: another folder is refused
        plan_run(cfg(cache, run, cache_dir=str(tmp_path / "elsewhere")), resume=True)


def test_temporary_worker_configs_of_dead_parents_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"dreamrelation_train_{int(dead.stdout)}_abc123.yaml"
    stale.write_text("num_steps: 1\n")
    mine = write_temp_config(TrainConfig(), tmp_path)
    assert mine.name.startswith(f"dreamrelation_train_{os.getpid()}_") and not stale.exists()
    assert remove_stale_configs(tmp_path) == [] and mine.exists()  # this process lives: kept
