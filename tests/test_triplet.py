"""Relation LoRA triplet: targets, activation per branch, gradients and optimizer isolation."""

import torch

from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.lora.layout import target_modules
from dreamrelation_core.mochi.tiny import tiny_transformer

N_LAYERS = 3


def make_model(rank=4, alpha=8.0):
    return triplet.add_triplet(tiny_transformer(num_layers=N_LAYERS), rank=rank, alpha=alpha)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 12, 2, 8, 8, generator=g)
    y = torch.randn(1, 16, 32, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=y, timestep=torch.tensor([400.0]),
                encoder_attention_mask=torch.ones(1, 16, dtype=torch.bool), return_dict=False)


def lora_modules(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def test_targets_exactly_joint_attention():
    model = make_model()
    mods = lora_modules(model)
    expected = {}
    for i in range(N_LAYERS):
        last = i == N_LAYERS - 1
        expected[f"transformer_blocks.{i}.attn1.to_q"] = {"relation"}
        expected[f"transformer_blocks.{i}.attn1.to_k"] = {"relation"}
        expected[f"transformer_blocks.{i}.attn1.add_k_proj"] = {"relation"}
        if not last:
            expected[f"transformer_blocks.{i}.attn1.add_q_proj"] = {"relation"}
            expected[f"transformer_blocks.{i}.attn1.to_add_out"] = {"ffn"}
        expected[f"transformer_blocks.{i}.attn1.to_v"] = {"subject1", "subject2"}
        expected[f"transformer_blocks.{i}.attn1.add_v_proj"] = {"subject1", "subject2"}
        expected[f"transformer_blocks.{i}.attn1.to_out.0"] = {"ffn"}
    assert {n: set(m.lora_A) for n, m in mods.items()} == expected
    assert not any("time_embed" in n for n in mods)  # the pooler's to_q/to_kv/to_out stay plain
    assert target_modules("ffn", N_LAYERS)[-1] == f"transformer_blocks.{N_LAYERS - 1}.attn1.to_out.0"


def test_base_frozen_and_defaults():
    model = triplet.add_triplet(tiny_transformer(num_layers=2))  # defaults 16/16
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    layer = lora_modules(model)["transformer_blocks.0.attn1.to_q"]
    assert layer.r["relation"] == 16 and layer.scaling["relation"] == 1.0
    assert torch.count_nonzero(layer.lora_B["relation"].weight) == 0  # B starts at zero
    assert torch.count_nonzero(layer.lora_A["relation"].weight) > 0


def test_branch_activation_sets_and_grads():
    for branch, adapters in triplet.BRANCH_ADAPTERS.items():
        model = make_model()
        for _, p in triplet.lora_parameters(model):  # non-zero B so every adapter has gradients
            torch.nn.init.normal_(p, std=0.02)
        triplet.activate_branch(model, branch)
        for n, m in lora_modules(model).items():
            assert set(m.active_adapters) == set(m.lora_A) & set(adapters), n
        model(**inputs())[0].square().mean().backward()
        for n, p in triplet.lora_parameters(model):
            adapter = n.split(".")[-2]
            if adapter in adapters:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
            else:
                assert not p.requires_grad and p.grad is None, n


def test_inactive_adapter_contributes_nothing():
    model = make_model()
    triplet.activate_branch(model, "subject2")
    ref = model(**inputs())[0]
    with torch.no_grad():
        for _n, p in triplet.lora_parameters(model, "subject1"):
            p.fill_(100.0)
        for _n, p in triplet.lora_parameters(model, "relation"):
            p.fill_(100.0)
    assert torch.equal(model(**inputs())[0], ref)
    triplet.activate_branch(model, "relation")
    assert not torch.allclose(model(**inputs())[0], ref)


def test_optimizer_touches_only_active_adapters():
    model = make_model()
    with torch.no_grad():
        for _, p in triplet.lora_parameters(model):
            torch.nn.init.normal_(p, std=0.05)
    params = dict(triplet.lora_parameters(model))
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in params.items()}
    triplet.activate_branch(model, "subject1")
    model(**inputs())[0].square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    active = set(triplet.BRANCH_ADAPTERS["subject1"])
    for n, p in params.items():
        changed = not torch.equal(p, before[n])
        assert changed == (n.split(".")[-2] in active), n
        # no momentum state for untouched adapters (no decay, no moments)
        assert (p in opt.state and len(opt.state[p]) > 0) == (n.split(".")[-2] in active), n


def test_draw_branch_uniform_and_seeded():
    g = torch.Generator().manual_seed(3)
    draws = [triplet.draw_branch(g) for _ in range(3000)]
    for b in triplet.BRANCHES:
        assert 900 < draws.count(b) < 1100
    g2 = torch.Generator().manual_seed(3)
    assert [triplet.draw_branch(g2) for _ in range(50)] == draws[:50]


def test_lora_set_round_trip_and_shape_error():
    model = make_model()
    with torch.no_grad():
        for _, p in triplet.lora_parameters(model):
            torch.nn.init.normal_(p)
    ls = triplet.to_lora_set(model)
    assert set(ls.adapters) == {"relation", "subject1", "subject2", "ffn"}
    assert ls.scales["relation"] == 2.0 and ls.num_blocks() == N_LAYERS
    other = make_model()
    filled = triplet.load_lora_set(other, ls)
    assert len(filled) == sum(len(v) for v in ls.weights.values())
    for (n, p), (_, q) in zip(triplet.lora_parameters(model), triplet.lora_parameters(other)):
        assert torch.equal(p, q), n
    wrong = make_model(rank=2)
    try:
        triplet.load_lora_set(wrong, ls)
    except ValueError as e:
        assert "transformer_blocks.0.attn1" in str(e) and "(4, 64)" in str(e)
    else:
        raise AssertionError("rank mismatch not detected")
