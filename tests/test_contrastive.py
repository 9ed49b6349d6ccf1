"""Relational contrastive loss and its memory banks, against values computed by hand."""

import math

import pytest
import torch

from dreamrelation_core.training.contrastive import (
    MemoryBank,
    RCLSettings,
    RelationalContrastiveLoss,
    frame_features,
    multi_positive_info_nce,
    relational_features,
)


def cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def nce_by_hand(anchor, positives, negatives, tau):
    pos = [math.exp(cos(anchor, p) / tau) for p in positives]
    neg = [math.exp(cos(anchor, n) / tau) for n in negatives]
    return -math.log(sum(pos) / (sum(pos) + sum(neg)))


def pred_from_frames(s):
    """[T, C] frame features -> pred [1, C, T, 2, 2] whose spatial mean is s."""
    t, c = s.shape
    noise = torch.randn(1, c, t, 2, 2)
    noise = noise - noise.mean(dim=(3, 4), keepdim=True)
    return s.T[None, :, :, None, None] + noise


def test_features_by_hand():
    pred = torch.zeros(1, 2, 3, 2, 2)
    pred[0, 0, :, 0, 0] = torch.tensor([4.0, 8.0, 0.0])  # mean over 4 pixels: 1, 2, 0
    pred[0, 1] = 1.0
    s = frame_features(pred)
    assert torch.allclose(s, torch.tensor([[[1.0, 1.0], [2.0, 1.0], [0.0, 1.0]]]))
    assert torch.allclose(relational_features(s), torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]]))
    with pytest.raises(ValueError, match=r"\[B, C, T, h, w\]"):
        frame_features(torch.zeros(2, 3, 4))


def test_info_nce_matches_hand():
    torch.manual_seed(1)
    a = torch.randn(3, 5)
    pos = torch.randn(3, 2, 5)
    neg = torch.randn(3, 4, 5)
    expected = sum(nce_by_hand(a[i], pos[i], neg[i], 0.07) for i in range(3)) / 3
    assert multi_positive_info_nce(a, pos, neg, 0.07).item() == pytest.approx(expected, rel=1e-5)


def test_memory_bank_fifo_and_state():
    bank = MemoryBank(3)
    for i in range(5):
        bank.push(torch.full((1, 2), float(i)))
    assert len(bank) == 3
    assert [e[0].item() for e in bank.entries] == [2.0, 3.0, 4.0]  # oldest two gone
    bank.push(torch.stack([torch.full((2,), 5.0), torch.full((2,), 6.0)]))
    assert [e[0].item() for e in bank.entries] == [4.0, 5.0, 6.0]
    other = MemoryBank(1)
    other.load_state_dict(bank.state_dict())
    assert other.size == 3 and len(other) == 3  # all() over zip() below would pass on an empty bank
    assert all(torch.equal(x, y) for x, y in zip(other.entries, bank.entries))
    with pytest.raises(ValueError):
        MemoryBank(0)


def test_rcl_no_positives_first_step_then_hand_value():
    torch.manual_seed(0)
    t, c = 4, 6
    rcl = RelationalContrastiveLoss(RCLSettings(positives_per_anchor=1, negatives=4, temperature=0.07))
    g = torch.Generator().manual_seed(0)
    s_prev, s_now = torch.randn(t, c), torch.randn(t, c)
    assert rcl.loss(pred_from_frames(s_prev), g) is None  # empty positive bank: no RCL term
    rcl.update(pred_from_frames(s_prev))
    assert len(rcl.positive_bank) == 1 and len(rcl.negative_bank) == t
    loss = rcl.loss(pred_from_frames(s_now), g)
    a_prev, a_now = s_prev[1:] - s_prev[:-1], s_now[1:] - s_now[:-1]
    # one positive: the previous anchor at the same index; negatives: the T current frames
    expected = sum(nce_by_hand(a_now[i], [a_prev[i]], list(s_now), 0.07) for i in range(t - 1)) / (t - 1)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_rcl_negative_bank_fills_up_to_negatives():
    t, c = 3, 5
    rcl = RelationalContrastiveLoss(RCLSettings(positives_per_anchor=4, negatives=t + 2))
    g = torch.Generator().manual_seed(0)
    first = torch.randn(t, c)
    rcl.update(pred_from_frames(first[:2]))  # other length: 2 frames, 1 anchor
    assert rcl.loss(pred_from_frames(torch.randn(t, c)), g) is None  # positives must match the length
    rcl = RelationalContrastiveLoss(RCLSettings(positives_per_anchor=4, negatives=t + 2, negative_bank_size=2))
    s_prev, s_now = torch.randn(t, c), torch.randn(t, c)
    rcl.update(pred_from_frames(s_prev))
    assert len(rcl.negative_bank) == 2  # bank size 2 keeps the last two frames of s_prev
    loss = rcl.loss(pred_from_frames(s_now), g)
    a_prev, a_now = s_prev[1:] - s_prev[:-1], s_now[1:] - s_now[:-1]
    # positives: min(4, bank) = 1; negatives: T current + 2 drawn = the whole negative bank
    negs = list(s_now) + [s_prev[1], s_prev[2]]
    expected = sum(nce_by_hand(a_now[i], [a_prev[i]], negs, 0.07) for i in range(t - 1)) / (t - 1)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_rcl_positive_sampling_draws_k_distinct_same_index():
    t, c = 5, 4
    rcl = RelationalContrastiveLoss(RCLSettings(positives_per_anchor=2, negatives=t))
    entries = [torch.randn(t, c) for _ in range(6)]
    for s in entries:
        rcl.update(pred_from_frames(s))
    assert len(rcl.positive_bank) == 6
    # replicate the draw to check: all values of the loss come from entries at the anchor's index
    s_now = torch.randn(t, c)
    a_now = s_now[1:] - s_now[:-1]
    g = torch.Generator().manual_seed(5)
    loss = rcl.loss(pred_from_frames(s_now), g)
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(t - 1, generator=g)
    picks = [torch.randperm(6, generator=g)[:2] for _ in range(t - 1)]
    anchors_prev = [e[1:] - e[:-1] for e in entries]
    expected = sum(
        nce_by_hand(a_now[order[j]], [anchors_prev[int(p)][order[j]] for p in picks[j]], list(s_now), 0.07)
        for j in range(t - 1)
    ) / (t - 1)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert all(len(set(p.tolist())) == 2 for p in picks)


def test_rcl_gradients_reach_current_frames_not_bank():
    t, c = 4, 3
    rcl = RelationalContrastiveLoss()
    rcl.update(pred_from_frames(torch.randn(t, c)))
    pred = pred_from_frames(torch.randn(t, c)).requires_grad_(True)
    loss = rcl.loss(pred, torch.Generator().manual_seed(0))
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(not e.requires_grad for e in rcl.positive_bank.entries)


def test_rcl_batch_of_two_and_state_round_trip():
    rcl = RelationalContrastiveLoss()
    rcl.update(torch.randn(2, 12, 4, 2, 2))
    assert len(rcl.positive_bank) == 2 and len(rcl.negative_bank) == 8  # one entry per sample, T per sample
    pred = torch.randn(2, 12, 4, 2, 2)
    l1 = rcl.loss(pred, torch.Generator().manual_seed(1))
    other = RelationalContrastiveLoss()
    other.load_state_dict(rcl.state_dict())
    assert torch.equal(other.loss(pred, torch.Generator().manual_seed(1)), l1)
