"""The out-of-memory fallback: at step 1 the run steps down the memory ladder, one rung per retry,
from the last good state, says so, and stops with a clear message at the bottom.

The out-of-memory errors are real `torch.OutOfMemoryError`s raised just before the first step
through the fallback's test seam (DREAMRELATION_TEST_OOM_ATTEMPTS); everything else - the tiny
Mochi, the trainer, block swap, offload, the worker process - is the real code on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamrelation_core.data.cache import Encoders, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.errors import TrainingError
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.fallback import OOM_SEAM_ENV, execute_with_fallback
from dreamrelation_core.training.memory.policy import memory_advice, next_rung, user_fixed
from dreamrelation_core.training.memory.setup import MemoryOptions
from dreamrelation_core.training.runs import plan_run
from dreamrelation_core.training.trainer import list_checkpoints, load_checkpoint
from dreamrelation_core.training.worker import describe_failure


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fallback_data")
    data = write_synthetic_dataset(root / "data", num_videos=1, num_frames=7, size=(32, 32))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32),
                    max_text_len=16)
    return root / "cache"


def cfg(cache: Path, run: Path, **kw) -> TrainConfig:
    base = dict(cache_dir=str(cache), output_dir=str(run), num_steps=3, warmup_steps=1, checkpoint_every=2, rank=2,
                alpha=2.0, device="cpu", save_dtype="fp32", keep_checkpoints=0)
    return TrainConfig(**{**base, **kw})


def losses(result) -> list[float]:
    return [h["total"] for h in result.history]


# ---------------------------------------------------------------------------------------------
# the ladder itself


def walk(options: MemoryOptions, fixed: set[str], blocks: int) -> list[str]:
    out = []
    while (rung := next_rung(options, fixed, blocks)) is not None:
        options, _ = rung
        out.append(options.label())
    return out


def test_ladder_order_and_fixed_options_are_kept():
    start = MemoryOptions("bf16", 0, False, False)
    assert walk(start, set(), 48) == [
        "bf16 ckpt", "fp8 ckpt", "fp8 ckpt swap12", "fp8 ckpt swap24", "fp8 ckpt swap36", "fp8 ckpt swap48",
        "fp8 ckpt swap48 offload"]
    # what the user fixed never moves: here the dtype and the swap count
    assert walk(start, {"base_dtype", "blocks_to_swap"}, 48) == ["bf16 ckpt", "bf16 ckpt offload"]
    # from the middle: auto had already chosen swap 30 -> the next quarter above it
    assert walk(MemoryOptions("fp8", 30, True, False), set(), 48)[:2] == ["fp8 ckpt swap36", "fp8 ckpt swap48"]
    assert walk(MemoryOptions("fp8", 48, True, True), set(), 48) == []  # the bottom
    assert user_fixed(TrainConfig(blocks_to_swap=4, offload_activations=False)) == {"blocks_to_swap",
                                                                                   "offload_activations"}


def test_advice_names_only_options_the_node_and_the_cli_share():
    advice = memory_advice(MemoryOptions("bf16", 4, False, False), {"blocks_to_swap"}, 48)
    for text in ("gradient_checkpointing on", "base_dtype fp8", "blocks_to_swap above 4 (up to 48)",
                 "offload_activations on", "--blocks-to-swap", "--offload-activations", "set it to auto"):
        assert text in advice, (text, advice)
    # never "on" for an option that is still auto (the old message said "gradient_checkpointing on" for 'auto')
    msg = describe_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
                           TrainConfig(rank=32), (12, 11, 60, 106), step=0)
    assert msg.startswith("out of GPU memory at step 1 (clips of 61 frames at 480x848, rank 32, base_dtype auto, "
                          "blocks_to_swap auto, gradient_checkpointing auto, offload_activations auto)")
    assert "Tried to allocate 2.00 GiB" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# walking it in a real run (CPU)


def test_out_of_memory_at_step_1_walks_the_ladder_and_trains_what_an_uninterrupted_run_trains(
        cache, tmp_path, monkeypatch):
    plain = execute_with_fallback(plan_run(cfg(cache, tmp_path / "plain"), resume=False))

    monkeypatch.setenv(OOM_SEAM_ENV, "4")  # the first four attempts run out of memory before step 1
    chosen, retries = [], []
    result = execute_with_fallback(plan_run(cfg(cache, tmp_path / "run"), resume=False),
                                   on_memory=lambda c: chosen.append(c.options.label()),
                                   on_retry=lambda msg, _o: retries.append(msg))
    # CPU auto starts at fp32 without checkpointing; the tiny model has 2 blocks: 1 then 2 swapped
    assert chosen == ["fp32 no-ckpt", "fp32 ckpt", "fp32 ckpt swap1", "fp32 ckpt swap2", "fp32 ckpt swap2 offload"]
    assert len(retries) == 4 and retries[0].startswith("Out of GPU memory at step 1 with fp32 no-ckpt: retrying with "
                                                       "gradient checkpointing on (fp32 ckpt), from the start.")
    assert "offloaded" in retries[-1]
    assert result.status == "finished" and result.step == 3
    # each retry started from the start: the same steps as the run that never ran out
    assert losses(result) == losses(plain)
    saved = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["config"]
    assert (saved["blocks_to_swap"], saved["gradient_checkpointing"], saved["offload_activations"]) == (2, True, True)


def test_resumed_run_retries_from_its_last_checkpoint(cache, tmp_path, monkeypatch):
    def first_two_steps(run: Path) -> Path:
        execute_with_fallback(plan_run(cfg(cache, run, num_steps=2), resume=False))
        return run

    whole = execute_with_fallback(plan_run(cfg(cache, first_two_steps(tmp_path / "whole"), num_steps=4), resume=True))
    run = first_two_steps(tmp_path / "run")
    monkeypatch.setenv(OOM_SEAM_ENV, "1")
    retries = []
    result = execute_with_fallback(plan_run(cfg(cache, run, num_steps=4), resume=True),
                                   on_retry=lambda msg, _o: retries.append(msg))
    assert retries == ["Out of GPU memory at step 3 with fp32 no-ckpt: retrying with gradient checkpointing on "
                       "(fp32 ckpt), from the last checkpoint."]
    assert result.step == 4 and losses(result) == losses(whole)


def test_bottom_of_the_ladder_stops_with_a_clear_message_and_leaves_nothing(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(OOM_SEAM_ENV, "99")
    with pytest.raises(TrainingError) as e:
        execute_with_fallback(plan_run(cfg(cache, tmp_path / "run"), resume=False))
    msg = str(e.value)
    assert msg.startswith("out of GPU memory at step 1 with fp32 ckpt swap2 offload at the bottom of the memory "
                          "ladder (tried: gradient checkpointing on; 1 of 2 blocks swapped")
    assert "fewer frames or a smaller size" in msg and "a lower rank" in msg and "injected" in msg
    assert not (tmp_path / "run").exists()


def test_fixed_options_are_not_changed(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(OOM_SEAM_ENV, "1")
    config = cfg(cache, tmp_path / "run", blocks_to_swap=0, gradient_checkpointing=False, offload_activations=False)
    with pytest.raises(TrainingError, match=r"with fp32 no-ckpt: try gradient_checkpointing on, .*gradient_checkpointing, "
                                            r"offload_activations are fixed: set them to auto"):
        execute_with_fallback(plan_run(config, resume=False))


# ---------------------------------------------------------------------------------------------
# before free memory is read


@pytest.mark.parametrize("base", ["mochi", "wan"])
def test_warm_up_runs_one_block_and_leaves_the_model_as_it_was(base):
    from dreamrelation_core.mochi import tiny as mochi_tiny
    from dreamrelation_core.training.memory.warmup import warm_up_block
    from dreamrelation_core.wan import tiny as wan_tiny

    model = (mochi_tiny if base == "mochi" else wan_tiny).tiny_transformer(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    block = model.transformer_blocks[0] if base == "mochi" else model.blocks[0]
    block.register_forward_hook(lambda *a: calls.append(1))  # the copy keeps the hook
    warm_up_block(model, "cpu", autocast=True)
    assert calls == [1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_train_command_walks_the_same_ladder_and_keeps_its_fixed_flags(cache, tmp_path, monkeypatch, capsys):
    from dreamrelation_core.cli import main

    monkeypatch.setenv(OOM_SEAM_ENV, "1")
    path = cfg(cache, tmp_path / "run", num_steps=1).save_yaml(tmp_path / "config.yaml")
    assert main(["train", str(path), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert ("memory options: fp32 no-ckpt (on the CPU: no GPU memory estimate)\nOut of GPU memory at step 1 with fp32 "
            "no-ckpt: retrying with gradient checkpointing on (fp32 ckpt), from the start.\nmemory options: fp32 ckpt") in out
    assert "finished at step 1" in out

    # the same request with the flags fixing every option: nothing to step down, the message says what is fixed
    assert main(["train", str(path), "--progress", "none", "--output-dir", str(tmp_path / "fixed"),
                 "--blocks-to-swap", "0", "--gradient-checkpointing", "off", "--offload-activations", "off"]) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory at step 1 with fp32 no-ckpt: try gradient_checkpointing on" in err
    assert "blocks_to_swap, gradient_checkpointing, offload_activations are fixed" in err
