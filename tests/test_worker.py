"""Training in a worker process (`python -m dreamrelation_core.training.worker`), for real:
tiny model, prepared synthetic data, the client the ComfyUI node calls. Each test starts 1-2
workers (about 5 s each, mostly importing diffusers)."""

from __future__ import annotations

import json
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
from dreamrelation_core.lora.files import load_lora_file
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.runs import execute, plan_run
from dreamrelation_core.training.trainer import list_checkpoints
from dreamrelation_core.training.worker import describe_failure
from dreamrelation_core.training.worker_client import WorkerEvent, run_training_worker, worker_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("worker_data")
    data = write_synthetic_dataset(root / "data", num_videos=1, num_frames=7, size=(32, 32))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32),
                    max_text_len=16)
    return root / "cache"


def cfg(cache: Path, run: Path, **kw) -> TrainConfig:
    base = dict(cache_dir=str(cache), output_dir=str(run), num_steps=5, warmup_steps=1, checkpoint_every=2, rank=2,
                alpha=2.0, device="cpu", save_dtype="fp32", keep_checkpoints=0)
    return TrainConfig(**{**base, **kw})


def steps_of(path: Path) -> list[int]:
    return [int(p.stem.split("_")[-1]) for p in list_checkpoints(path)]


class Interrupt(Exception):
    """Stands for ComfyUI's InterruptProcessingException, raised from the progress update."""


def test_worker_streams_events_and_trains_what_in_process_trains(cache, tmp_path):
    events: list[WorkerEvent] = []
    result = run_training_worker(cfg(cache, tmp_path / "w"), resume=True, on_event=events.append)
    kinds = [e.event for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert events[0].action == "new" and "No run found" in events[0].message and events[0].total == 5
    steps = [e for e in events if e.event == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5] and all(e.total == 5 for e in steps)
    assert all(set(e.losses) == {"total", "mse", "masked", "rcl"} for e in steps)
    assert all(e.it_s > 0 and e.eta_s >= 0 and e.lr is not None and e.branch for e in steps)
    assert [e.step for e in events if e.event == "checkpoint"] == [2, 4, 5]
    assert all(Path(e.checkpoint).is_file() for e in events if e.event == "checkpoint")
    done = events[-1]
    assert done.status == "finished" and Path(done.lora["relation"]).is_file() and Path(done.lora["triplet"]).is_file()
    assert result.status == "finished" and result.step == 5 and result.returncode == 0 and result.action == "new"
    assert result.relation_path == tmp_path / "w" / "relation_only.safetensors" and len(result.history) == 5
    # the same run in this process: the same losses, the same LoRA
    local = execute(plan_run(cfg(cache, tmp_path / "p"), resume=True))
    for a, b in zip(result.history, local.history):
        assert a["branch"] == b["branch"]
        for k in ("total", "mse", "masked"):
            assert a[k] == pytest.approx(b[k], rel=1e-5)
    wa, wb = load_lora_file(result.triplet_path), load_lora_file(local.triplet_path)
    for ad in wa.adapters:
        for p, (a, b) in wa.weights[ad].items():
            torch.testing.assert_close(a, wb.weights[ad][p][0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(b, wb.weights[ad][p][1], rtol=1e-4, atol=1e-6)


def test_interrupt_from_the_progress_update_checkpoints_the_current_step_then_resume_continues(cache, tmp_path):
    run = tmp_path / "run"
    seen: list[int] = []

    def on_event(ev: WorkerEvent) -> None:  # as ComfyUI: the interrupt is raised from the progress update
        if ev.event == "step":
            seen.append(ev.step)
            if ev.step == 3:
                raise Interrupt("interrupted")

    with pytest.raises(Interrupt):
        run_training_worker(cfg(cache, run, num_steps=500, checkpoint_every=100), on_event=on_event)
    k = steps_of(run)[-1]
    assert steps_of(run) == [k] and 3 <= k < 100  # written by the cancel, at the step reached: nothing lost
    assert (run / "relation_only.safetensors").is_file()
    events: list[WorkerEvent] = []
    result = run_training_worker(cfg(cache, run, num_steps=k + 2, checkpoint_every=100), on_event=events.append)
    assert events[0].action == "resume" and events[0].step == k
    assert f"num_steps: 500 -> {k + 2}" in result.message and f"at step {k} of {k + 2}" in result.message
    assert [e.step for e in events if e.event == "step"] == [k + 1, k + 2]
    assert result.status == "finished" and result.step == k + 2
    assert [h["step"] for h in result.history] == list(range(1, k + 3))  # history.json spans both sessions


def test_should_cancel_returns_a_cancelled_result(cache, tmp_path):
    steps: list[int] = []
    result = run_training_worker(
        cfg(cache, tmp_path / "run", num_steps=500, checkpoint_every=100),
        on_event=lambda ev: steps.append(ev.step) if ev.event == "step" else None,
        should_cancel=lambda: len(steps) >= 2,
    )
    assert result.status == "cancelled" and result.returncode == 3
    assert result.step >= 2 and result.checkpoint.name == f"checkpoint_{result.step:06d}.pt"
    assert result.checkpoint.is_file() and result.relation_path.is_file()
    assert "cancel requested" in result.message and f"resume continues from step {result.step}" in result.message


@pytest.mark.skipif(os.name != "posix", reason="kills a process with SIGKILL")
def test_worker_stops_with_a_checkpoint_when_its_parent_dies(cache, tmp_path):
    run = tmp_path / "run"
    path = cfg(cache, run, num_steps=1000, checkpoint_every=1000).save_yaml(tmp_path / "cfg.yaml")
    parent = (
        "import sys, time\n"
        "from dreamrelation_core.training.worker_client import TrainingWorker\n"
        "w = TrainingWorker(sys.argv[1], resume=False).start()\n"
        "print(w.proc.pid, flush=True)\n"
        "while True:\n"
        "    ev = w.next_event()\n"
        "    if ev is not None and ev.event == 'step' and ev.step >= 2:\n"
        "        print('running', flush=True)\n"
        "        time.sleep(600)\n"
    )
    mid = subprocess.Popen([sys.executable, "-c", parent, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker_pid = int(mid.stdout.readline())
    assert mid.stdout.readline().strip() == "running"
    mid.send_signal(signal.SIGKILL)  # no chance to clean up: the worker's stdin and stdout just close
    mid.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.2)
    assert not _alive(worker_pid), "the orphaned worker kept running"
    assert steps_of(run) and steps_of(run)[-1] >= 2  # stopped with a checkpoint of the step it reached
    assert (run / "relation_only.safetensors").is_file()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"  # an unreaped zombie has exited
    except (FileNotFoundError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_errors_are_one_line_events_and_leave_no_run_folder(cache, tmp_path):
    # bad data: through the raw command line, to see exactly what is on stdout
    path = cfg(tmp_path / "no_cache", tmp_path / "run").save_yaml(tmp_path / "cfg.yaml")
    r = subprocess.run(worker_command(path, resume=True), cwd=tmp_path, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    events = [json.loads(line) for line in r.stdout.splitlines()]  # every stdout line is an event
    assert r.returncode == 1 and [e["event"] for e in events] == ["start", "error"]
    assert "no_cache" in events[1]["message"] and "prepare" in events[1]["message"] and "\n" not in events[1]["message"]
    assert "Traceback" not in r.stdout and not (tmp_path / "run").exists()


def test_non_finite_loss_is_the_callers_error(cache, tmp_path):
    with pytest.raises(TrainingError, match=r"step 2: loss term 'total' is (nan|inf).*lower learning_rate") as e:
        run_training_worker(cfg(cache, tmp_path / "run", learning_rate=1e30, warmup_steps=0))
    assert "\n" not in str(e.value) and "no checkpoint had been written yet" in str(e.value)
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint: nothing left behind


def test_out_of_memory_message_names_the_settings_and_what_to_lower():
    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\nmore")
    msg = describe_failure(e, TrainConfig(rank=32, gradient_checkpointing=False), (12, 11, 60, 106), step=4)
    assert msg.startswith("out of GPU memory at step 5 (clips of 61 frames at 480x848, rank 32, base_dtype auto, "
                          "blocks_to_swap auto, gradient_checkpointing off")
    for advice in ("frames", "size", "rank", "blocks_to_swap", "gradient_checkpointing on"):
        assert advice in msg
    assert "Tried to allocate 2.00 GiB" in msg and "\n" not in msg
