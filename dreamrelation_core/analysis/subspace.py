"""Subspace similarity of two weight matrices (the paper's Figure 5; docs/analysis.md).

    phi(i, j) = || U_A[:, :i]^T  U_B[:, :j] ||_F^2 / min(i, j)

U_A, U_B: singular vectors of the two weights, ordered by singular value. phi is 1 when the
smaller subspace lies inside the larger one and 0 when they are orthogonal; for independent
random subspaces of R^d its expectation is i*j / (d * min(i, j)) = max(i, j) / d.

Which singular vectors. Weights are taken as PyTorch stores a Linear: [out, in], y = W x. The
*left* singular vectors (columns of U in W = U S V^T) span the output space, the space the
projection writes to. Q and K outputs meet in one coordinate system (per head, after RMSNorm and
RoPE, through the dot product q.k), so comparing where W_q and W_k write is meaningful, and
`K = Q O` with O orthogonal (the same outputs reached from a rotated input) gives phi(q, k) = 1.
The *right* singular vectors (side="right") span the input directions a projection reads; Q, K
and V of one branch read the same hidden state, so that view asks a different question
("do they read the same features?"). Both are offered; "left" is the default, as in the paper.

Everything is computed in float32, SVDs batched over a leading dimension.
"""

from __future__ import annotations

import torch

SIDES = ("left", "right")


def singular_vectors(w: torch.Tensor, k: int | None = None, side: str = "left") -> torch.Tensor:
    """Top-k singular vectors of `w` ([..., out, in], batched), as columns: [..., out, k] for
    side="left", [..., in, k] for side="right". float32, on `w`'s device."""
    if side not in SIDES:
        raise ValueError(f"side {side!r}: expected one of {SIDES}")
    if w.ndim < 2:
        raise ValueError(f"singular_vectors: expected a matrix [..., out, in], got shape {tuple(w.shape)}")
    u, _, vh = torch.linalg.svd(w.float(), full_matrices=False)
    vecs = u if side == "left" else vh.mT
    return vecs if k is None else vecs[..., :k]


def lowrank_singular_vectors(b: torch.Tensor, a: torch.Tensor, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Singular vectors and values of the rank-r product B @ A (B [out, r], A [r, in]) without
    forming it: QR of both factors, then the SVD of an r x r core. Returns (vectors [dim, r], S [r])."""
    if side not in SIDES:
        raise ValueError(f"side {side!r}: expected one of {SIDES}")
    qb, rb = torch.linalg.qr(b.float())
    qa, ra = torch.linalg.qr(a.float().mT)
    u, s, vh = torch.linalg.svd(rb @ ra.mT)
    return (qb @ u if side == "left" else qa @ vh.mT), s


def similarity_grid(ua: torch.Tensor, ub: torch.Tensor, imax: int | None = None, jmax: int | None = None) -> torch.Tensor:
    """phi(i, j) for every i in 1..imax, j in 1..jmax at once: [..., imax, jmax].

    ua [..., d, >=imax], ub [..., d, >=jmax]: orthonormal columns. Entry [i-1, j-1] is
    ||ua[:, :i]^T ub[:, :j]||_F^2 / min(i, j): a 2-D cumulative sum of the squared overlaps."""
    if ua.shape[-2] != ub.shape[-2]:
        raise ValueError(
            f"similarity_grid: the singular vectors live in spaces of different size ({ua.shape[-2]} and "
            f"{ub.shape[-2]}): left vectors need equal output widths, right vectors equal input widths"
        )
    imax = ua.shape[-1] if imax is None else imax
    jmax = ub.shape[-1] if jmax is None else jmax
    if imax > ua.shape[-1] or jmax > ub.shape[-1] or imax < 1 or jmax < 1:
        raise ValueError(f"similarity_grid: asked for i<={imax}, j<={jmax} but have {ua.shape[-1]} and {ub.shape[-1]} vectors")
    overlap = (ua[..., :imax].mT.float() @ ub[..., :jmax].float()).square()
    total = overlap.cumsum(-2).cumsum(-1)
    i = torch.arange(1, imax + 1, device=total.device, dtype=total.dtype)
    j = torch.arange(1, jmax + 1, device=total.device, dtype=total.dtype)
    return total / torch.minimum(i[:, None], j[None, :])


def phi(a: torch.Tensor, b: torch.Tensor, i: int, j: int | None = None, side: str = "left") -> float:
    """phi(i, j) between two weight matrices [out, in] (see the module docstring)."""
    j = i if j is None else j
    ua = singular_vectors(a, i, side)
    ub = singular_vectors(b, j, side)
    return float(similarity_grid(ua, ub, i, j)[..., -1, -1])


def random_baseline(i: int, j: int, d: int) -> float:
    """Expected phi(i, j) of independent random subspaces of R^d: max(i, j) / d."""
    return max(i, j) / d
