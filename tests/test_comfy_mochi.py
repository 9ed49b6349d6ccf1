"""Relation LoRA on the real ComfyUI's Mochi (in-process, CPU, tiny random models).

The diffusers-equivalence proof needs equal feed-forward widths, which ComfyUI's own assert only
allows under `python -O` (see fixtures/comfy_mochi.py): it runs in a subprocess that reports
numbers this test asserts. Everything else runs here, on a tiny Mochi that keeps ComfyUI's assert.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamrelation_core.lora import files as formats
from dreamrelation_core.lora import genmo as comfy_keys
from fixtures import comfy_mochi as cm
from fixtures.comfy_nodes import node_classes, run_node
from fixtures.loras import random_lora_set

pytestmark = pytest.mark.comfyui
HERE = Path(__file__).resolve().parent


# (depth, width, text width) -> a random triplet; rank 4, alpha 8: scale 2, which both sides must honour
_random_lora = functools.partial(random_lora_set, rank=4, alpha=8.0, gain=0.3, seed=3)


@pytest.fixture(scope="module")
def env(comfyui, pack, tmp_path_factory):
    import folder_paths

    loras = tmp_path_factory.mktemp("loras")
    # our temp folder first: the export node writes into the first loras folder, never the user's
    saved = list(folder_paths.folder_names_and_paths["loras"][0])
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    cfg = cm.inprocess_config(depth=2)
    weights = cm.random_genmo_weights(cfg, seed=0)
    base = cm.build_comfy_mochi(cfg, weights)
    lora = _random_lora(2, cfg["hidden_size_x"], cfg["hidden_size_y"])
    formats.save_triplet(loras / "rel_triplet.safetensors", lora)
    formats.save_relation_only(loras / "rel_only.safetensors", lora.only(("relation", "ffn")))
    comfy_keys.save_comfy_lora(loras / "rel_stock.safetensors", lora, source="rel_triplet.safetensors")
    wrong = _random_lora(2, cfg["hidden_size_x"] + 2, cfg["hidden_size_y"])
    formats.save_triplet(loras / "wrong_width.safetensors", wrong)
    classes = node_classes(pack)

    def load(model, lora_name: str, strength: float):
        return run_node(classes["DreamRelationRelationLoraLoader"], model=model, lora_name=lora_name,
                        strength=strength).outputs

    loaded, report = load(base, "rel_triplet.safetensors", 1.0)
    yield dict(cfg=cfg, weights=weights, base=base, lora=lora, loras=loras, pack=pack, load=load,
               classes=classes, loaded=loaded, report=report)
    folder_paths.folder_names_and_paths["loras"][0][:] = saved


def _pred(patcher, sigma: float = 0.6, seed: int = 1, tokens: int = 5) -> torch.Tensor:
    x, text, mask = cm.inputs(seed=seed, tokens=tokens)
    return cm.comfy_denoised(patcher, x, sigma, text, mask)


# ---------------------------------------------------------------------------------------------
# equivalence with the core (diffusers + peft), python -O subprocess


def test_comfy_patched_prediction_equals_core_relation_only(comfyui):
    env_ = dict(os.environ, COMFYUI_DIR=str(comfyui))  # skipped above where there is no ComfyUI
    proc = subprocess.run([sys.executable, "-O", "-m", "fixtures.comfy_mochi", "twin"], capture_output=True,
                          text=True, timeout=300, env=env_, cwd=str(HERE.parent))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    for sigma in ("0.9", "0.35"):
        r = res[f"sigma_{sigma}"]
        assert r["max_abs_diff"] <= 1e-4, r  # ComfyUI + our loader == diffusers + peft relation-only
        # subject LoRAs of gain 1e3 in the triplet file: same output as the relation-only file
        assert r["max_abs_diff_relation_file"] <= 1e-4, r
        assert r["lora_effect"] > 1e-2, r  # the LoRA does change the output: the check has teeth
    assert "dropped adapters: subject1, subject2" in res["report"]


# ---------------------------------------------------------------------------------------------
# loader


def test_loader_report_and_patches(env):
    rep = env["report"]
    assert "applied relation: 7 modules, rank 4, alpha 8.0, scale 2" in rep
    assert "applied ffn: 3 modules" in rep and "dropped adapters: subject1, subject2" in rep
    assert "blocks: 2 of the model's 2; patched weights: 7" in rep
    keys = sorted(env["loaded"].patches)
    assert keys == sorted(f"diffusion_model.blocks.{i}.attn.{m}.weight" for i in range(2)
                          for m in ("qkv_x", "qkv_y", "proj_x") + (("proj_y",) if i == 0 else ()))
    assert not env["base"].patches  # the input MODEL is left alone


def test_loader_reads_a_file_once_until_it_changes(env):
    lora_module = env["pack"].nodes.lora
    path = str(Path(env["loras"]) / "rel_only.safetensors")
    first = lora_module.read_lora_cached(path)
    assert lora_module.read_lora_cached(path) is first  # a module-level cache: V3 nodes have no instance
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + 5))
    assert lora_module.read_lora_cached(path) is not first


def test_subject_loras_absent_in_comfy(env):
    import folder_paths

    huge = _random_lora(2, env["cfg"]["hidden_size_x"], env["cfg"]["hidden_size_y"], subject_gain=1e4)
    formats.save_triplet(Path(env["loras"]) / "huge_subjects.safetensors", huge)
    assert folder_paths.get_full_path("loras", "huge_subjects.safetensors")
    a, _ = env["load"](env["base"], "huge_subjects.safetensors", 1.0)
    b, _ = env["load"](env["base"], "rel_only.safetensors", 1.0)
    assert torch.equal(_pred(a), _pred(b))


def test_export_through_stock_lora_loader_equals_ours(env):
    import nodes as comfy_nodes

    ours = _pred(env["loaded"])
    stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(env["base"], "rel_stock.safetensors", 1.0)[0]
    assert (_pred(stock) - ours).abs().max().item() <= 1e-5
    # the export node writes the same thing into the loras folder
    exp = env["classes"]["DreamRelationExportRelationLora"]
    args = dict(lora_name="rel_triplet.safetensors", filename="exported_node", dtype="fp32", overwrite=False)
    ran = run_node(exp, **args)
    out = ran.outputs[0]
    assert Path(out).parent == env["loras"] and ran.ui == {"text": [out]}
    stock2 = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(env["base"], Path(out).name, 1.0)[0]
    assert (_pred(stock2) - ours).abs().max().item() <= 1e-5
    with pytest.raises(FileExistsError):
        run_node(exp, **args)


def test_our_loader_reads_the_comfy_export(env):
    # export-comfy's genmo-key file, picked in the Relation LoRA Loader: the same model as our triplet
    ours = _pred(env["loaded"])
    model, report = env["load"](env["base"], "rel_stock.safetensors", 1.0)
    assert "(format genmo)" in report and "applied relation: 7 modules" in report
    assert (_pred(model) - ours).abs().max().item() <= 1e-5


def test_strength_zero_is_base_and_unpatch_restores_bits(env):
    base, load = env["base"], env["load"]
    # the weights as loaded from the "checkpoint", before any LoRA was merged
    original = {k[len("diffusion_model."):]: v for k, v in env["weights"].items()}
    base_out = _pred(base)
    zero, _ = load(base, "rel_triplet.safetensors", 0.0)
    assert torch.equal(_pred(zero), base_out)
    patched_out = _pred(env["loaded"])  # ComfyUI merges the LoRA into the (shared) weights
    assert (patched_out - base_out).abs().max().item() > 1e-3
    merged = env["loaded"].model.diffusion_model.blocks[0].attn.qkv_x.weight
    assert not torch.equal(merged, original["blocks.0.attn.qkv_x.weight"])
    env["loaded"].unpatch_model()
    after = base.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], original[k]) for k in original)
    assert torch.equal(_pred(base), base_out)


def test_loader_errors_name_file_key_and_shapes(env):
    import comfy.model_patcher

    with pytest.raises(comfy_keys_error(), match=r"wrong_width\.safetensors: key blocks\.0\.attn\.\w+: LoRA delta is \[\d+, \d+\].*the MODEL's .* is \[\d+, \d+\]"):
        env["load"](env["base"], "wrong_width.safetensors", 1.0)
    deep = _random_lora(3, env["cfg"]["hidden_size_x"], env["cfg"]["hidden_size_y"])
    formats.save_triplet(Path(env["loras"]) / "three_blocks.safetensors", deep)
    with pytest.raises(comfy_keys_error(), match=r"three_blocks\.safetensors: key blocks\.\d\.attn\.\w+ targets .*the LoRA has 3 blocks, the MODEL has 2 Mochi blocks"):
        env["load"](env["base"], "three_blocks.safetensors", 1.0)
    # not a Mochi: refused before anything is read from the model
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"rel_triplet\.safetensors: a relation LoRA applies to ComfyUI's Mochi .* this MODEL is Linear"):
        env["load"](other, "rel_triplet.safetensors", 1.0)


def comfy_keys_error():
    return formats.LoraFormatError


# ---------------------------------------------------------------------------------------------
# sampler patch (through ComfyUI's own sampling: calc_cond_batch with the wrappers merged)


def _cond(tokens: int, seed: int):
    _, text, mask = cm.inputs(seed=seed, tokens=tokens)
    return [[text, {"attention_mask": mask}]]


def _passes(patcher, sigma: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) denoised of one real sampler step at σ, captured by a sampler CFG function."""
    import comfy.sample
    import comfy.samplers

    seen = {}
    m = patcher.clone()

    def cfg_fn(args):
        seen["cond"], seen["uncond"] = args["cond_denoised"].clone(), args["uncond_denoised"].clone()
        return args["input"] - args["cond"]  # any valid output; we only look at the two passes

    m.set_model_sampler_cfg_function(cfg_fn)
    x, _, _ = cm.inputs(seed=7)
    sampler = comfy.samplers.sampler_object("euler")
    comfy.sample.sample_custom(m, x, 3.0, sampler, torch.tensor([sigma, 0.0]), _cond(5, 11), _cond(4, 12),
                               torch.zeros_like(x), disable_pbar=True, seed=0)
    return seen["cond"], seen["uncond"]


@pytest.fixture(scope="module")
def passes(env):
    return {"base": _passes(env["base"]), "loaded": _passes(env["loaded"])}


def _patch(env, **kw):
    args = dict(strength=1.0, start_percent=0.0, end_percent=1.0, apply_to="cond and uncond", attention_words="")
    args.update(kw)
    return run_node(env["classes"]["DreamRelationMochiSamplerPatch"], model=env["loaded"], **args).outputs


def test_sampler_patch_defaults_equal_loader(env, passes):
    model, rec = _patch(env)
    assert rec is None
    c, u = _passes(model)
    assert torch.equal(c, passes["loaded"][0]) and torch.equal(u, passes["loaded"][1])
    assert (passes["loaded"][0] - passes["base"][0]).abs().max().item() > 1e-3


def test_sampler_patch_empty_range_is_base(env, passes):
    c, u = _passes(_patch(env, start_percent=0.0, end_percent=0.0)[0])
    assert (c - passes["base"][0]).abs().max().item() <= 1e-5
    assert (u - passes["base"][1]).abs().max().item() <= 1e-5


def test_sampler_patch_range_outside_step_is_base_inside_is_loader(env, passes):
    # flow models: percent p <-> sigma = shift-warped 1 - p; σ = 0.6 lies early in the schedule.
    late = _patch(env, start_percent=0.9, end_percent=1.0)[0]
    c, _ = _passes(late, 0.6)
    assert (c - passes["base"][0]).abs().max().item() <= 1e-5
    early = _patch(env, start_percent=0.0, end_percent=0.9)[0]
    c, _ = _passes(early, 0.6)
    assert (c - passes["loaded"][0]).abs().max().item() <= 1e-5


def test_sampler_patch_cond_only_leaves_uncond_base(env, passes):
    c, u = _passes(_patch(env, apply_to="cond only")[0])
    assert (u - passes["base"][1]).abs().max().item() <= 1e-5
    assert (c - passes["loaded"][0]).abs().max().item() <= 1e-5


def test_sampler_patch_strength_two_doubles_the_delta(env, passes):
    strong, _ = _patch(env, strength=2.0)
    twice, _ = env["load"](env["base"], "rel_triplet.safetensors", 2.0)
    c, _ = _passes(strong)
    c2, _ = _passes(twice)
    assert (c - c2).abs().max().item() <= 1e-4


def test_sampler_patch_needs_loader(env):
    with pytest.raises(ValueError, match="connect 'DreamRelation Relation LoRA Loader'"):
        run_node(env["classes"]["DreamRelationMochiSamplerPatch"], model=env["base"], strength=1.0, start_percent=0.0,
                 end_percent=1.0, apply_to="cond only", attention_words="")


def test_ksampler_runs_with_patch_and_attention_maps(env):
    from comfy_extras.nodes_mochi import EmptyMochiLatentVideo

    import nodes as comfy_nodes

    latent = EmptyMochiLatentVideo.execute(width=48, height=32, length=7).result[0]
    maps = {}
    for word in ("#1", "#3"):
        model, rec = _patch(env, apply_to="cond only", start_percent=0.1, attention_words=word)
        out = comfy_nodes.KSampler().sample(model, 0, 3, 4.0, "euler", "simple", _cond(5, 11), _cond(4, 12), latent)[0]
        assert out["samples"].shape == latent["samples"].shape and torch.isfinite(out["samples"]).all()
        img = run_node(env["classes"]["DreamRelationAttentionMaps"], attention=rec, samples=out, word="",
                       colormap="inferno", upscale=1).outputs[0]
        T, H, W = latent["samples"].shape[-3:]
        assert img.shape == (T, H, W, 3) and float(img.min()) >= 0 and float(img.max()) <= 1
        assert rec.count == 3 * 2  # 3 steps x 2 blocks, conditional pass only
        maps[word] = rec.maps()
    assert (maps["#1"] - maps["#3"]).abs().max().item() > 1e-4
    assert maps["#1"].shape == (1, 2, 2, 3)  # (words, T, h, w) token grid of the 2x4x6 latent
    # the patch size comes with the recording, read from the model it ran on
    assert rec.patch_size == 2 and rec.latent_shape() == (2, 4, 6)
    with pytest.raises(ValueError, match=r"recorded attention is for a latent video 2x4x6, samples are \(2, 8, 6\)"):
        run_node(env["classes"]["DreamRelationAttentionMaps"], attention=rec, samples={"samples": torch.zeros(1, 12, 2, 8, 6)},
                 word="", colormap="gray", upscale=1)


def test_token_positions_with_real_mochi_tokenizer(comfyui):
    from comfy.text_encoders.genmo import MochiT5Tokenizer
    from dreamrelation_pack.nodes.sampler import token_positions  # type: ignore[import-not-found]

    tok = MochiT5Tokenizer()
    prompt = "A bear is shaking hands with a raccoon in a meadow."
    pos = token_positions(tok.tokenize_with_weights, prompt, ["bear", "raccoon", "meadow", "#0"])
    ids = [t[0] for t in tok.tokenize_with_weights(prompt)["t5xxl"][0]]
    assert [ids[p] for p in pos[0]] == [4595]  # "▁bear": one piece, token 1 after "▁A"
    assert pos[0] == [1]
    assert [ids[p] for p in pos[1]] == [3, 52, 21007, 106]  # "▁", "r", "acc", "oon" as the word alone
    assert pos[1] == [8, 9, 10, 11] and pos[2] and pos[3] == [0]
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        token_positions(tok.tokenize_with_weights, prompt, ["horse"])
