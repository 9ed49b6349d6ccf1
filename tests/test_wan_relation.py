"""Relation LoRAs on Wan through the base-model seam: spec and detection, latent masks in Wan's
time grouping, training and files, and ComfyUI's own Wan with the exported LoRA."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core.base_models import detect_spec, get_spec, resolve_spec, spec_of_model
from dreamrelation_core.data.cache import Encoders, load_prepared, prepare_dataset
from dreamrelation_core.data.latent_masks import latent_mask
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.errors import LoraFormatError
from dreamrelation_core.generate import add_relation_lora
from dreamrelation_core.lora import files as formats
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.lora.comfy_export import comfy_state_dict
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.trainer import Trainer
from dreamrelation_core.wan import tiny
from dreamrelation_core.wan.spec import WAN21, WAN22_5B
from fixtures import wan as fw

FRAMES, SIZE = 9, (32, 32)


@functools.cache
def _base(channels: int = 16):
    return tiny.tiny_transformer(seed=0, latent_channels=channels)


def test_spec_names_detection_and_placements(tmp_path) -> None:
    assert get_spec("wan2.1-14b") is WAN21 and get_spec("wan2.2-a14b") is WAN21 and get_spec("wan2.2-5b") is WAN22_5B
    for channels, spec in ((16, WAN21), (48, WAN22_5B)):
        path = tmp_path / f"wan{channels}.safetensors"
        save_file({k: v.contiguous() for k, v in fw.comfy_weights(_base(channels)).items()}, str(path))
        assert detect_spec(path) is spec and resolve_spec("auto", str(path)) is spec
        assert spec_of_model(_base(channels)) is spec
    assert resolve_spec("auto", "tiny").family == "mochi"  # the built-in tiny model stays Mochi's
    assert WAN21.target_modules("relation", 2) == ["blocks.0.attn1.to_q", "blocks.0.attn1.to_k", "blocks.0.attn2.to_q",
                                                   "blocks.0.attn2.to_k", "blocks.1.attn1.to_q", "blocks.1.attn1.to_k",
                                                   "blocks.1.attn2.to_q", "blocks.1.attn2.to_k"]
    self_only = WAN21.with_placement("self_attention")
    assert self_only.target_modules("subject1", 1) == ["blocks.0.attn1.to_v"] and WAN21.placement == "default"
    with pytest.raises(ValueError, match="placement 'self_attention' is not known"):
        get_spec("mochi").with_placement("self_attention")
    with pytest.raises(ValueError, match="base_model must be one of"):
        TrainConfig(base_model="wan3")
    assert WAN21.comfy_module("blocks.3.attn2.to_out.0") == "blocks.3.cross_attn.o"


def test_latent_masks_group_frames_by_four() -> None:
    """Frame 0 alone, then frames 1-4, 5-8 (Mochi would group by six)."""
    m = torch.zeros(FRAMES, 16, 16, dtype=torch.bool)
    m[1:4, :8, :8] = True  # 3 of the 4 frames of latent frame 1
    m[8, 8:, 8:] = True  # 1 of the 4 frames of latent frame 2
    lm = latent_mask(m, spec=WAN21)  # [3, 2, 2]
    assert lm.shape == (3, 2, 2)
    assert lm[0].sum() == 0 and lm[1, 0, 0] == 0.75 and lm[2, 1, 1] == 0.25 and lm.sum() == 1.0
    with pytest.raises(ValueError, match="4k \\+ 1"):
        latent_mask(torch.zeros(7, 16, 16), spec=WAN21)


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """Two tiny synthetic clips prepared with the tiny Wan VAE and umT5, 3 training steps."""
    root = tmp_path_factory.mktemp("wan")
    data = write_synthetic_dataset(root / "data", num_videos=2, num_frames=FRAMES, size=(32, 48), seed=2, spec=WAN21)
    prepare_dataset(data, root / "cache", Encoders.from_models(*WAN21.tiny_encoders(0), WAN21), FRAMES, SIZE,
                    max_text_len=WAN21.text_len)
    clips = load_prepared(root / "cache")
    cfg = TrainConfig(transformer="tiny", base_model="wan2.1", output_dir=str(root / "run"), num_steps=3,
                      checkpoint_every=2, rank=4, alpha=8.0, learning_rate=1e-2, warmup_steps=0, device="cpu",
                      save_dtype="fp32")
    trainer = Trainer(cfg, clips=clips)
    return trainer, trainer.train(), clips


def test_wan_training_writes_wan_loras(wan_run) -> None:
    trainer, result, clips = wan_run
    assert clips[0].spec is WAN21 and clips[0].mean.shape == (16, 3, 4, 4) and clips[0].y_feat.shape[0] == 512
    assert trainer.spec is WAN21 and [h["step"] for h in result.history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in result.history)
    lora = formats.load_lora_file(result.triplet_path)
    assert lora.metadata["base_model"] == "wan2.1" and lora.metadata["placement"] == "default"
    assert sorted(lora.weights["subject1"]) == ["blocks.0.attn1.to_v", "blocks.0.attn2.to_v", "blocks.1.attn1.to_v",
                                                "blocks.1.attn2.to_v"]
    # B starts at zero: the shared LoRA (always active) and the adapters of each branch drawn moved, no other
    drawn = {h["branch"] for h in result.history}
    for adapter in lora.adapters:
        moved = any(b.abs().max() > 0 for _, b in lora.weights[adapter].values())
        assert moved == (adapter == "ffn" or adapter in drawn or (adapter.startswith("subject") and "relation" in drawn))
    rel = formats.load_lora_file(result.relation_path)
    assert set(rel.adapters) == {"relation", "ffn"}
    sd = comfy_state_dict(rel)
    assert "diffusion_model.blocks.1.cross_attn.k.lora_A.weight" in sd and "diffusion_model.blocks.0.self_attn.o.alpha" in sd
    assert not any(".v." in k for k in sd)  # subject LoRAs never leave the core
    # a Wan LoRA does not pass for a Mochi one
    with pytest.raises(ValueError, match="not a Mochi joint-attention module path"):
        get_spec("mochi").parse_module_path("blocks.0.attn1.to_q")


def test_wan_lora_file_refuses_a_module_of_another_placement(tmp_path, wan_run) -> None:
    _, result, _ = wan_run
    lora = formats.load_lora_file(result.relation_path)
    lora.metadata["placement"] = "self_attention"  # its cross-attention modules do not belong there
    formats.save_relation_only(tmp_path / "bad.safetensors", lora, step=3)
    with pytest.raises(LoraFormatError, match=r"bad\.safetensors: key 'blocks\.0\.attn2\.to_[qk]\.lora_A\.relation\.weight': adapter 'relation' does not belong"):
        formats.load_lora_file(tmp_path / "bad.safetensors")


@pytest.mark.comfyui
@pytest.mark.parametrize("placement", ["default", "self_attention"])
def test_comfyui_wan_with_the_exported_lora_equals_the_core(comfyui, placement: str) -> None:
    """ComfyUI's own Wan (stock loader, stock LoRA loading as LoraLoaderModelOnly does it) with our
    export gives the core's relation-only prediction: denoised = x − σ·v = x + σ·u."""
    import comfy.sd

    spec = WAN21.with_placement(placement)
    model = _base()
    trained = triplet.add_triplet(tiny.tiny_transformer(seed=0), rank=4, alpha=8.0, spec=spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in triplet.lora_parameters(trained):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lora = triplet.to_lora_set(trained)
    lora.metadata["placement"] = placement
    core = add_relation_lora(tiny.tiny_transformer(seed=0), lora)
    assert spec_of_model(core) is WAN21
    patcher = fw.comfy_wan(fw.comfy_weights(model))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, comfy_state_dict(lora), 1.0, 0)
    assert len(patched.patches) == len({p for a in ("relation", "ffn") for p in lora.weights[a]})
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.zeros(1, 512, 4096)
    text[:, :7] = torch.randn(1, 7, 4096, generator=g)
    mask = torch.zeros(1, 512, dtype=torch.bool)
    mask[:, :7] = True
    for sigma in (0.8, 0.3):
        with torch.no_grad():
            u = WAN21.predict(core, x, text, mask, torch.tensor([sigma])).float()
            u_base = WAN21.predict(model, x, text, mask, torch.tensor([sigma])).float()
        comfy = fw.comfy_denoised(patched, x, sigma, text)
        scale = comfy.abs().max()
        assert (comfy - (x + sigma * u)).abs().max() < 1e-5 * scale
        assert (comfy - (x + sigma * u_base)).abs().max() > 1e-3 * scale  # the LoRA changed the output


def test_wan_resume_swap_checkpointing_and_expert_range(tmp_path, wan_run) -> None:
    """A resumed Wan run repeats the uninterrupted one; block swap over Wan's blocks with gradient
    checkpointing changes nothing; one A14B expert trains on its own noise levels only."""
    trainer, result, clips = wan_run
    resumed = Trainer.resume(result.run_dir, clips=clips, checkpoint=result.run_dir / "checkpoints" / "checkpoint_000002.pt")
    resumed.train()
    assert resumed.history[-1] == result.history[-1]

    cfg = TrainConfig.from_dict({**trainer.config.to_dict(), "output_dir": str(tmp_path / "swap"),
                                 "blocks_to_swap": 1, "gradient_checkpointing": True})
    swapped = Trainer(cfg, clips=clips)
    assert swapped.swap is not None and swapped.swap.indices == [0]
    assert [repr(h) for h in swapped.train(max_steps=2).history] == [repr(h) for h in result.history[:2]]  # nan == nan

    expert = Trainer(TrainConfig.from_dict({**trainer.config.to_dict(), "output_dir": str(tmp_path / "high"),
                                            "sigma_range": [0.875, 1.0]}), clips=clips)
    seen = []
    expert.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    for _ in range(3):
        expert.train_step()
    assert all(875.0 <= float(t) <= 1000.0 for t in seen) and len(seen) == 3  # Wan's timestep is 1000 * sigma
    with pytest.raises(ValueError, match="sigma_range"):
        TrainConfig(sigma_range=[0.9, 0.5])


def test_qkv_feature_maps_on_wan(wan_run) -> None:
    """Q/K/V feature maps hook Wan's self-attention (video tokens); with the trained LoRA they move."""
    from dreamrelation_core.analysis.features import feature_maps_with_lora

    _, result, clips = wan_run
    lora = formats.load_lora_file(result.relation_path)
    z = clips[0].sample_latents(torch.Generator().manual_seed(0))[None]  # [1, 16, 3, 4, 4]
    maps = feature_maps_with_lora(tiny.tiny_transformer(seed=0), lora, z, clips[0].y_feat[None], clips[0].y_mask[None])
    assert maps["base"]["q"].shape == (2, 2)  # the 4x4 latent grid in 2x2 patches
    assert not torch.equal(maps["base"]["v"], maps["base"]["q"])
    assert not torch.equal(maps["lora"]["q"], maps["base"]["q"])  # the shared LoRA always trains: later blocks see it


def test_wan_demo_writes_comfy_files(tmp_path) -> None:
    """`demo --base-model wan2.1`: the tiny base in ComfyUI's Wan keys and the stock-loader export beside our files."""
    from safetensors import safe_open

    from dreamrelation_core.cli.demo import run_demo

    files = run_demo(tmp_path / "demo", steps=2, seed=0, sample_steps=1, base_model="wan2.1")
    assert {"base_model", "relation_comfy", "relation_only", "triplet", "sample"} <= set(files)
    assert detect_spec(files["base_model"]) is WAN21
    with safe_open(str(files["base_model"]), framework="pt") as f:
        assert "model.diffusion_model.head.modulation" in f.keys()
    with safe_open(str(files["relation_comfy"]), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["base_model"] == "wan2.1"
    assert "diffusion_model.blocks.1.self_attn.q.lora_A.weight" in keys and not any(".v." in k for k in keys)
    assert formats.load_lora_file(files["relation_only"]).spec is WAN21


def test_trains_from_comfyuis_fp8_scaled_wan_file(tmp_path, wan_run) -> None:
    """A Wan DiT in ComfyUI's scaled-fp8 layout: base model read from the file, weights kept in fp8
    (the time embedder, whose parameter dtype diffusers casts its input to, in a compute dtype)."""
    from dreamrelation_core import fp8

    _, _, clips = wan_run
    sd = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in fw.comfy_weights(_base()).items():
        if ".blocks." in k and k.endswith(".weight") and v.ndim == 2:
            sd[k], scale = fp8.quantize_fp8(v)
            sd[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            sd[k] = v
    path = tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    trainer = Trainer(TrainConfig(transformer=str(path), output_dir=str(tmp_path / "run"), num_steps=1, rank=4,
                                  device="cpu"), clips=clips)
    assert trainer.spec is WAN21 and trainer.memory.options.base_dtype == "fp8"
    kinds = {n: m.weight.dtype for n, m in fp8.frozen_linears(trainer.model)}
    assert kinds["blocks.0.attn1.to_q.base_layer"] == torch.float8_e4m3fn
    assert not any(fp8.is_fp8(d) for n, d in kinds.items() if "time_embedder" in n)
    _, losses = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in losses.items() if k != "rcl")
