"""Flow-matching conventions, the mask-weighted loss and the sampler."""

import pytest
import torch

from dreamrelation_core.generate import linear_quadratic_sigmas, sample
from dreamrelation_core.mochi.latents import diffusers_timestep
from dreamrelation_core.training.flow import masked_flow_loss, noisy


def test_noisy_and_target():
    z, eps = torch.full((2, 1, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1, 1), -1.0)
    x, u = noisy(z, eps, torch.tensor([0.0, 0.25]))
    assert x.flatten().tolist() == [2.0, 0.75 * 2 + 0.25 * -1]
    assert torch.all(u == 3.0)
    assert diffusers_timestep(torch.tensor([0.0, 1.0, 0.25])).tolist() == [1000.0, 0.0, 750.0]


def test_masked_loss_by_hand():
    pred = torch.zeros(1, 2, 1, 1, 2)
    target = torch.tensor([1.0, 3.0, 2.0, 0.0]).view(1, 2, 1, 1, 2)
    mask = torch.tensor([[[[1.0, 0.0]]]])  # [B, T, h, w]: first pixel only
    total, mse, masked = masked_flow_loss(pred, target, mask, mask_weight=50.0)
    assert mse.item() == pytest.approx((1 + 9 + 4 + 0) / 4)
    # masked MSE averages over all elements, not over the mask area
    assert masked.item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert total.item() == pytest.approx(3.5 + 50 * 1.25)
    # relation mask = M1 + M2 counts overlaps twice
    _, _, m2 = masked_flow_loss(pred, target, mask * 2, 1.0)
    assert m2.item() == pytest.approx(4 * 1.25)


def test_linear_quadratic_schedule():
    s = linear_quadratic_sigmas(64, 0.025)
    assert len(s) == 65 and s[0] == 1.0 and s[-1] == 0.0
    assert all(a > b for a, b in zip(s, s[1:]))
    assert s[32] == pytest.approx(1 - 0.025)  # the linear part ends at the threshold
    # first half linear (constant steps), second half quadratic (constant second differences)
    assert (s[0] - s[1]) == pytest.approx(s[30] - s[31])
    assert (s[33] - 2 * s[34] + s[35]) == pytest.approx(s[50] - 2 * s[51] + s[52])
    assert linear_quadratic_sigmas(1) == [1.0, 0.0]


def test_sampler_exact_velocity_recovers_data():
    z0 = torch.randn(1, 12, 2, 4, 4)

    def velocity(x, sigma):  # the exact u for a one-point data distribution
        eps = (x - (1 - sigma) * z0) / sigma
        return z0 - eps

    steps = []
    out = sample(velocity, torch.randn_like(z0), linear_quadratic_sigmas(8), callback=lambda i, n: steps.append((i, n)))
    assert torch.allclose(out, z0, atol=1e-5)
    assert steps[-1] == (8, 8)
    with pytest.raises(ValueError):
        sample(velocity, z0, [0.5, 0.0])
