"""phi(i, j) on hand-made matrices with known subspaces."""

from __future__ import annotations

import pytest
import torch

from dreamrelation_core.analysis.subspace import (
    lowrank_singular_vectors,
    phi,
    random_baseline,
    similarity_grid,
    singular_vectors,
)


def _with_left_space(basis: torch.Tensor, inp: int, g: torch.Generator) -> torch.Tensor:
    """A matrix [d, inp] whose column space is spanned by `basis` [d, r] (distinct singular values)."""
    r = basis.shape[1]
    s = torch.linspace(3.0, 1.0, r)
    right, _ = torch.linalg.qr(torch.randn(inp, r, generator=g))
    return basis @ torch.diag(s) @ right.T


def test_identical_matrices_give_one_everywhere() -> None:
    w = torch.randn(40, 30)
    grid = similarity_grid(singular_vectors(w), singular_vectors(w))
    # phi(i, i) = 1 exactly; phi(i, j) = 1 too: the smaller subspace lies inside the larger one
    assert torch.allclose(grid, torch.ones_like(grid), atol=1e-4)
    assert phi(w, w, 7) == pytest.approx(1.0, abs=1e-5)


def test_rotated_input_keeps_left_vectors_but_not_right() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(48, 48, generator=g)
    o, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    k = q @ o  # same outputs reached from a rotated input
    assert phi(q, k, 8) == pytest.approx(1.0, abs=1e-4)
    assert phi(q, k, 8, side="right") < 0.6  # the input-side subspaces were rotated away


def test_orthogonal_subspaces_give_zero() -> None:
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    a = _with_left_space(basis[:, :8], 20, g)  # writes only to directions 0..7
    b = _with_left_space(basis[:, 8:16], 20, g)  # only to directions 8..15
    assert phi(a, b, 8) == pytest.approx(0.0, abs=1e-5)
    # partial overlap: B spans half of A's top-8 space -> phi(8, 8) = 4 / 8
    c = _with_left_space(torch.cat([basis[:, :4], basis[:, 8:12]], 1), 20, g)
    assert phi(a, c, 8) == pytest.approx(0.5, abs=1e-4)


@pytest.fixture(scope="module")
def random_pairs() -> torch.Tensor:
    """Top-64 left singular vectors of 6 independent pairs of random [512, 192] matrices."""
    g = torch.Generator().manual_seed(2)
    return singular_vectors(torch.randn(6, 2, 512, 192, generator=g), 64)  # batched over trials and the pair


@pytest.mark.parametrize(("i", "j"), [(16, 16), (8, 64), (64, 32)])
def test_random_matrices_near_max_over_d(random_pairs: torch.Tensor, i: int, j: int) -> None:
    u = random_pairs
    vals = similarity_grid(u[:, 0], u[:, 1])[:, i - 1, j - 1]
    expected = random_baseline(i, j, 512)
    assert float(vals.mean()) == pytest.approx(expected, rel=0.15)


def test_grid_matches_direct_formula_and_batches() -> None:
    ua = torch.linalg.qr(torch.randn(2, 30, 10))[0]
    ub = torch.linalg.qr(torch.randn(2, 30, 12))[0]
    grid = similarity_grid(ua, ub)
    assert grid.shape == (2, 10, 12)
    for n, i, j in ((0, 3, 5), (1, 10, 12), (1, 7, 1)):
        direct = (ua[n, :, :i].T @ ub[n, :, :j]).norm() ** 2 / min(i, j)
        assert float(grid[n, i - 1, j - 1]) == pytest.approx(float(direct), rel=1e-5)


def test_lowrank_vectors_span_the_product() -> None:
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(50, 4, generator=g), torch.randn(4, 30, generator=g)
    u, s = lowrank_singular_vectors(b, a)
    dense_u, dense_s, _ = torch.linalg.svd(b @ a)
    assert torch.allclose(s, dense_s[:4], rtol=1e-4)
    grid = similarity_grid(u, dense_u[:, :4])
    assert float(grid[-1, -1]) == pytest.approx(1.0, abs=1e-5)
    v, _ = lowrank_singular_vectors(b, a, side="right")
    assert v.shape == (30, 4)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="side"):
        singular_vectors(torch.randn(4, 4), side="middle")
    with pytest.raises(ValueError, match="different size"):
        similarity_grid(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="asked for"):
        similarity_grid(torch.randn(5, 2), torch.randn(5, 2), 3, 1)
