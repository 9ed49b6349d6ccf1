"""Our Mochi attention processor: the same outputs and gradients as diffusers' own, with the text
mask's nonzero computed once per step instead of in every block's forward and recompute."""

import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from dreamrelation_core.mochi import attention
from dreamrelation_core.mochi.tiny import tiny_transformer


def _step(model, checkpointing: bool, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, 8, 8, generator=g)
    y = torch.randn(2, 16, 32, generator=g)
    ym = torch.ones(2, 16, dtype=torch.bool)
    ym[0, 11:], ym[1, 5:] = False, False  # two clips with different numbers of padded text tokens
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    calls, nonzero = [], torch.nonzero

    def counting(*args, **kwargs):  # both processors call torch.nonzero: count the host waits
        calls.append(1)
        return nonzero(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "nonzero", counting)
        out = model(x, y, timestep=torch.tensor([300.0, 700.0]), encoder_attention_mask=ym, return_dict=False)[0]
        out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, len(calls)


def test_same_outputs_and_gradients_as_diffusers_with_one_nonzero_per_clip(monkeypatch):
    layers = 3
    stock = tiny_transformer(num_layers=layers, seed=3)
    ours = tiny_transformer(num_layers=layers, seed=3)
    assert all(isinstance(b.attn1.processor, MochiAttnProcessor2_0) for b in stock.transformer_blocks)
    proc = attention.install(ours)
    stock.train(), ours.train()
    for ckpt in (False, True):
        out_s, grads_s, calls_s = _step(stock, ckpt, monkeypatch)
        out_o, grads_o, calls_o = _step(ours, ckpt, monkeypatch)
        assert torch.equal(out_o, out_s)
        assert grads_o.keys() == grads_s.keys() and len(grads_s) > 0
        assert all(torch.equal(grads_o[n], grads_s[n]) for n in grads_s)
        passes = 2 if ckpt else 1  # forward, and the recompute in backward
        assert calls_s == 2 * layers * passes  # diffusers: one per clip, block and pass
        assert calls_o == 2  # ours: one per clip and step
    assert proc.compaction.computed == 2  # once per step (a new mask tensor each step)


def test_compaction_follows_in_place_changes():
    c = attention.TextCompaction()
    m = torch.tensor([[True, False, True]])
    assert c.indices(m)[0].tolist() == [0, 2]
    assert c.indices(m)[0].tolist() == [0, 2] and c.computed == 1
    m[0, 1] = True
    assert c.indices(m)[0].tolist() == [0, 1, 2] and c.computed == 2
