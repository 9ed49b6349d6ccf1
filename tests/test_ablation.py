"""The ablation world: rendering reads back exactly, the judge (nearest true clip) and its check, the trainer's
ablation switches, relation placements (a spec operation) through the LoRA files and the loader, and the `ablation`
command's quick chain."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreamrelation_core.ablation import judge, world
from dreamrelation_core.ablation.study import mean_ci, orderings
from dreamrelation_core.base_models import get_spec
from dreamrelation_core.errors import LoraFormatError
from dreamrelation_core.generate import add_relation_lora
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.lora.files import load_lora_file, save_relation_only
from dreamrelation_core.mochi.spec import MOCHI
from dreamrelation_core.mochi.tiny import tiny_transformer
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.trainer import Trainer

SHAPE = (7, 8, 16)


def test_rendering_reads_back_exactly():
    rng = np.random.default_rng(3)
    s1, s2 = world.Subject("green", "star"), world.Subject("orange", "cross")
    clip = world.make_clip("follow", s1, s2, rng, SHAPE)
    dec = judge.decode(clip.latents)
    assert np.array_equal(dec.colour == world.COLOURS.index("green"), clip.mask1.numpy() > 0)
    assert np.array_equal(dec.kind == world.KINDS.index("cross"), clip.mask2.numpy() > 0)
    assert judge.text_alignment(clip.latents, s1, s2) == 1.0
    assert judge.text_alignment(clip.latents, world.Subject("green", "diamond"), s2) == 0.5  # kind differs
    assert judge.leakage(clip.latents, s1, s2) == 0.0
    leaky = world.make_clip("follow", world.Subject("red", "star"), s2, rng, SHAPE)  # an exemplar colour
    assert judge.leakage(leaky.latents, s1, s2) == pytest.approx(0.5)
    assert world.caption(s1, "approach_touch", s2) == "a green star approaches and touches a orange cross"
    assert set(" ".join(world.PHRASES.values()).split()) <= set(world.vocabulary())


def test_new_pairs_never_share_the_exemplars_kinds_or_colours():
    pairs = world.new_pairs(16)
    assert len(set(pairs)) == 16
    taken = {w for pair in world.EXEMPLAR_SUBJECTS for w in pair}
    for s1, s2 in pairs:
        assert s1.colour != s2.colour and s1.kind != s2.kind
        assert not {s1.colour, s1.kind, s2.colour, s2.kind} & taken


def test_layouts_limit_the_motion_not_the_subjects():
    rng = np.random.default_rng(0)
    clips = [world.make_clip("pass_by", *world.random_pair(rng), rng, SHAPE, layouts=3) for _ in range(40)]
    motions = {(c.track1.tobytes(), c.track2.tobytes()) for c in clips}
    assert len(motions) == 3  # every layout drawn, no other
    assert len({(c.subject1, c.subject2) for c in clips}) > 10
    ex = world.exemplars("approach_touch", 4, SHAPE, seed=1, layouts=2)
    assert np.array_equal(ex[0].track1, ex[2].track1) and not np.array_equal(ex[0].track1, ex[1].track1)
    assert all(judge.classify(c.latents, c.subject1, c.subject2) == "approach_touch" for c in ex)
    free = [world.make_clip("pass_by", *world.random_pair(rng), rng, SHAPE) for _ in range(10)]
    assert len({c.track1.tobytes() for c in free}) > 3


def test_base_rope_starts_spread_and_stays_fixed(tmp_path):
    from dreamrelation_core.ablation.base import pretrain
    from dreamrelation_core.ablation.recipe import Recipe

    r = Recipe.quick()
    base = pretrain(dataclasses.replace(r, pretrain_steps=2))
    f = base.transformer_state["pos_frequencies"]  # [3 axes, heads, head_dim / 2]
    assert f[0, 0, 0] == pytest.approx(r.rope_max) and f[0, 0, 3] < f[0, 0, 0]  # time: radians per frame
    assert f[0, :, 1].abs().max() == 0 and (f[1, :, 1] > 0).all()  # one axis per frequency pair
    unit = (192 * 192 / (SHAPE[1] // 2 * SHAPE[2] // 2)) ** 0.5  # rows and columns: per patch
    assert f[2, 0, 2] * unit == pytest.approx(r.rope_max, rel=1e-5)
    again = pretrain(dataclasses.replace(r, pretrain_steps=3))
    assert torch.equal(again.transformer_state["pos_frequencies"], f)  # not learned
    assert not torch.equal(again.transformer_state["proj_out.weight"], base.transformer_state["proj_out.weight"])
    assert dataclasses.replace(r, rope_max=0.0).base_hash() != r.base_hash()


def test_base_starts_sharp_attention_and_spares_norms_from_decay():
    from dreamrelation_core.ablation.base import QK_NORMS, param_groups, pretrain
    from dreamrelation_core.ablation.recipe import Recipe

    r = dataclasses.replace(Recipe.quick(), pretrain_steps=1)
    state = pretrain(r).transformer_state
    def is_qk(key: str) -> bool:
        return key.endswith(".weight") and key.split(".")[-2] in QK_NORMS

    qk = [v for k, v in state.items() if is_qk(k)]
    assert qk and all((v - r.qk_scale).abs().max() < 0.01 for v in qk)  # one AdamW step of lr 1e-3 moved them
    plain = pretrain(dataclasses.replace(r, qk_scale=1.0)).transformer_state
    assert all((plain[k] - 1.0).abs().max() < 0.01 for k in state if is_qk(k))
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    groups = param_groups([w, b], norm_decay=False)
    assert [(g["params"], g["weight_decay"]) for g in groups] == [([w], 0.01), ([b], 0.0)]
    assert param_groups([w, b], norm_decay=True) == [{"params": [w, b], "weight_decay": 0.01}]
    # the earlier bases keep their cache entries: fields at their old values are left out of the hash
    old = dataclasses.replace(r, qk_scale=1.0, norm_decay=True, pretrain_sigma="uniform")
    assert len({old.base_hash(), r.base_hash(), dataclasses.replace(r, norm_decay=True).base_hash()}) == 3
    earlier = Recipe(heads=2, rope_max=1.5, rope_min=0.15, rope_at_more=True, qk_scale=1.0, norm_decay=True,
                     pretrain_sigma="uniform", pretrain_more=2000, more_sigma="logit_normal", more_stages=1,
                     target_share=0.0, target_from_stage=0)
    assert earlier.base_hash() == "686819be532ed7b5"  # an earlier study's base, still found in the cache
    previous = Recipe(more_stages=1, target_share=0.0, target_from_stage=0)
    assert previous.base_hash() == "315677459c86f0c6"  # the previous study's base


def test_pretrain_more_stages_chain_through_the_cache(tmp_path):
    from dreamrelation_core.ablation.base import get_base, load_base
    from dreamrelation_core.ablation.recipe import Recipe

    r = dataclasses.replace(Recipe.quick(), pretrain_steps=2, pretrain_more=2, more_sigma="logit_normal", more_stages=2)
    second = get_base(r, tmp_path)
    assert len(list(tmp_path.glob("base-*/base.json"))) == 3  # first stage, more stage 1, more stage 2
    first_more = load_base(dataclasses.replace(r, more_stages=1), tmp_path)
    assert first_more is not None and first_more.pretrain_seconds < second.pretrain_seconds  # times add up
    key = "proj_out.weight"
    assert not torch.equal(first_more.transformer_state[key], second.transformer_state[key])
    assert get_base(r, tmp_path).cached and r.base_hash() != dataclasses.replace(r, more_stages=1).base_hash()


def test_the_rare_target_enters_at_its_stage(tmp_path):
    from dreamrelation_core.ablation.base import _relation_weights, get_base, load_base
    from dreamrelation_core.ablation.recipe import Recipe

    full = Recipe.full()
    assert full.target_share > 0 and full.target_from_stage == full.more_stages
    # the stage before the target enters is an ordinary base: no target clips, its own (earlier) hash
    before = full.before_stage(full.more_stages - 1)
    assert before.target_share == 0.0 and before.more_stages == full.more_stages - 1
    assert before.base_hash() == dataclasses.replace(full, more_stages=3, target_share=0.0,
                                                     target_from_stage=0).base_hash()
    weights = _relation_weights(full)
    assert weights[world.RELATIONS.index(full.target)] == full.target_share and weights.sum() == pytest.approx(1.0)
    r = dataclasses.replace(Recipe.quick(), pretrain_steps=2, pretrain_more=2, more_sigma="logit_normal", more_stages=2,
                            target_share=0.5, target_from_stage=2)
    get_base(r, tmp_path)
    assert load_base(r.before_stage(1), tmp_path) is not None  # stage 1 without the target ...
    assert r.before_stage(1).target_share == 0.0 and r.before_stage(0).target_share == 0.0
    assert dataclasses.replace(r, target_from_stage=1).before_stage(1).target_share == 0.5  # ... unless it enters there


def test_judge_names_the_nearest_true_clip():
    rng = np.random.default_rng(4)
    p1, p2 = (p.astype(float) for p in world.relation_tracks("jump_over", rng, SHAPE))
    assert judge.classify_tracks(p1, p2, SHAPE) == "jump_over"
    assert judge.track_distances(p1, p2, SHAPE)["jump_over"] == 0.0  # a true clip is in the bank
    off = p1.copy()
    off[3, 0] += 1  # one frame one cell off: within TAU of the true clip
    d = judge.track_distances(off, p2, SHAPE)
    assert d["jump_over"] == pytest.approx((1 / 7) ** 0.5) and judge.classify_tracks(off, p2, SHAPE) == "jump_over"
    through = p1.copy()
    through[:, 0] = p2[0, 0]  # straight through the partner instead of over it: no relation's clip is near
    assert judge.track_distances(through, p2, SHAPE)["jump_over"] > judge.TAU
    assert judge.classify_tracks(through, p2, SHAPE) == "none"
    jerky = p1[[0, 4, 2, 6, 1, 5, 3]]
    assert judge.classify_tracks(jerky, p2, SHAPE) == "none"
    # the judge check's jitter: one cell off on exactly that many frames, kept on the grid
    middle = np.tile([3, 7], (7, 1))
    moved = np.abs(judge.jitter(middle, np.random.default_rng(0), SHAPE, frames=2) - middle).sum(1)
    assert sorted(moved) == [0, 0, 0, 0, 0, 1, 1]
    corner = np.zeros((7, 2), int)
    assert judge.jitter(corner, np.random.default_rng(0), SHAPE, frames=7).min() == 0


def test_judge_reads_blocks_not_speckles():
    rng = np.random.default_rng(5)
    s1, s2 = world.Subject("purple", "triangle"), world.Subject("yellow", "diamond")
    clip = world.make_clip("pass_by", s1, s2, rng, SHAPE)
    z = clip.latents.clone()
    z[world.COLOURS.index("purple"), :, 0, 0] = 1.4  # one stray cell of subject 1's colour on every frame
    z[world.COLOURS.index("yellow"), 3, 7, 15] = 1.4
    assert judge.classify(z, s1, s2) == "pass_by"
    faint = clip.latents * 0.4  # below half the amplitude: no subject at all
    assert judge.classify(faint, s1, s2) == "none"
    assert judge.classify(clip.latents) == "pass_by"  # no prompt: the two colours seen most, in both orders
    assert judge.smooth_tracks(clip.latents, s1, s2) == 1.0 and judge.smooth_tracks(faint, s1, s2) == 0.0
    jumpy = clip.latents.clone()
    jumpy[:, [2, 5]] = clip.latents[:, [5, 2]]  # two frames swapped: both subjects jump there and back
    assert judge.smooth_tracks(jumpy, s1, s2) == 0.0
    frozen = clip.latents.clone()
    frozen[:, 1:] = clip.latents[:, :1]  # both still: smooth, yet near no relation
    assert judge.smooth_tracks(frozen, s1, s2) == 1.0 and judge.classify(frozen, s1, s2) == "none"
    assert judge.relation_distance(clip.latents, s1, s2, "pass_by") == 0.0
    assert judge.TAU < judge.relation_distance(jumpy, s1, s2, "pass_by") < judge.DISTANCE_CAP
    assert judge.relation_distance(frozen, s1, s2, "pass_by") == judge.DISTANCE_CAP  # far: capped
    assert judge.relation_distance(faint, s1, s2, "pass_by") == judge.DISTANCE_CAP  # no subject: the cap


def test_judge_check_is_trustworthy_and_rejects_negatives():
    check = judge.judge_check(SHAPE, per_relation=8, seed=2)
    assert check["trustworthy"]
    assert min(check["ground_truth_accuracy"].values()) == 1.0
    assert min(check["jittered_accuracy"].values()) == 1.0  # two one-cell slips per subject: 0.76 cells at most
    assert check["shuffled_acceptance_mean"] == 0.0 and check["frozen_actor_acceptance_mean"] == 0.0


def test_train_config_takes_the_variants_switches(tmp_path):
    from dreamrelation_core.ablation.recipe import Recipe
    from dreamrelation_core.ablation.study import EXTRA_VARIANTS, VARIANTS, train_config

    r = Recipe.full()
    plain = train_config(r, VARIANTS["plain_lora"], 0, tmp_path)
    assert plain.relation_placement == "qkv" and not plain.subject_loras and plain.num_steps == r.train_steps
    longer = train_config(r, EXTRA_VARIANTS["full_steps_x3"], 1, tmp_path)
    assert longer.num_steps == longer.checkpoint_every == 3 * r.train_steps and longer.seed == 1
    assert EXTRA_VARIANTS["full_steps_x3"] == {"steps_factor": 3}  # the switches are not consumed
    assert train_config(r, EXTRA_VARIANTS["full_mask_weight_5"], 0, tmp_path).mask_weight == 5.0


def test_mean_ci_and_orderings():
    m, half = mean_ci([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and half == pytest.approx(4.303 * 0.2 / 3 ** 0.5)
    assert mean_ci([0.5]) == (0.5, 0.0)
    res = {n: {"mean": {"relation_accuracy": a, "leakage": lk}, "ci95": {"relation_accuracy": 0.05, "leakage": 0.0}}
           for n, a, lk in (("full", 0.6, 0.1), ("no_contrastive", 0.4, 0.1), ("plain_lora", 0.58, 0.3))}
    o = orderings(res)
    assert o["full > no_contrastive"]["holds"] and o["full > no_contrastive"]["intervals_apart"]
    assert o["full > plain_lora"]["holds"] and not o["full > plain_lora"]["intervals_apart"]
    assert o["full leaks less than plain_lora"]["holds"]
    assert "full > base" not in o
    tied = orderings({n: {"mean": {"relation_accuracy": 0.475 + d, "leakage": 0.1}, "ci95": {"relation_accuracy": 0.0,
                                                                                            "leakage": 0.0}}
                      for n, d in (("full", 1e-8), ("base", 0.0))})
    assert not tied["full > base"]["holds"] and not tied["full > base"]["intervals_apart"]


def test_denoising_scores_compare_like_with_like():
    from dreamrelation_core.ablation import denoising
    from dreamrelation_core.ablation.recipe import Recipe

    r = Recipe.quick()
    clips = denoising.held_out(r)
    assert len(clips["pairs"]) == r.pairs
    for p in clips["pairs"]:
        assert set(p["by_relation"]) == set(world.RELATIONS) and world.PHRASES[r.target] in p["prompt"]
        target, look = p["by_relation"][r.target], p["exemplar_look"]
        # the leakage pairs differ in appearance only: the same cells occupied on every frame
        assert torch.equal(target.abs().sum(1) > 0, look.abs().sum(1) > 0) and not torch.equal(target, look)
    assert denoising._wins(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])) == 0.875  # 3 wins + 1 tie of 4
    # every clip is scored at the same draws: identical clips get identical errors
    from dreamrelation_core.mochi.tiny import tiny_transformer

    model = tiny_transformer(seed=0).eval()
    z = torch.randn(1, 12, 3, 8, 16).expand(3, -1, -1, -1, -1)
    y, ym = torch.randn(1, 4, model.config.text_embed_dim), torch.ones(1, 4, dtype=torch.bool)
    e = denoising.errors(model, z, y, ym)
    assert torch.allclose(e, e[0].expand(3)) and torch.equal(e, denoising.errors(model, z, y, ym))


def test_temporal_pooling_reads_the_models_estimate_against_the_noisy_frames():
    from dreamrelation_core.ablation import denoising
    from dreamrelation_core.ablation.base import pretrain
    from dreamrelation_core.ablation.recipe import Recipe

    base = pretrain(dataclasses.replace(Recipe.quick(), pretrain_steps=1))
    model = base.transformer()
    with torch.no_grad():  # u = 0: the model's estimate of the clean clip is the noisy clip itself
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    out = denoising.temporal_pooling(model, base.encode, base.recipe, clips=12)
    assert set(out) == {"0.8", "0.9"}
    for v in out.values():
        assert v["model"] == v["one_frame"]  # no better than one frame: nothing pooled
    assert out["0.8"]["frames_pooled"] > out["0.8"]["one_frame"] + 0.3  # the frames together find the subject
    assert out["0.8"]["one_frame"] > out["0.9"]["one_frame"]


def test_gain_auc_sees_what_a_lora_adds_to_the_target_motion_only(monkeypatch):
    from dreamrelation_core.ablation import denoising
    from dreamrelation_core.ablation.recipe import Recipe

    t = torch.tensor
    # the target motion is harder for both models; the LoRA lowers its error more than the others'
    base = [{"target": t([0.5, 0.6]), "others": t([0.2, 0.3, 0.25]), "look": t([0.9, 0.9])}]
    lora = [{"target": t([0.4, 0.5]), "others": t([0.19, 0.29, 0.24]), "look": t([0.3, 0.9])}]
    monkeypatch.setattr(denoising, "clip_errors", lambda *a: lora)
    s = denoising.scores(None, None, Recipe.quick(), {}, base)
    assert s["relation_auc"] == 0.0  # raw errors: the others always look likelier
    assert s["relation_gain_auc"] == 1.0  # gains: the target's drop is always the larger
    assert s["leakage_auc"] == 0.5 and s["error_change"] < 0  # one exemplar look wins; errors fell


# ---------------------------------------------------------------- trainer switches


@pytest.fixture(scope="module")
def clips():
    out = world.exemplars("approach_touch", 2, SHAPE, seed=0)
    g = torch.Generator().manual_seed(0)
    for c in out:
        c.y_feat, c.y_mask = torch.randn(16, 32, generator=g), torch.ones(16, dtype=torch.bool)
    return out


def _trainer(tmp_path, clips, **kw):
    settings = dict(output_dir=str(tmp_path / "run"), num_steps=6, warmup_steps=0, rank=4, alpha=4.0,
                    learning_rate=5e-3, device="cpu", save_dtype="fp32", checkpoint_every=100)
    cfg = TrainConfig(**{**settings, **kw})
    return Trainer(cfg, clips=clips, model=tiny_transformer(num_layers=2))


def _moved(tr, before):
    return {a for n, p in triplet.lora_parameters(tr.model) if not torch.equal(p, before[n]) for a in [n.split(".")[-2]]}


def test_config_refuses_unknown_switch_values():
    with pytest.raises(ValueError, match="relation_placement must be one of"):
        TrainConfig(relation_placement="o")
    with pytest.raises(ValueError, match="hybrid_masks must be true or false"):
        TrainConfig(hybrid_masks="no")


def test_without_subject_loras_only_relation_and_ffn_train(tmp_path, clips):
    tr = _trainer(tmp_path, clips, subject_loras=False)
    before = {n: p.detach().clone() for n, p in triplet.lora_parameters(tr.model)}
    for _ in range(6):
        branch, losses = tr.train_step()
        assert branch == "relation" and losses["masked"] > 0
    assert _moved(tr, before) == {"relation", "ffn"}


def test_without_hybrid_masks_every_adapter_trains_on_the_plain_loss(tmp_path, clips):
    tr = _trainer(tmp_path, clips, hybrid_masks=False, rcl_weight=0.0)
    before = {n: p.detach().clone() for n, p in triplet.lora_parameters(tr.model)}
    for _ in range(4):
        branch, losses = tr.train_step()
        assert branch == "relation"
        assert losses["total"] == pytest.approx(losses["mse"], rel=1e-6)  # mask_weight 50 not applied
        assert losses["masked"] > 0
    assert _moved(tr, before) == {"relation", "subject1", "subject2", "ffn"}


@pytest.mark.parametrize("placement,module", [("v", "to_v"), ("q", "to_q"), ("qkv", "to_v")])
def test_relation_placement_through_file_and_loader(tmp_path, clips, placement, module):
    tr = _trainer(tmp_path, clips, relation_placement=placement, num_steps=3, subject_loras=False)  # relation every step
    result = tr.train()
    attn = tr.model.transformer_blocks[0].attn1
    assert "relation" in getattr(attn, module).lora_A
    if placement == "q":
        assert not hasattr(attn.to_k, "lora_A")  # no LoRA on K at all
    lora = load_lora_file(result.relation_path)
    assert set(lora.adapters) == {"relation", "ffn"}
    assert lora.metadata["relation_placement"] == placement and lora.spec.relation_placement == placement
    model = add_relation_lora(tiny_transformer(num_layers=2), lora)
    got = model.transformer_blocks[0].attn1
    assert "relation" in getattr(got, module).lora_A
    path = f"transformer_blocks.0.attn1.{module}"
    a, b = lora.weights["relation"][path]
    assert torch.allclose(getattr(got, module).lora_B["relation"].weight, b) and b.abs().sum() > 0
    # a relation adapter on a set of modules no placement names is refused
    lora.weights["relation"] = {p: w for p, w in lora.weights["relation"].items() if not p.endswith("add_v_proj")}
    if placement == "v":
        with pytest.raises(LoraFormatError, match="not one of the known placements"):
            load_lora_file(save_relation_only(tmp_path / "odd.safetensors", lora))
    # the metadata's relation placement must agree with the keys
    with safe_open(str(result.relation_path), framework="pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(sd, str(tmp_path / "lie.safetensors"), metadata={**meta, "relation_placement": "kv"})
    with pytest.raises(LoraFormatError, match="metadata relation_placement 'kv'"):
        load_lora_file(tmp_path / "lie.safetensors")


def test_relation_placement_is_a_spec_operation():
    v = MOCHI.with_relation_placement("v")
    assert v.adapter_modules["relation"] == ("to_v", "add_v_proj") and v.relation_placement == "v"
    assert v.adapter_modules["subject1"] == MOCHI.adapter_modules["subject1"]  # the rest stays
    assert MOCHI.adapter_modules["relation"] == ("to_q", "to_k", "add_q_proj", "add_k_proj")  # unchanged
    assert v != MOCHI and v == MOCHI.with_relation_placement("v") and MOCHI.with_relation_placement("qk") is MOCHI
    assert MOCHI.with_relation_placement("q").target_modules("relation", 2) == [
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.add_q_proj", "transformer_blocks.1.attn1.to_q"]
    for name in MOCHI.relation_placements:
        for n in (1, 2, 3):  # one block: no add_q_proj anywhere
            assert MOCHI.relation_placement_of(MOCHI.with_relation_placement(name).target_modules("relation", n)) == name
    assert MOCHI.relation_placement_of(["transformer_blocks.0.attn1.to_out.0"]) is None
    with pytest.raises(ValueError, match="relation placement 'o' is not known"):
        MOCHI.with_relation_placement("o")
    with pytest.raises(ValueError, match=r"relation placement 'v' is not known; choose one of \('qk',\)"):
        get_spec("wan2.1").with_relation_placement("v")  # Wan knows only its default
    assert get_spec("wan2.1", "self_attention").with_relation_placement("qk") == get_spec("wan2.1", "self_attention")


# ---------------------------------------------------------------- the command


def test_ablation_quick_chain_and_judge_check(tmp_path, monkeypatch):
    from dreamrelation_core.cli import main

    monkeypatch.setenv("DREAMRELATION_CACHE", str(tmp_path / "cache"))
    assert main(["ablation", "--out", str(tmp_path / "check"), "--quick", "--judge-check"]) == 0
    assert json.loads((tmp_path / "check" / "judge_check.json").read_text())["trustworthy"]
    assert main(["ablation", "--out", str(tmp_path / "q"), "--quick", "--seeds", "1", "--pretrain-steps", "30"]) == 0
    out = json.loads((tmp_path / "q" / "ablation.json").read_text())
    assert set(out["variants"]) == {"full", "no_hybrid_masks", "no_contrastive", "no_subject_loras", "relation_on_v",
                                    "relation_on_q", "plain_lora", "base"}
    full = out["variants"]["full"]["seeds"][0]
    assert set(full) >= {"relation_accuracy", "relation_distance", "smooth_tracks", "text_alignment", "leakage",
                         "relation_auc", "leakage_auc", "train_seconds"}
    assert 0 <= full["relation_accuracy"] <= 1 and 0 <= full["smooth_tracks"] <= 1
    assert 0 <= full["relation_distance"] <= judge.DISTANCE_CAP
    assert len(full["distances"]) == 2 and full["relation_distance"] == pytest.approx(np.mean(full["distances"]), abs=1e-3)
    assert out["judge_check"]["trustworthy"]
    known = out["base"]["known_relations"]
    assert set(known) == set(world.RELATIONS) - {"approach_touch"}
    assert all(0 <= v["relation_accuracy"] <= 1 and 0 <= v["smooth_tracks"] <= 1 for v in known.values())
    assert set(out["base"]["temporal_pooling"]) == {"0.8", "0.9"}
    assert 0 <= full["relation_auc"] <= 1 and 0 <= full["leakage_auc"] <= 1 and 0 <= full["relation_gain_auc"] <= 1
    base = out["variants"]["base"]["seeds"][0]  # the gain is measured against the base: none for itself
    assert base["relation_gain_auc"] == 0.5 and base["error_change"] == 0.0
    assert "relation AUC: full > no_contrastive" in out["orderings"] and "distance: full < base" in out["orderings"]
    assert out["recipe"]["base_hash"] and not out["base"]["cached"] and out["recipe"]["pretrain_steps"] == 30
    assert (tmp_path / "q" / "runs" / "relation_on_v" / "seed0" / "relation_only.safetensors").is_file()
    assert list((tmp_path / "cache" / "ablation").glob("base-*/base.json"))
    # the extra variants run on request only, with their own switches
    assert main(["ablation", "--out", str(tmp_path / "mw"), "--quick", "--seeds", "1", "--pretrain-steps", "30",
                 "--variants", "full_mask_weight_1"]) == 0
    mw = json.loads((tmp_path / "mw" / "ablation.json").read_text())["variants"]
    assert list(mw) == ["full_mask_weight_1"] and mw["full_mask_weight_1"]["switches"] == {"mask_weight": 1.0}
    assert mw["full_mask_weight_1"]["paper_relation_accuracy"] is None
