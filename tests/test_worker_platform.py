"""The training worker on the user's machine: its own allocator settings, no console window on
Windows, a checkpoint when the console closes (as far as Windows allows), paths with spaces and
non-ASCII user names."""

from __future__ import annotations

import threading
import time

from dreamrelation_core.data.cache import Encoders, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.lora.files import load_lora_file
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.fallback import OOM_SEAM_ENV
from dreamrelation_core.training.trainer import list_checkpoints
from dreamrelation_core.training.worker import (
    CTRL_BREAK_EVENT,
    CTRL_C_EVENT,
    CTRL_CLOSE_EVENT,
    StopRequest,
    console_event_handler,
)
from dreamrelation_core.training.worker_client import run_training_worker


def test_worker_environment_has_its_own_allocator_settings():
    from dreamrelation_core.training.worker_client import worker_environment

    parent = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync", "OTHER": "x"}
    linux = worker_environment(parent, "linux")
    assert linux["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and linux["OTHER"] == "x"
    assert parent["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"  # the parent's own is untouched
    # other settings are kept; a parent's expandable_segments:False does not win
    kept = worker_environment({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:False"}, "linux")
    assert kept["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512,expandable_segments:True"
    newer = worker_environment({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync,max_split_size_mb:64"}, "linux")
    assert newer["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:64,expandable_segments:True"
    # Windows has no expandable segments: only the inherited backend goes
    win = worker_environment(parent, "win32")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in win and win["PYTHONUNBUFFERED"] == "1"


def test_worker_process_has_no_console_window_on_windows():
    from dreamrelation_core.training.worker_client import _process_options

    flags = _process_options("win32")["creationflags"]
    assert flags & 0x08000000 and flags & 0x00000200  # CREATE_NO_WINDOW, CREATE_NEW_PROCESS_GROUP
    assert _process_options("linux") == {}


def test_console_close_asks_for_a_checkpoint_and_waits_for_it():
    stop = StopRequest()
    stop.parent_pid = None
    handle = console_event_handler(stop, stop.finished, wait_s=5.0)
    assert handle(CTRL_C_EVENT) is False and handle(CTRL_BREAK_EVENT) is False  # the signal handlers' business
    assert not stop()
    threading.Timer(0.3, stop.finished.set).start()  # the checkpoint is written 0.3 s later
    t0 = time.monotonic()
    assert handle(CTRL_CLOSE_EVENT) is True
    waited = time.monotonic() - t0
    assert stop() and stop.reason == "the console window was closed"
    assert 0.2 < waited < 4.0  # held open until the checkpoint, not the full wait


def test_worker_under_a_path_with_spaces_and_a_non_ascii_user_name_reports_its_memory_plan(tmp_path):
    """Dataset, cache, run folder and worker log under 'C:/Users/Jörg Müller/...'-like folders, through the
    worker process the Train node runs; the first attempt runs out of memory (the fallback's test seam):
    the report states the options before step 1, then the retry."""
    import os

    home = tmp_path / "Users" / "Jörg Müller-Łukasz 山田" / "My Documents"
    data = write_synthetic_dataset(home / "relation data", num_videos=1, num_frames=7, size=(32, 32))
    cache = home / "relation data" / "encoded cache"
    prepare_dataset(data, cache, Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32), max_text_len=16)
    run = home / "runs" / "hände schütteln"
    config = TrainConfig(cache_dir=str(cache), output_dir=str(run), num_steps=2, warmup_steps=1, checkpoint_every=1,
                         rank=2, alpha=2.0, device="cpu", save_dtype="fp32")
    events = []
    result = run_training_worker(config, stderr_log=home / "logs" / "worker log.txt", on_event=events.append,
                                 env={**os.environ, OOM_SEAM_ENV: "1"})
    assert result.status == "finished" and result.step == 2 and result.run_dir == run
    assert [int(p.stem.split("_")[-1]) for p in list_checkpoints(run)] == [1, 2]
    assert load_lora_file(result.relation_path).weights  # readable from under that path
    assert (home / "logs" / "worker log.txt").is_file()

    memory = [e for e in events if e.event == "memory"]
    assert [e.retry for e in memory] == [False, True, False]
    assert memory[2].options == {"base_dtype": "fp32", "blocks_to_swap": 0, "gradient_checkpointing": True,
                                 "offload_activations": False, "shard_base": False}
    first_step = next(i for i, e in enumerate(events) if e.event == "step")
    assert events.index(memory[-1]) < first_step  # stated before step 1
    assert result.memory == [e.message for e in memory]
    assert ("Memory options: fp32 no-ckpt (on the CPU: no GPU memory estimate). Out of GPU memory at step 1 with "
            "fp32 no-ckpt: retrying with gradient checkpointing on") in result.message
