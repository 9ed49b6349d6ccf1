"""The pack's LoRA nodes on the real ComfyUI's Wan (in-process, CPU, tiny random Wan 2.1): the
Relation LoRA Loader equals the core's relation-only prediction, the export loads through the
stock LoraLoaderModelOnly, the sampler patch controls strength per range and records the prompt
words' cross-attention."""

from __future__ import annotations

import pytest
import torch

from dreamrelation_core.generate import add_relation_lora
from dreamrelation_core.lora import files as formats
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.wan import tiny
from dreamrelation_core.wan.spec import WAN21
from fixtures import wan as fw
from fixtures.comfy_nodes import node_classes, run_node
from fixtures.loras import random_lora_set

pytestmark = pytest.mark.comfyui


def _random_wan_lora(seed: int = 3):
    model = triplet.add_triplet(tiny.tiny_transformer(seed=0), rank=4, alpha=8.0, spec=WAN21)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in triplet.lora_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return triplet.to_lora_set(model)


@pytest.fixture(scope="module")
def env(comfyui, pack, tmp_path_factory):
    import folder_paths

    loras = tmp_path_factory.mktemp("wan_loras")
    saved = list(folder_paths.folder_names_and_paths["loras"][0])
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    lora = _random_wan_lora()
    formats.save_triplet(loras / "wan_triplet.safetensors", lora)
    formats.save_triplet(loras / "mochi_triplet.safetensors", random_lora_set(2, 96, 64, rank=4, alpha=8.0, seed=1))
    base = fw.comfy_wan(fw.comfy_weights(tiny.tiny_transformer(seed=0)))
    classes = node_classes(pack)
    loaded, report = run_node(classes["DreamRelationRelationLoraLoader"], model=base,
                              lora_name="wan_triplet.safetensors", strength=1.0).outputs
    yield dict(lora=lora, base=base, loaded=loaded, report=report, classes=classes, loras=loras)
    folder_paths.folder_names_and_paths["loras"][0][:] = saved


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.zeros(1, 512, 4096)
    text[:, :6] = torch.randn(1, 6, 4096, generator=g)
    return x, text


def test_loader_equals_core_relation_only_and_refuses_mochi(env):
    x, text = _inputs()
    mask = text.abs().sum(-1) > 0
    core = add_relation_lora(tiny.tiny_transformer(seed=0), env["lora"])
    u = WAN21.predict(core, x, text, mask, torch.tensor([0.7])).detach()
    comfy = fw.comfy_denoised(env["loaded"], x, 0.7, text)
    assert (comfy - (x + 0.7 * u)).abs().max() < 1e-5 * comfy.abs().max()
    assert "dropped adapters: subject1, subject2" in env["report"] and "patched weights: 12" in env["report"]
    with pytest.raises(Exception, match="mochi_triplet.safetensors: a mochi-1-preview LoRA does not fit ComfyUI's Wan"):
        run_node(env["classes"]["DreamRelationRelationLoraLoader"], model=env["base"],
                 lora_name="mochi_triplet.safetensors", strength=1.0)


def test_export_node_loads_through_stock_loader(env):
    import nodes as comfy_nodes

    path = run_node(env["classes"]["DreamRelationExportRelationLora"], lora_name="wan_triplet.safetensors",
                    filename="wan_stock", dtype="fp32", overwrite=True).outputs[0]
    stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(env["base"], "wan_stock.safetensors", 1.0)[0]
    x, text = _inputs(2)
    ours = fw.comfy_denoised(env["loaded"], x, 0.5, text)
    assert path.endswith("wan_stock.safetensors")
    assert (fw.comfy_denoised(stock, x, 0.5, text) - ours).abs().max() < 1e-5 * ours.abs().max()


def _patch(env, **kw):
    args = dict(strength=1.0, start_percent=0.0, end_percent=1.0, apply_to="cond and uncond", attention_words="")
    args.update(kw)
    return run_node(env["classes"]["DreamRelationMochiSamplerPatch"], model=env["loaded"], **args).outputs


def _cond_pass(patcher, x, text, sigma: float = 0.6) -> torch.Tensor:
    """The conditional denoised of one real sampler step at sigma (the wrappers run only in sampling)."""
    import comfy.sample
    import comfy.samplers

    seen = {}
    m = patcher.clone()

    def cfg_fn(args):
        seen["cond"] = args["cond_denoised"].clone()
        return args["input"] - args["cond"]

    m.set_model_sampler_cfg_function(cfg_fn)
    comfy.sample.sample_custom(m, x, 3.0, comfy.samplers.sampler_object("euler"), torch.tensor([sigma, 0.0]),
                               [[text, {}]], [[torch.zeros_like(text), {}]], torch.zeros_like(x), disable_pbar=True,
                               seed=0)
    return seen["cond"]


def test_sampler_patch_range_and_attention_on_wan(env):
    import nodes as comfy_nodes

    x, text = _inputs(3)
    base, loaded = _cond_pass(env["base"], x, text), _cond_pass(env["loaded"], x, text)
    outside, _ = _patch(env, start_percent=0.0, end_percent=0.0)  # never: the base model
    assert (_cond_pass(outside, x, text) - base).abs().max() < 1e-5 * base.abs().max()
    assert (loaded - base).abs().max() > 1e-3 * base.abs().max()
    half, _ = _patch(env, strength=0.5)
    assert (_cond_pass(half, x, text) - (base + loaded) / 2).abs().max() < 1e-3 * base.abs().max()

    latent = {"samples": torch.zeros(1, 16, 2, 4, 4)}  # EmptyHunyuanLatentVideo's 32x32, 5 frames
    cond, uncond = [[text, {}]], [[torch.zeros_like(text), {}]]
    maps = {}
    for word in ("#0", "#3"):
        model, rec = _patch(env, apply_to="cond only", attention_words=word)
        out = comfy_nodes.KSampler().sample(model, 0, 2, 4.0, "euler", "simple", cond, uncond, latent)[0]
        assert torch.isfinite(out["samples"]).all()
        assert rec.count == 2 * 2  # 2 steps x 2 blocks, conditional pass only
        maps[word] = rec.maps()
    assert maps["#0"].shape == (1, 2, 2, 2)  # (words, T, h, w): the 2x4x4 latent in 1x2x2 patches
    assert (maps["#0"] - maps["#3"]).abs().max() > 1e-4
