"""Block swap, gradient checkpointing and activation offload in the trainer: same math, bit for bit.

On the CPU the swap runs its real code path (a CPU store, copies into reused 'device' buffers
before each block's forward, recompute and backward), so every option must reproduce the plain
run exactly: same losses, same LoRA weights, also across a resume.

On CUDA bit-identity is not the claim: flash attention's backward accumulates with atomics, so
two runs of the same step differ in the last bits. There `benchmarks/gpu_memory.py` compares swap
and offload against the plain run with a stated tolerance: every step's loss within 1e-3
(relative).
"""

import math

import pytest
import torch

from dreamrelation_core.data.cache import PreparedClip
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.mochi.fp8 import frozen_linears
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.trainer import Trainer

LAYERS = 3


def clip(seed: int) -> PreparedClip:
    g = torch.Generator().manual_seed(seed)
    t, h = 3, 8
    m1, m2 = torch.zeros(t, h, h), torch.zeros(t, h, h)
    m1[:, 1:4, 1:4], m2[:, 4:7, 3:6] = 1, 1
    return PreparedClip(
        name=f"c{seed}", caption="", mean=torch.randn(12, t, h, h, generator=g), logvar=torch.full((12, t, h, h), -4.0),
        y_feat=torch.randn(16, 32, generator=g), y_mask=torch.arange(16) < 11, mask1=m1, mask2=m2,
    )


CLIPS = [clip(0), clip(1)]


def config(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / name), num_steps=4, warmup_steps=1, checkpoint_every=2, rank=4, alpha=4.0,
                learning_rate=5e-3, device="cpu", save_dtype="fp32", keep_checkpoints=0, extra={"tiny": {"num_layers": LAYERS}})
    base.update(kw)
    return TrainConfig(**base)


def history(result):
    return [(h["branch"], h["total"], h["mse"], h["masked"], None if math.isnan(h["rcl"]) else h["rcl"]) for h in result.history]


def lora(trainer):
    return {n: p.detach().clone() for n, p in triplet.lora_parameters(trainer.model)}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tr = Trainer(config(tmp_path_factory.mktemp("plain"), "run", gradient_checkpointing=False), clips=CLIPS)
    return history(tr.train()), lora(tr)


@pytest.mark.parametrize("options", [
    dict(blocks_to_swap=2, gradient_checkpointing=False),
    dict(blocks_to_swap=LAYERS, gradient_checkpointing=True),
    dict(blocks_to_swap=1, gradient_checkpointing=True, offload_activations=True),
], ids=["swap2", "swap-all-ckpt", "swap1-ckpt-offload"])
def test_memory_options_give_bit_identical_training(tmp_path, plain, options):
    tr = Trainer(config(tmp_path, "run", **options), clips=CLIPS)
    assert tr.memory.options.blocks_to_swap == options["blocks_to_swap"]
    result = tr.train()
    assert history(result) == plain[0]
    weights = lora(tr)
    assert weights.keys() == plain[1].keys()
    assert all(torch.equal(weights[n], plain[1][n]) for n in weights)
    swap = tr.swap
    assert swap is not None and len(swap.slots) == min(2, options["blocks_to_swap"])
    if options["blocks_to_swap"] <= 2:  # every swapped block has its own buffer: one copy each
        assert swap.copies == options["blocks_to_swap"]
    else:  # three blocks through two buffers: the buffers are refilled every step (2 copies per step)
        assert swap.copies >= 2 * 4
    if options.get("offload_activations"):
        assert tr.offload.offloaded_bytes > 0
        # each block's inputs came back ahead of their recompute (all but the first block's, per step) ...
        assert tr.offload.prefetched == 4 * 2 * (LAYERS - 1)
        # ... and the host buffers of step 1 (exactly one step's bytes) served the three steps after it
        assert tr.offload.host_bytes * 4 == tr.offload.offloaded_bytes


def test_swapped_weights_leave_the_model(tmp_path):
    tr = Trainer(config(tmp_path, "run", blocks_to_swap=LAYERS, gradient_checkpointing=True), clips=CLIPS)
    swap = tr.swap
    stored = swap.store_bytes
    in_blocks = [m for b in tr.model.transformer_blocks for m in b.modules() if m in {x for _, x in frozen_linears(b)}]
    assert stored >= sum(m._swap_shape[0] * m._swap_shape[1] * 4 for m in in_blocks)  # fp32 weights, aligned
    tr.train_step()
    # after a step only the blocks in the two buffers have weights; the others hold size-0 stand-ins
    loaded = [i for i, b in enumerate(tr.model.transformer_blocks)
              if all(m.weight.numel() > 0 for _, m in frozen_linears(b))]
    assert len(loaded) <= 2 and swap.buffer_bytes < stored
    # LoRA weights are not swapped
    assert all(p.numel() > 0 for _, p in triplet.lora_parameters(tr.model))


def test_resume_with_swap_reproduces_plain_run(tmp_path, plain):
    part = Trainer(config(tmp_path, "run", blocks_to_swap=2, gradient_checkpointing=True), clips=CLIPS)
    part.train(max_steps=2)
    resumed = Trainer.resume(tmp_path / "run", clips=CLIPS)
    assert resumed.step == 2 and resumed.swap is not None and resumed.memory.options.gradient_checkpointing
    result = resumed.train()
    assert history(result) == plain[0]
    weights = lora(resumed)
    assert all(torch.equal(weights[n], plain[1][n]) for n in weights)


def test_cpu_auto_defaults_and_bad_options(tmp_path):
    tr = Trainer(config(tmp_path, "run"), clips=CLIPS)  # all memory options "auto"
    o = tr.memory.options
    assert (o.base_dtype, o.blocks_to_swap, o.gradient_checkpointing, o.offload_activations) == ("fp32", 0, False, False)
    fp8 = Trainer(config(tmp_path, "fp8", base_dtype="fp8", num_steps=2), clips=CLIPS)
    assert all(m.weight.dtype == torch.float8_e4m3fn for _, m in frozen_linears(fp8.model))
    assert all(math.isfinite(h["total"]) for h in fp8.train().history)
    with pytest.raises(ValueError, match="blocks_to_swap must be auto or an integer >= 0"):
        config(tmp_path, "x", blocks_to_swap=-1)
    with pytest.raises(ValueError, match="offload_activations needs gradient_checkpointing"):
        config(tmp_path, "x", offload_activations=True, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="base_dtype must be"):
        config(tmp_path, "x", base_dtype="int4")
    yaml_cfg = config(tmp_path, "y", blocks_to_swap=4, gradient_checkpointing="auto")
    yaml_cfg.save_yaml(tmp_path / "c.yaml")
    back = TrainConfig.load_yaml(tmp_path / "c.yaml")
    assert (back.blocks_to_swap, back.gradient_checkpointing, back.base_dtype) == (4, "auto", "auto")


# ---------------------------------------------------------------------------------------------
# the choice on CUDA (the policy runs on the CPU here: free memory is given, nothing touches CUDA)


@pytest.fixture(scope="module")
def mochi_meta():
    from diffusers import MochiTransformer3DModel

    with torch.device("meta"):
        return MochiTransformer3DModel()  # full-size Mochi 1, no memory


def test_cuda_choice_fits_free_memory(tmp_path, mochi_meta):
    from dreamrelation_core.errors import TrainingError
    from dreamrelation_core.training.memory.estimate import GIB
    from dreamrelation_core.training.memory.policy import resolve

    cuda, latent = torch.device("cuda"), (11, 60, 106)  # 61 frames, 480x848
    auto = resolve(config(tmp_path, "a"), cuda, mochi_meta, latent, free_bytes=int(15.3 * GIB))  # a 16 GB card
    o = auto.options
    assert (o.base_dtype, o.gradient_checkpointing, o.offload_activations) == ("fp8", True, False)
    assert 0 < o.blocks_to_swap < 48 and auto.estimate.peak * 1.05 <= 15.3 * GIB
    assert "fp8 ckpt swap" in auto.summary()
    roomy = resolve(config(tmp_path, "a"), cuda, mochi_meta, latent, free_bytes=int(23.3 * GIB)).options  # 24 GB
    assert (roomy.base_dtype, roomy.blocks_to_swap, roomy.gradient_checkpointing) == ("fp8", 0, True)
    # the user's fixed choices are kept; the rest is chosen around them
    fixed = resolve(config(tmp_path, "a", base_dtype="bf16"), cuda, mochi_meta, latent, free_bytes=int(23.3 * GIB)).options
    assert fixed.base_dtype == "bf16" and fixed.blocks_to_swap > 0
    # a fully fixed set that cannot fit is refused, with a set that would
    with pytest.raises(TrainingError, match=r"need \d+\.\d+ GiB .* bf16 ckpt .*these options fit: base_dtype: fp8, blocks_to_swap: \d+"):
        resolve(config(tmp_path, "a", base_dtype="bf16", blocks_to_swap=0, gradient_checkpointing=True,
                       offload_activations=False), cuda, mochi_meta, latent, free_bytes=int(15.3 * GIB))
    with pytest.raises(TrainingError, match="no option set fits"):
        resolve(config(tmp_path, "a"), cuda, mochi_meta, latent, free_bytes=int(3 * GIB))
