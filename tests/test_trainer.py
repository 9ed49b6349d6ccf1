"""Trainer on the synthetic clip: learning, exact resume, checkpoints, errors, GUI hooks."""

import math

import pytest
import torch

from dreamrelation_core.data.cache import Encoders, load_prepared, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.lora.files import load_lora_file
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.trainer import (
    Trainer,
    TrainingError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    lr_factor,
)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    data = write_synthetic_dataset(root / "data", num_videos=2, num_frames=13, size=(32, 32))
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 13, (32, 32), max_text_len=16)
    return load_prepared(root / "cache")


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), num_steps=12, warmup_steps=2, checkpoint_every=4, rank=4,
                alpha=4.0, learning_rate=5e-3, device="cpu", save_dtype="fp32", keep_checkpoints=0)
    base.update(kw)
    return TrainConfig(**base)


def losses(history):
    nan_free = lambda v: None if math.isnan(v) else v  # noqa: E731  (nan != nan)
    return [(h["branch"], h["total"], h["mse"], h["masked"], nan_free(h["rcl"])) for h in history]


def test_lr_schedule():
    assert lr_factor(0, 200, 3000) == 0.0
    assert lr_factor(100, 200, 3000) == 0.5
    assert lr_factor(200, 200, 3000) == 1.0
    assert lr_factor(1600, 200, 3000) == pytest.approx(0.5)
    assert lr_factor(3000, 200, 3000) == pytest.approx(0.0)


def test_training_lowers_masked_loss(tmp_path, clips):
    tr = Trainer(config(tmp_path, num_steps=60, warmup_steps=5, rank=8, alpha=8.0, checkpoint_every=100), clips=clips)
    before = tr.evaluate()
    result = tr.train()
    after = tr.evaluate()
    assert result.status == "finished" and result.step == 60
    assert after["masked"] < 0.98 * before["masked"], (before, after)
    # every branch was drawn and RCL was computed from the second step on
    assert {h["branch"] for h in result.history} == set(triplet.BRANCHES)
    assert math.isnan(result.history[0]["rcl"]) and not any(math.isnan(h["rcl"]) for h in result.history[1:])


def test_resume_reproduces_uninterrupted_run(tmp_path, clips):
    full = Trainer(config(tmp_path / "a"), clips=clips).train()
    part = Trainer(config(tmp_path / "b"), clips=clips)
    part.train(max_steps=6)  # "interrupted" after step 6; last periodic checkpoint at 4, final at 6
    assert [int(p.stem.split("_")[-1]) for p in list_checkpoints(tmp_path / "b" / "run")] == [4, 6]
    resumed = Trainer.resume(tmp_path / "b" / "run", clips=clips)
    assert resumed.step == 6
    result = resumed.train()
    assert losses(result.history) == losses(full.history)  # bit for bit, step for step
    # resuming from the older checkpoint (step 4) gives the same too
    again = Trainer.resume(tmp_path / "b" / "run", clips=clips, checkpoint=list_checkpoints(tmp_path / "b" / "run")[0])
    assert again.step == 4 and losses(again.train().history) == losses(full.history)
    a, b = load_lora_file(full.triplet_path), load_lora_file(result.triplet_path)
    for ad in a.adapters:
        for p in a.weights[ad]:
            assert torch.equal(a.weights[ad][p][1], b.weights[ad][p][1])


def test_checkpoint_contents_and_pruning(tmp_path, clips):
    tr = Trainer(config(tmp_path, keep_checkpoints=2), clips=clips)
    tr.train()
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["checkpoint_000008.pt", "checkpoint_000012.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 12 and state["config"]["rank"] == 4
    assert {"optimizer", "scheduler", "rng", "rcl", "lora", "history"} <= set(state)
    assert len(state["rcl"]["positive"]["entries"]) == 10  # bank full after 12 steps
    assert {k.split(".")[-2] for k in state["lora"]} == {"relation", "subject1", "subject2", "ffn"}
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    with pytest.raises(TrainingError, match="not a DreamRelation training checkpoint"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "bogus.pt")
        load_checkpoint(tmp_path / "bogus.pt")


def test_inactive_adapters_untouched_each_step(tmp_path, clips):
    tr = Trainer(config(tmp_path, num_steps=8), clips=clips)
    for _ in range(8):
        before = {n: p.detach().clone() for n, p in triplet.lora_parameters(tr.model)}
        branch, _ = tr.train_step()
        active = set(triplet.BRANCH_ADAPTERS[branch])
        for n, p in triplet.lora_parameters(tr.model):
            if n.split(".")[-2] not in active:
                assert torch.equal(p, before[n]), (branch, n)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, clips):
    tr = Trainer(config(tmp_path), clips=clips)
    tr.train(max_steps=4)
    good = latest_checkpoint(tmp_path / "run")
    with torch.no_grad():  # the ffn adapter is active on every branch
        triplet.lora_parameters(tr.model, "ffn")[0][1].fill_(float("inf"))
    with pytest.raises(TrainingError, match=r"step 5: loss term 'total' is (nan|inf)"):
        tr.train()
    assert latest_checkpoint(tmp_path / "run") == good
    assert load_checkpoint(good)["step"] == 4


def test_progress_and_cancel(tmp_path, clips):
    seen = []
    result = Trainer(config(tmp_path), clips=clips).train(
        progress=seen.append, should_cancel=lambda: len(seen) >= 3
    )
    assert result.status == "cancelled" and result.step == 3
    assert [i.step for i in seen] == [1, 2, 3] and seen[0].num_steps == 12
    assert set(seen[1].losses) == {"total", "mse", "masked", "rcl"} and seen[1].eta > 0 and seen[2].step_time > 0
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint_000003.pt"  # a cancel loses nothing
    assert result.relation_path.exists()


def test_resume_walks_back_past_unreadable_checkpoints(tmp_path, clips, caplog):
    Trainer(config(tmp_path, num_steps=4, checkpoint_every=2), clips=clips).train()
    newest = list_checkpoints(tmp_path / "run")[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    with caplog.at_level("WARNING", logger="dreamrelation"):
        resumed = Trainer.resume(tmp_path / "run", clips=clips)
    assert resumed.step == 2 and "checkpoint_000004.pt: skipped" in caplog.text
    assert newest.exists()  # left in place: runs sets broken files aside, the Python API only reads
    for c in list_checkpoints(tmp_path / "run"):
        c.write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="none of its 2 checkpoint"):
        Trainer.resume(tmp_path / "run", clips=clips)


def test_bad_inputs(tmp_path, clips):
    with pytest.raises(TrainingError, match="no training clips"):
        Trainer(config(tmp_path), clips=[])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer.resume(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="transformer_config"):
        f = tmp_path / "mochi.safetensors"
        f.write_bytes(b"x")
        Trainer(config(tmp_path, transformer=str(f)), clips=clips)


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, clips):
    """Extending a run (num_steps 6 -> 12) or changing its learning rate: the first resumed step
    uses the new schedule's rate, not the rate the old schedule saved (0 at its last step)."""
    Trainer(config(tmp_path, num_steps=6), clips=clips).train()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    longer = Trainer(config(tmp_path, num_steps=12, learning_rate=1e-2), clips=clips)
    longer.load_state_dict(ckpt)
    assert longer.step == 6
    assert [g["lr"] for g in longer.optimizer.param_groups] == [1e-2 * lr_factor(6, 2, 12)]
    # unchanged settings: exactly the rate the checkpoint saved
    same = Trainer(config(tmp_path / "same", num_steps=12), clips=clips)
    same.train(max_steps=6)
    saved = load_checkpoint(latest_checkpoint(tmp_path / "same" / "run"))
    again = Trainer(config(tmp_path / "same", num_steps=12), clips=clips)
    again.load_state_dict(saved)
    assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in saved["optimizer"]["param_groups"]]
