"""The frozen base sharded over the ranks (shard_base, FSDP2) on the CPU with gloo: the same
gradients as the whole model, 1/N of the block weights per rank; the estimator's per-rank share
against the meta trace; the option's checks and the `memory --nproc` command."""

from __future__ import annotations

import math

import pytest
import torch

from dreamrelation_core.cli import main
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.memory.estimate import MochiDims, estimate, fastest_fitting
from dreamrelation_core.training.memory.setup import MemoryOptions
from dreamrelation_core.training.memory.trace import trace_step
from dreamrelation_core.training.memory.wan_dims import WanDims
from fixtures.distributed import prepare_tiny_cache, run_processes, run_settings
from fixtures.sharding import gradients_job, train_job

CASES = [("mochi", "fp8", True), ("wan", "bf16", False)]
STEPS = 4


def test_sharded_base_gives_the_same_gradients_and_holds_one_nth(tmp_path):
    """FSDP2 on a tiny Mochi (fp8 storage, gradient checkpointing) and Wan (bf16): the LoRA
    gradients of the sharded model are the whole model's; each rank stores half the blocks."""
    run_processes(2, gradients_job, str(tmp_path), CASES)
    from dreamrelation_core.training.memory.shard import ShardInfo

    with torch.serialization.safe_globals([ShardInfo]):  # weights-only loading, our one plain dataclass allowed
        ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for case, results in zip(CASES, zip(*ranks)):
        for plain, sharded in results:
            assert sharded["loss"] == pytest.approx(plain["loss"], abs=1e-6), case
            assert sharded["grads"].keys() == plain["grads"].keys() and len(plain["grads"]) > 0, case
            for n, g in plain["grads"].items():
                assert torch.allclose(sharded["grads"][n], g, atol=1e-6, rtol=1e-5), (case, n)
            assert sharded["lora_plain"], "the LoRA weights stay whole on every rank (ignored by FSDP)"
            info, blocks = sharded["info"], sharded["blocks"]
            assert info.world_size == 2 and info.blocks == 3 and blocks["sharded"] > 0
            assert blocks["local"] == info.local_bytes and blocks["full"] == info.full_bytes
            assert abs(blocks["local"] / blocks["full"] - 0.5) < 0.02, (case, blocks)
            assert plain["blocks"]["sharded"] == 0 and plain["info"] is None
            # what the estimator counts: the block computing and at most one more gathered
            assert 1 <= sharded["in_flight"] <= 2, sharded["in_flight"]
        # the two ranks' shards together are the whole blocks (dim 0 split, padded to even)
        total = results[0][1]["blocks"]["local"] + results[1][1]["blocks"]["local"]
        assert results[0][1]["blocks"]["full"] <= total < 1.02 * results[0][1]["blocks"]["full"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepare_tiny_cache(tmp_path_factory.mktemp("shard"))


def settings(out, **kw) -> dict:
    return run_settings(out, STEPS, **kw)


def assert_same(history, lora, ref_history, ref_lora) -> None:
    def terms(h):
        return torch.tensor([[0.0 if x is None or math.isnan(x) else x for x in (s["total"], s["mse"], s["masked"], s["rcl"])]
                             for s in h])

    assert [h["branch"] for h in history] == [h["branch"] for h in ref_history]
    torch.testing.assert_close(terms(history), terms(ref_history), rtol=1e-5, atol=1e-6)
    assert lora.keys() == ref_lora.keys()
    for name, value in lora.items():
        torch.testing.assert_close(value, ref_lora[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_sharded_training_is_the_same_run_and_resumes_on_one_process(tmp_path, cache):
    from dreamrelation_core.data.cache import load_prepared
    from dreamrelation_core.training.trainer import Trainer, list_checkpoints
    from fixtures.distributed import lora_state

    torch.set_num_threads(1)
    clips = load_prepared(cache)
    ref = Trainer(TrainConfig(**settings(tmp_path / "one")), clips=clips)  # one process, the same global batch
    ref.train()
    # the sharded run with gradient checkpointing (its recompute gathers each block again)
    runs = [dict(name="sharded", config=settings(tmp_path / "sharded", shard_base=True, gradient_checkpointing=True),
                 cache=str(cache)),
            dict(name="whole", config=settings(tmp_path / "whole", shard_base=False), cache=str(cache)),
            dict(name="part", config=settings(tmp_path / "part", shard_base=True), cache=str(cache), max_steps=2)]
    run_processes(2, train_job, str(tmp_path), runs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        sharded, whole = rank["sharded"], rank["whole"]
        assert sharded["shard_base"] and not whole["shard_base"] and "sharded over 2 processes" in sharded["summary"]
        # each process stores half of the frozen block weights; without sharding all of them
        assert abs(sharded["blocks"]["local"] / sharded["blocks"]["full"] - 0.5) < 0.02, sharded["blocks"]
        assert whole["blocks"]["local"] == whole["blocks"]["full"] == sharded["blocks"]["full"]
        assert_same(sharded["history"], sharded["lora"], whole["history"], whole["lora"])
        for term, value in whole["evaluate"].items():  # the no-grad evaluation forward, sharded
            assert sharded["evaluate"][term] == pytest.approx(value, rel=1e-5, abs=1e-7), term
        assert_same(sharded["history"], sharded["lora"], ref.history, lora_state(ref))
    # the sharded run stopped at step 2 continues on one process (shard_base: true is ignored there)
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["checkpoint_000002.pt"]
    cont = Trainer.resume(tmp_path / "part", clips=clips)
    assert cont.config.shard_base is True and not cont.memory.options.shard_base
    assert "shard_base: true ignored" in cont.memory.summary()
    cont.train()
    assert cont.step == STEPS
    assert_same(cont.history, lora_state(cont), ref.history, lora_state(ref))


@pytest.mark.parametrize("options,world", [
    (MemoryOptions("bf16", 0, True, shard_base=True), 2),
    (MemoryOptions("fp8", 0, True, True, shard_base=True), 4),
], ids=["bf16-ckpt-2", "fp8-offload-4"])
def test_sharded_estimate_matches_meta_trace(options, world):
    config = dict(patch_size=2, num_attention_heads=3, attention_head_dim=128, num_layers=3, pooled_projection_dim=192,
                  in_channels=12, text_embed_dim=64, time_embed_dim=32, max_sequence_length=16)
    traced = trace_step(config, 13, 256, 256, options, world=world)
    est = estimate(13, 256, 256, options, MochiDims.from_config(config), world=world)
    whole = trace_step(config, 13, 256, 256, MemoryOptions(options.base_dtype, 0, True, options.offload_activations))
    for part in ("weights", "swap_buffers", "lora"):
        assert est.parts[part] == traced.parts[part], (part, est.parts, traced.parts)
    assert est.peak == pytest.approx(traced.peak, rel=0.10)
    assert traced.parts["weights"] < whole.parts["weights"] * (1.05 / world + 0.1)  # 1/N of the blocks, small rest whole
    assert traced.parts["swap_buffers"] > 0  # two gathered blocks in flight


def test_full_size_per_rank_share():
    mochi = estimate(61, 480, 848, MemoryOptions("bf16", 0, True), world=2)
    for world in (2, 8):
        sharded = estimate(61, 480, 848, MemoryOptions("bf16", 0, True, shard_base=True), world=world)
        blocks = sum(i * o * 2 for b in range(48) for _, i, o, _ in MochiDims().block_linears(b))
        saved = mochi.parts["weights"] - sharded.parts["weights"]
        assert saved == pytest.approx(blocks * (1 - 1 / world), rel=0.01)
        assert sharded.parts["activations"] == mochi.parts["activations"]  # per rank: one clip each
    # global batch 8 on 2 processes: 4 clips per rank, four times one clip's activations
    four = estimate(61, 480, 848, MemoryOptions("bf16", 0, True), batch=4, world=2)
    assert four.parts["activations"] == 4 * mochi.parts["activations"]
    # Wan 14B at 81x480x832 fits 40 GB per GPU only sharded (or swapped) on 8 processes
    d14 = WanDims.named("wan2.1-14b")
    picked = fastest_fitting(81, 480, 832, 40, d14, world=8, model=_nvlink())
    assert picked is not None and picked.options.shard_base and picked.options.blocks_to_swap == 0
    assert fastest_fitting(81, 480, 832, 40, d14, world=1, model=_nvlink()).options.blocks_to_swap > 0


def test_ladder_with_sharding():
    """Several processes: the sharded sets come after the whole base and before block swap; the
    unsharded order is the one-process ladder."""
    from dreamrelation_core.training.memory.estimate import option_ladder

    ladder = option_ladder(48, both_dtypes=True, shard=True)
    assert [o for o in ladder if not o.shard_base] == option_ladder(48, both_dtypes=True)
    first_swap = next(i for i, o in enumerate(ladder) if o.blocks_to_swap)
    assert all(o.shard_base for o in ladder[4:first_swap]) and len(ladder[4:first_swap]) == 4
    assert len({o for o in ladder}) == len(ladder) and sum(o.shard_base for o in ladder) == 6


def _nvlink():
    from dreamrelation_core.training.memory.estimate import StepTimeModel

    return StepTimeModel(interconnect_gbps=250.0)


def test_shard_option_checks():
    with pytest.raises(ValueError, match="shard_base must be auto, true or false"):
        TrainConfig(shard_base="yes")
    with pytest.raises(ValueError, match="exclude each other"):
        TrainConfig(shard_base=True, blocks_to_swap=4)
    with pytest.raises(ValueError, match="exclude each other"):
        MemoryOptions("bf16", 2, True, shard_base=True)
    assert TrainConfig(shard_base=True, blocks_to_swap="auto").shard_base is True
    assert "shard" in MemoryOptions("bf16", 0, True, shard_base=True).label()
    # the out-of-memory ladder never swaps blocks of a sharded base: it offloads next
    from dreamrelation_core.training.memory.policy import next_rung, with_memory_options

    rung = next_rung(MemoryOptions("fp8", 0, True, shard_base=True), set(), 48)
    assert rung[0] == MemoryOptions("fp8", 0, True, True, shard_base=True)
    assert with_memory_options(TrainConfig(), rung[0]).shard_base is True


def test_one_process_ignores_shard_base_true():
    """One process (resuming a sharded run on one GPU): true is noted and the base stays whole."""
    from dreamrelation_core.mochi.tiny import tiny_transformer
    from dreamrelation_core.training.memory.policy import resolve

    cfg = TrainConfig(shard_base=True, device="cpu")
    choice = resolve(cfg, torch.device("cpu"), tiny_transformer(num_layers=1), (3, 8, 8))
    assert not choice.options.shard_base and "shard_base: true ignored" in choice.summary()


def test_memory_command_nproc(capsys):
    assert main(["memory", "--frames", "61", "--size", "480x848", "--nproc", "2", "--shard-base"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2 processes" in out and "sharded 1/2" in out
    peak = float(out.strip().splitlines()[-2].split("=")[1])
    assert peak == pytest.approx(estimate(61, 480, 848, MemoryOptions("bf16", 0, True, shard_base=True), world=2).peak_gib,
                                 abs=0.01)
    assert peak < estimate(61, 480, 848, MemoryOptions("bf16", 0, True)).peak_gib - 8  # 9 of 18.6 GiB of blocks
    # --fit with several processes: Wan 14B at 81 frames fits 24 GB per GPU with the base sharded
    assert main(["memory", "--frames", "81", "--size", "480x832", "--base-model", "wan2.1-14b", "--nproc", "8",
                 "--fit", "24"]) == 0
    out = capsys.readouterr().out
    assert "shard_base: true" in out and "blocks_to_swap: 0" in out and "per rank of 8 processes" in out
    assert main(["memory", "--frames", "61", "--size", "480x848", "--shard-base"]) == 1
    assert "--shard-base needs --nproc 2 or more" in capsys.readouterr().err
    assert main(["memory", "--frames", "61", "--size", "480x848", "--nproc", "2", "--batch", "3"]) == 1
    assert "must be a multiple of --nproc 2" in capsys.readouterr().err
