"""The frozen base sharded over the ranks (shard_base, FSDP2) on the CPU with gloo: the same
gradients as the whole model, 1/N of the block weights per rank; the estimator's per-rank share
against the meta trace; the option's checks and the `memory --nproc` command."""

from __future__ import annotations

import pytest
import torch

from dreamrelation_core.cli import main
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.memory.estimate import MochiDims, estimate, fastest_fitting
from dreamrelation_core.training.memory.setup import MemoryOptions
from dreamrelation_core.training.memory.trace import trace_step
from dreamrelation_core.training.memory.wan_dims import WanDims
from fixtures.shard_ranks import run_ranks

CASES = [("mochi", "fp32", True), ("mochi", "fp8", True), ("wan", "bf16", False)]


def _model(family: str):
    if family == "wan":
        from dreamrelation_core.wan.tiny import tiny_transformer

        return tiny_transformer(seed=0, num_layers=3, text_dim=32), torch.randn(1, 16, 3, 8, 8)
    from dreamrelation_core.mochi.tiny import tiny_transformer

    return tiny_transformer(seed=0, num_layers=3), torch.randn(1, 12, 3, 8, 8)


def _grads(family: str, dtype: str, ckpt: bool, sharded: bool) -> dict:
    """Two forward/backward passes of a tiny model with a peft triplet (random LoRA weights, the
    same on every rank); the LoRA gradients, the loss and what the rank holds of the blocks."""
    from torch.distributed.tensor import DTensor

    from dreamrelation_core.base_models import spec_of_model
    from dreamrelation_core.lora import peft_triplet as triplet
    from dreamrelation_core.training.memory.setup import prepare_model

    torch.manual_seed(0)
    model, x = _model(family)
    y, ym, sigma = torch.randn(1, 16, 32), torch.arange(16)[None] < 11, torch.tensor([0.4])
    spec = spec_of_model(model)
    full = {n: p.numel() * p.element_size() for b in spec.blocks(model) for n, p in b.named_parameters()}
    prepared = prepare_model(model, MemoryOptions(dtype, 0, ckpt, shard_base=sharded), "cpu", rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in triplet.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    triplet.activate_branch(model, "relation")
    for _ in range(2):  # the second pass: FSDP's state after a full step (resharded, gathered again)
        loss = spec.predict(model, x, y, ym, sigma).square().mean()
        loss.backward()
    blocks = spec.blocks(model)
    local = {}
    for i, b in enumerate(blocks):
        for n, p in b.named_parameters():
            if "lora_" not in n:
                t = p.to_local() if isinstance(p, DTensor) else p
                local[f"{i}.{n}"] = (t.numel() * t.element_size(), isinstance(p, DTensor))
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in triplet.lora_parameters(model) if p.grad is not None},
            "lora_plain": all(not isinstance(p, DTensor) for _, p in triplet.lora_parameters(model)),
            "local": local, "full": full, "info": prepared.shard}


def _rank_cases(rank: int, world: int, out_dir: str) -> list:
    return [(_grads(*case, sharded=False), _grads(*case, sharded=True)) for case in CASES]


def test_sharded_base_gives_the_same_gradients_and_holds_one_nth(tmp_path):
    ranks = run_ranks(_rank_cases, 2, tmp_path)
    for case, results in zip(CASES, zip(*ranks)):
        for (plain, sharded) in results:
            assert sharded["loss"] == pytest.approx(plain["loss"], abs=1e-6), case
            assert sharded["grads"].keys() == plain["grads"].keys() and len(plain["grads"]) > 0, case
            for n, g in plain["grads"].items():
                assert torch.allclose(sharded["grads"][n], g, atol=1e-6, rtol=1e-5), (case, n)
            assert sharded["lora_plain"], "the LoRA weights stay whole on every rank (ignored by FSDP)"
            info = sharded["info"]
            assert info.world_size == 2 and info.blocks == 3
            # every frozen block parameter is a DTensor whose local shard is about half of it
            assert all(is_dt for _, is_dt in sharded["local"].values()), case
            assert abs(info.local_bytes / info.full_bytes - 0.5) < 0.02, (case, info)
            assert all(not is_dt for _, is_dt in plain["local"].values()) and plain["info"] is None
        # the two ranks' shards together are the whole blocks (dim 0 split, padded to even)
        a, b = results[0][1]["local"], results[1][1]["local"]
        full = results[0][1]["info"].full_bytes
        assert full <= sum(v for v, _ in a.values()) + sum(v for v, _ in b.values()) < 1.02 * full
        assert results[0][1]["info"].local_bytes == sum(v for v, _ in a.values())


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
    assert main(["memory", "--frames", "61", "--size", "480x848", "--shard-base"]) == 1
    assert "--shard-base needs --nproc 2 or more" in capsys.readouterr().err
    assert main(["memory", "--frames", "61", "--size", "480x848", "--nproc", "2", "--batch", "3"]) == 1
    assert "must be a multiple of --nproc 2" in capsys.readouterr().err
