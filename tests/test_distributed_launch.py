"""Training in several processes under torchrun, as a user starts it: `train CONFIG --nproc 2` from
the command line, the worker client (what the ComfyUI node calls) cancelling and resuming, a killed
process. CPU processes joined with gloo, one thread each, on the tiny model (each run starts
torchrun and two workers: about 10-15 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamrelation_core.data.cache import Encoders, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.errors import TrainingError
from dreamrelation_core.fileio import is_temp_file
from dreamrelation_core.lora.files import load_lora_file
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.launch import Launch, check_devices, launcher_failure, torchrun_command
from dreamrelation_core.training.protocol import Action, Event, Status, read_history
from dreamrelation_core.training.runs import execute, plan_run
from dreamrelation_core.training.trainer import list_checkpoints, load_checkpoint
from dreamrelation_core.training.worker_client import WorkerEvent, run_training_worker

ROOT = Path(__file__).resolve().parents[1]
TWO = Launch(nproc=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch_data")
    data = write_synthetic_dataset(root / "data", num_videos=2, num_frames=7, size=(32, 32))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7,
                    (32, 32), max_text_len=16)
    return root / "cache"


@pytest.fixture
def one_thread(monkeypatch):
    """Each training process on one CPU thread (the processes share the machine's cores)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cfg(cache: Path, run: Path, **kw) -> TrainConfig:
    base = dict(cache_dir=str(cache), output_dir=str(run), num_steps=4, warmup_steps=1, checkpoint_every=2, rank=2,
                alpha=2.0, device="cpu", save_dtype="fp32", keep_checkpoints=0, batch_size=2)
    return TrainConfig(**{**base, **kw})


def steps_of(path: Path) -> list[int]:
    return [int(p.stem.split("_")[-1]) for p in list_checkpoints(path)]


def test_train_nproc_2_from_the_command_line_is_the_one_process_run(cache, tmp_path, one_thread):
    """As a user types it: two processes write one run folder whose losses and LoRA equal the
    one-process run's at the same global batch."""
    config = cfg(cache, tmp_path / "two").save_yaml(tmp_path / "run.yaml")
    r = subprocess.run([sys.executable, "-m", "dreamrelation_core", "train", str(config), "--nproc", "2",
                        "--progress", "none"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Starting a new run" in r.stdout and "finished at step 4" in r.stdout, r.stdout
    run = tmp_path / "two"
    assert steps_of(run) == [2, 4] and (run / "relation_only.safetensors").is_file()
    assert not [p for p in run.rglob("*") if is_temp_file(p)]
    two = read_history(run)
    one = execute(plan_run(cfg(cache, tmp_path / "one"), resume=True))  # the same run in this process
    assert [h["step"] for h in two] == [1, 2, 3, 4]
    for a, b in zip(two, one.history):
        assert a["branch"] == b["branch"]
        for k in ("total", "mse", "masked", "rcl"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6, nan_ok=True), (a, b)
    wa, wb = load_lora_file(run / "relation_triplet.safetensors"), load_lora_file(one.triplet_path)
    for ad in wa.adapters:
        for p, (a, b) in wa.weights[ad].items():
            torch.testing.assert_close(a, wb.weights[ad][p][0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(b, wb.weights[ad][p][1], rtol=1e-4, atol=1e-6)


def test_cancel_through_the_client_stops_both_processes_at_one_checkpoint_and_resume_continues(
        cache, tmp_path, one_thread):
    run = tmp_path / "run"
    events: list[WorkerEvent] = []
    result = run_training_worker(cfg(cache, run, num_steps=500, checkpoint_every=100), on_event=events.append,
                                 should_cancel=lambda: sum(e.event == Event.STEP for e in events) >= 2, launch=TWO)
    k = result.step
    assert result.status == Status.CANCELLED and k >= 2 and "cancel requested" in result.message
    # torchrun's own exit code is not asserted: once in CI (a loaded machine) it was 1 after a clean
    # cancel (every other run here gave 0; cause not found). What a user gets is asserted: the
    # cancelled event, one checkpoint at the agreed step, and the resume below.
    assert steps_of(run) == [k] and result.checkpoint == run / "checkpoints" / f"checkpoint_{k:06d}.pt"
    assert [e.event for e in events].count(Event.START) == 1  # rank 0 alone speaks
    assert [e.step for e in events if e.event == Event.STEP] == list(range(1, k + 1))
    # refused by rank 0's plan (resume off on an existing run): the others, waiting for a plan, end quietly
    t0 = time.monotonic()
    with pytest.raises(TrainingError) as err:
        run_training_worker(cfg(cache, run, num_steps=k + 2), resume=False, launch=TWO)
    assert str(err.value).startswith(f"{run} already holds a run (step {k} of 500)"), str(err.value)
    assert "rank 1" not in str(err.value) and time.monotonic() - t0 < 120
    # resume on two processes: rank 0 reads the checkpoint and hands its state to rank 1
    events.clear()
    again = run_training_worker(cfg(cache, run, num_steps=k + 2, checkpoint_every=100), on_event=events.append,
                                launch=TWO)
    assert events[0].action == Action.RESUME and events[0].step == k
    assert again.status == Status.FINISHED and again.step == k + 2 and steps_of(run) == [k, k + 2]
    assert [h["step"] for h in again.history] == list(range(1, k + 3))
    assert load_checkpoint(again.checkpoint)["step"] == k + 2


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_process_stops_the_others_with_one_readable_error(cache, tmp_path, one_thread):
    run = tmp_path / "run"
    launcher: list[int] = []

    def on_event(ev: WorkerEvent) -> None:
        if ev.event == Event.START:
            launcher.append(ev.raw["pid"])
        if ev.event == Event.STEP and ev.step == 3:  # rank 1: a sibling of rank 0 under torchrun
            torchrun = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(launcher[0])], capture_output=True,
                                          text=True).stdout)
            victim = next(p for p in _children(torchrun) if _rank_of(p) == 1)
            os.kill(victim, signal.SIGKILL)

    t0 = time.monotonic()
    with pytest.raises(TrainingError) as err:
        run_training_worker(cfg(cache, run, num_steps=500, checkpoint_every=2), on_event=on_event, launch=TWO)
    message = str(err.value)
    assert "another training process stopped" in message and "rank 1" in message and "SIGKILL" in message, message
    assert "\n" not in message and "Traceback" not in message and len(message) < 700, message
    assert time.monotonic() - t0 < 120  # torchrun ended the rest: nobody waits for the dead one
    # nothing half-written: every checkpoint left is whole, and resume continues from the newest
    assert steps_of(run) and not [p for p in run.rglob("*") if is_temp_file(p)]
    for p in list_checkpoints(run):
        load_checkpoint(p)
    assert plan_run(cfg(cache, run, num_steps=500, checkpoint_every=2), resume=True).step == steps_of(run)[-1]


def test_launch_options_and_device_checks():
    cmd = torchrun_command("dreamrelation_core.training.worker", ["c.yaml", "--control", "stdin"], TWO, "py")
    assert "torch.distributed.run" in cmd and "--nproc-per-node=2" in cmd and "--standalone" in cmd
    tail = cmd[cmd.index("--no-python") + 1:]  # each process: the worker module, by our bootstrap
    assert tail[0] == "py" and "dreamrelation_core.training.worker" in tail and tail[-3:] == ["c.yaml", "--control",
                                                                                             "stdin"]
    two_nodes = Launch(2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600)
    args = two_nodes.torchrun_args()
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29600"} <= set(args)
    assert "--standalone" not in args and not two_nodes.reports and two_nodes.world_size == 4
    for bad, says in ((Launch(0), "--nproc"), (Launch(2, nnodes=2), "--master-addr"),
                      (Launch(2, nnodes=2, node_rank=2, master_addr="h"), "--node-rank must be 0 to 1")):
        with pytest.raises(TrainingError, match=says):
            bad.validate()
    check_devices("cpu", 4, cuda_count=0, platform="linux")  # gloo processes on the CPU: allowed
    check_devices("cuda", 1, cuda_count=0)  # one process: nothing to check here
    with pytest.raises(TrainingError, match="has 1 CUDA GPU"):
        check_devices("cuda", 2, cuda_count=1, platform="linux")
    with pytest.raises(TrainingError, match="has 2 CUDA GPU"):
        check_devices("auto", 4, cuda_count=2, platform="linux")
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        check_devices("cuda", 2, cuda_count=0, platform="linux")
    with pytest.raises(TrainingError, match="names one GPU"):
        check_devices("cuda:0", 2, cuda_count=2)
    with pytest.raises(TrainingError, match="NCCL, which PyTorch does not ship for Windows"):
        check_devices("cuda", 2, cuda_count=2, platform="win32")
    check_devices("cpu", 2, cuda_count=0, platform="win32")
    summary = ["Root Cause (first observed failure):", "[0]:", "  host      : localhost",
               "  rank      : 1 (local_rank: 1)", "  exitcode  : -9 (pid: 28950)  (SIGKILL)"]
    first = launcher_failure(summary)
    assert (first.rank, first.exitcode, first.signal) == (1, -9, "SIGKILL") and launcher_failure(["no"]) is None


def test_train_refuses_an_uneven_global_batch_before_starting_processes(tmp_path, capsys, monkeypatch):
    from dreamrelation_core.cli import main
    from dreamrelation_core.training import launch
    from dreamrelation_core.training.config import TrainConfig

    started = []
    monkeypatch.setattr(launch, "torchrun_command", lambda *a, **k: started.append(a))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), batch_size=3, device="cpu")
    cfg.save_yaml(tmp_path / "c.yaml")
    assert main(["train", str(tmp_path / "c.yaml"), "--nproc", "2"]) == 1
    assert "batch_size 3 cannot be shared by 2 processes" in capsys.readouterr().err
    assert not started and not (tmp_path / "run").exists()
    launch.check_batch(4, 2)
    launch.check_batch(3, 1)
