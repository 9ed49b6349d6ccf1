"""Data parallel on the CPU with gloo: 2 processes are the same run as 1 process at the same global
batch (losses, LoRA weights and files, contrastive banks), resume across process counts, a stop
request on one process stopping all of them at one step with one checkpoint."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dreamrelation_core.data.cache import load_prepared
from dreamrelation_core.training import distributed
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.trainer import RELATION_FILE, Trainer, list_checkpoints, load_checkpoint
from fixtures.distributed import lora_state, prepare_tiny_cache, run_processes, run_settings, train_job

STEPS = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepare_tiny_cache(tmp_path_factory.mktemp("ddp"))


def settings(out, **kw) -> dict:
    return run_settings(out, STEPS, **kw)


def losses(history) -> torch.Tensor:
    return torch.tensor([[h[k] if h[k] is not None and not math.isnan(h[k]) else 0.0
                          for k in ("total", "mse", "masked", "rcl")] for h in history])


def assert_same_run(history, lora, rcl, ref: Trainer) -> None:
    assert [h["branch"] for h in history] == [h["branch"] for h in ref.history]
    torch.testing.assert_close(losses(history), losses(ref.history), rtol=1e-5, atol=1e-6)
    ref_lora = lora_state(ref)
    assert lora.keys() == ref_lora.keys()
    for name, value in lora.items():
        torch.testing.assert_close(value, ref_lora[name], rtol=1e-5, atol=1e-6, msg=name)
    for bank in ("positive", "negative"):
        mine, theirs = rcl[bank]["entries"], ref.rcl.state_dict()[bank]["entries"]
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def report(folder, rank):
    state = torch.load(folder / f"rank{rank}.pt", weights_only=True)
    return state, json.loads((folder / f"rank{rank}.json").read_text())


def test_two_processes_are_the_one_process_run(tmp_path, cache):
    torch.set_num_threads(1)
    clips = load_prepared(cache)
    # the one-process reference, stopped at step 3 once (a checkpoint) and continued to the end
    ref = Trainer(TrainConfig(**settings(tmp_path / "one")), clips=clips)
    ref.train(max_steps=3)
    ckpt3 = list_checkpoints(tmp_path / "one")[-1]
    ref.train()
    assert ref.step == STEPS

    runs = [
        # A: the whole run on 2 processes
        dict(config=settings(tmp_path / "two"), cache=str(cache), report=str(tmp_path / "rep_two")),
        # B: 2 processes stop at step 3 (continued below on 1 process)
        dict(config=settings(tmp_path / "two_part"), cache=str(cache), report=str(tmp_path / "rep_part"),
             max_steps=3),
        # C: the 1-process checkpoint at step 3 continued on 2 processes
        dict(config=settings(tmp_path / "one_then_two"), cache=str(cache), report=str(tmp_path / "rep_c"),
             resume=str(ckpt3)),
        # D: process 1 alone asks to stop after step 2
        dict(config=settings(tmp_path / "cancel"), cache=str(cache), report=str(tmp_path / "rep_d"),
             cancel_at=[1, 2]),
    ]
    run_processes(2, train_job, runs)

    # A: equal to the reference, and both processes hold the same weights and banks
    s0, r0 = report(tmp_path / "rep_two", 0)
    s1, _ = report(tmp_path / "rep_two", 1)
    assert_same_run(r0["history"], s0["lora"], s0["rcl"], ref)
    for name in s0["lora"]:
        assert torch.equal(s0["lora"][name], s1["lora"][name]), name
    # the LoRA file rank 0 wrote is the reference's
    mine, theirs = load_file(tmp_path / "two" / RELATION_FILE), load_file(tmp_path / "one" / RELATION_FILE)
    assert mine.keys() == theirs.keys()
    for name, t in theirs.items():
        torch.testing.assert_close(mine[name], t, rtol=1e-5, atol=1e-6, msg=name)

    # B: 2 processes -> 1 process continues the same run
    part = list_checkpoints(tmp_path / "two_part")
    assert [p.name for p in part] == ["checkpoint_000003.pt"]
    cont = Trainer(TrainConfig(**settings(tmp_path / "two_part")), clips=clips)
    cont.load_state_dict(load_checkpoint(part[-1]))
    cont.train()
    assert_same_run(cont.history, lora_state(cont), cont.rcl.state_dict(), ref)

    # C: 1 process -> 2 processes continues the same run
    sc, rc = report(tmp_path / "rep_c", 0)
    assert sc["step"] == STEPS
    assert_same_run(rc["history"], sc["lora"], sc["rcl"], ref)

    # D: the stop reached both processes at the same step; one checkpoint, at that step
    for rank in (0, 1):
        state, rep = report(tmp_path / "rep_d", rank)
        assert state["step"] == 2 and rep["status"] == "cancelled"
    assert [p.name for p in list_checkpoints(tmp_path / "cancel")] == ["checkpoint_000002.pt"]


def test_global_batch_must_split_evenly():
    w = distributed.World(rank=1, size=2)
    assert distributed.share(4, w) == slice(2, 4)
    with pytest.raises(distributed.TrainingError, match="batch_size 3 cannot be split over 2 processes"):
        distributed.share(3, w)


def test_single_process_collectives_are_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.gather_rows(x) is x
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.world() == distributed.World()
