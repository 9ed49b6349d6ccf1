"""Wan's memory estimate against the meta-device trace of the real Wan training step (small
model), and the `memory --base-model` command."""

import pytest

from dreamrelation_core.cli import main
from dreamrelation_core.errors import TrainingError
from dreamrelation_core.training.memory.estimate import estimate, fastest_fitting
from dreamrelation_core.training.memory.setup import MemoryOptions
from dreamrelation_core.training.memory.trace import trace_step
from dreamrelation_core.training.memory.wan_dims import SIZES, WanDims

# Wan's proportions at a small width: 128-wide heads, 512 text rows, N = 768 video tokens.
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=3, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
CLIP = (9, 256, 256)


@pytest.mark.parametrize("options", [MemoryOptions("bf16", 0, False), MemoryOptions("fp8", 2, True),
                                     MemoryOptions("fp8", 3, True, True)], ids=lambda o: o.label().replace(" ", "-"))
def test_wan_estimate_matches_meta_trace(options):
    traced = trace_step(CONFIG, *CLIP, options, base_model="wan2.1")
    est = estimate(*CLIP, options, WanDims.from_config(CONFIG))
    assert est.tokens == traced.tokens == 3 * 16 * 16
    for part in ("weights", "swap_buffers", "attention"):  # counted tensors: exact
        assert est.parts[part] == traced.parts[part], (part, est.parts, traced.parts)
    assert abs(est.peak / traced.peak - 1) < 0.10, (est.parts, traced.parts)
    assert est.peak >= traced.peak  # the estimate errs on the safe side


def test_released_sizes_and_clip_rules():
    d14 = WanDims.named("wan2.1-14b")
    assert (d14.d, d14.f, d14.layers) == (5120, 13824, 40) and WanDims.named("wan2.2-a14b") == d14
    d5 = WanDims.named("wan2.2-5b")
    assert (d5.d, d5.f, d5.layers, d5.out_channels) == (3072, 14336, 30, 48)
    assert WanDims.named("wan2.1-1.3b").d == 1536 and SIZES["1.3b"]["ffn_dim"] == 8960
    # 81 frames at 480x832: 21 latent frames; 2.1 VAE 60x104 latents, 2.2 VAE 30x52
    assert d14.latent_shape(81, 480, 832) == (21, 60, 104) and d5.latent_shape(81, 480, 832) == (21, 30, 52)
    with pytest.raises(TrainingError, match="4k \\+ 1"):
        estimate(63, 480, 832, MemoryOptions("bf16", 0, True), d14)
    with pytest.raises(TrainingError, match="multiples of 32"):
        d5.latent_shape(81, 480, 848)
    small = fastest_fitting(81, 480, 832, 24, WanDims.named("wan2.1-1.3b"))
    big = fastest_fitting(81, 480, 832, 24, d14)
    assert small.options.blocks_to_swap == 0 and big.options.base_dtype == "fp8" and big.needed_gib() <= 24


def test_memory_command_for_wan(capsys):
    assert main(["memory", "--base-model", "wan2.1-14b", "--frames", "81", "--size", "480x832", "--fit", "24"]) == 0
    out = capsys.readouterr().out
    assert "base_dtype: fp8" in out and "32760 visual tokens" in out
    assert main(["memory", "--base-model", "wan2.1-14b", "--frames", "81", "--size", "480x832", "--fit", "16"]) == 0
    sixteen = capsys.readouterr().out
    swapped = int(next(line for line in sixteen.splitlines() if line.startswith("blocks_to_swap")).split(": ")[1])
    assert swapped > int(next(line for line in out.splitlines() if line.startswith("blocks_to_swap")).split(": ")[1])


def test_auto_options_on_cuda_use_wans_dims():
    """The trainer's `auto` memory options read a Wan model's dims (decided before anything moves to the GPU)."""
    import torch

    from dreamrelation_core.training.config import TrainConfig
    from dreamrelation_core.training.memory.policy import model_dims, resolve
    from dreamrelation_core.wan.tiny import tiny_transformer

    model = tiny_transformer(seed=0)
    assert model_dims(model) == WanDims.from_config(dict(model.config))
    cfg = TrainConfig(base_model="wan2.1")
    roomy = resolve(cfg, torch.device("cuda"), model, (3, 8, 8), free_bytes=80 * 1024**3)
    assert roomy.options.base_dtype == "bf16" and not roomy.options.gradient_checkpointing
    from dreamrelation_core.training.memory.estimate import estimate_latent

    full = estimate_latent((21, 60, 104), MemoryOptions("bf16", 0, False), model_dims(model))
    tight = resolve(cfg, torch.device("cuda"), model, (21, 60, 104), free_bytes=int(full.peak * 0.7))
    assert tight.options.gradient_checkpointing and tight.estimate.peak < full.peak * 0.7
