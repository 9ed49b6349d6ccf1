"""Full-layer Q/K/V subspace similarity of a model file: numbers, tables and the heat map.

For every attention layer the file exposes (see `weights`), the q, k and v weights are read
(float32, scales applied), their singular vectors computed in one batched SVD, and
phi(i, j) (see `subspace`) taken for the pairs q-k, q-v and k-v: at i = j = `rank` per layer,
and on a grid of sizes for the heat map. Per branch the values are averaged over layers.
Outputs (`write_qkv_report`): qkv_similarity.json, qkv_similarity.csv (per layer),
qkv_similarity.png (heat maps). Layers are read and analysed one at a time: memory stays at one
layer's weights and SVD.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fileio import atomic_path
from .plots import plot_similarity_heatmaps
from .subspace import random_baseline, similarity_grid, singular_vectors
from .weights import ROLES, AttentionQKV, WeightFile, detect_layout

PAIRS = (("q", "k"), ("q", "v"), ("k", "v"))
DEFAULT_RANK = 64
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

Progress = Callable[[int, int, str], None]


def pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


@dataclass
class LayerResult:
    branch: str
    layer: int
    name: str
    phi: dict[str, float | None]  # pair -> phi(rank, rank); None where a role is unused


@dataclass
class BranchResult:
    branch: str
    dim: int  # size of the space the singular vectors live in (rows for "left")
    shape: tuple[int, int]  # [out, in] of the q weight of the first layer
    rank: int  # i = j used for the per-layer numbers (the requested rank, capped by the weights)
    sizes: list[int]  # heat-map sizes (those the weights allow)
    layers: list[LayerResult] = field(default_factory=list)
    grid_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # pair -> sum over layers [len(sizes)]^2
    grid_count: dict[str, int] = field(default_factory=dict)

    def mean(self, pair: str) -> float | None:
        vals = [lr.phi[pair] for lr in self.layers if lr.phi.get(pair) is not None]
        return sum(vals) / len(vals) if vals else None

    def std(self, pair: str) -> float | None:
        vals = [lr.phi[pair] for lr in self.layers if lr.phi.get(pair) is not None]
        if len(vals) < 2:
            return None
        m = sum(vals) / len(vals)
        return (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5

    def grid(self, pair: str) -> torch.Tensor | None:
        n = self.grid_count.get(pair, 0)
        return self.grid_sum[pair] / n if n else None


@dataclass
class QKVAnalysis:
    source: str
    family: str
    side: str
    rank_requested: int
    branches: dict[str, BranchResult]

    def summary(self) -> dict[str, dict[str, float | None]]:
        """branch -> pair -> layer-averaged phi(rank, rank)."""
        return {b: {pair_name(*p): r.mean(pair_name(*p)) for p in PAIRS} for b, r in self.branches.items()}

    def to_json(self) -> dict:
        out = {
            "source": self.source,
            "family": self.family,
            "side": self.side,
            "rank_requested": self.rank_requested,
            "definition": "phi(i, j) = ||U_A[:, :i]^T U_B[:, :j]||_F^2 / min(i, j), U = "
            + ("left" if self.side == "left" else "right")
            + " singular vectors of the [out, in] weight; phi(rank, rank) averaged over layers",
            "phi": self.summary(),
            "branches": {},
        }
        for b, r in self.branches.items():
            out["branches"][b] = {
                "layers": len(r.layers),
                "shape": list(r.shape),
                "dim": r.dim,
                "rank": r.rank,
                "random_baseline": random_baseline(r.rank, r.rank, r.dim),
                "phi": {pair_name(*p): r.mean(pair_name(*p)) for p in PAIRS},
                "phi_std": {pair_name(*p): r.std(pair_name(*p)) for p in PAIRS},
                "layers_per_pair": {pair_name(*p): r.grid_count.get(pair_name(*p), 0) for p in PAIRS},
                "sizes": r.sizes,
                "grid": {
                    pair_name(*p): (g.tolist() if (g := r.grid(pair_name(*p))) is not None else None) for p in PAIRS
                },
            }
        return out


def _branch_plan(wf: WeightFile, layers: list[AttentionQKV], rank: int, sizes: Sequence[int], side: str) -> BranchResult:
    shapes = [wf.ref_shape(a.ref(role)) for a in layers for role in ROLES]
    dims = {s[0] if side == "left" else s[1] for s in shapes}
    if len(dims) != 1:
        raise ValueError(
            f"{wf.path}: branch {layers[0].branch!r}: q/k/v weights of different {'output' if side == 'left' else 'input'} "
            f"widths {sorted(dims)}; their {side} singular vectors cannot be compared"
        )
    avail = min(min(s) for s in shapes)
    use_sizes = sorted({int(s) for s in sizes if 1 <= int(s) <= avail})
    return BranchResult(layers[0].branch, dims.pop(), shapes[0], min(rank, avail), use_sizes)


def _layer_vectors(wf: WeightFile, att: AttentionQKV, roles: list[str], k: int, side: str, device: str) -> dict[str, torch.Tensor]:
    ws = wf.read_many([att.ref(r) for r in roles])
    if len({tuple(w.shape) for w in ws}) == 1:  # one batched SVD
        u = singular_vectors(torch.stack(ws).to(device), k, side)
        return dict(zip(roles, u.unbind(0)))
    return {r: singular_vectors(w.to(device), k, side) for r, w in zip(roles, ws)}


def analyze_qkv(
    path: str | os.PathLike,
    rank: int = DEFAULT_RANK,
    sizes: Sequence[int] = DEFAULT_SIZES,
    side: str = "left",
    device: str | torch.device = "cpu",
    branches: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> QKVAnalysis:
    """phi between q, k, v of every attention layer of the model file `path` (see module docstring).

    branches / layers: restrict to these branch names / layer indices (all by default)."""
    if rank < 1:
        raise ValueError(f"rank {rank}: expected >= 1")
    wf = WeightFile(path)
    layout = detect_layout(wf)
    names = layout.branches
    if branches:
        unknown = [b for b in branches if b not in names]
        if unknown:
            raise ValueError(f"{path}: no branch {unknown}; this file has {names}")
        names = [b for b in names if b in branches]
    plan: dict[str, tuple[BranchResult, list[AttentionQKV]]] = {}
    for b in names:
        atts = [a for a in layout.layers(b) if layers is None or a.layer in layers]
        if atts:
            plan[b] = (_branch_plan(wf, atts, rank, sizes, side), atts)
    if not plan:
        raise ValueError(f"{path}: no attention layer left after choosing layers {list(layers or [])}")
    total, done = sum(len(a) for _, a in plan.values()), 0
    for result, atts in plan.values():
        kmax = max([result.rank, *result.sizes])
        idx = torch.tensor([s - 1 for s in result.sizes], dtype=torch.long)
        for att in atts:
            roles = [r for r in ROLES if r not in att.unused]
            u = _layer_vectors(wf, att, roles, kmax, side, str(device))
            phis: dict[str, float | None] = {}
            for a, b in PAIRS:
                name = pair_name(a, b)
                if a not in u or b not in u:
                    phis[name] = None
                    continue
                grid = similarity_grid(u[a], u[b], kmax, kmax).cpu()
                phis[name] = float(grid[result.rank - 1, result.rank - 1])
                sub = grid[idx][:, idx]
                result.grid_sum[name] = result.grid_sum.get(name, torch.zeros_like(sub)) + sub
                result.grid_count[name] = result.grid_count.get(name, 0) + 1
            result.layers.append(LayerResult(att.branch, att.layer, att.name, phis))
            done += 1
            if progress is not None:
                progress(done, total, f"{att.branch} layer {att.layer}")
    return QKVAnalysis(str(path), layout.family, side, rank, {b: r for b, (r, _) in plan.items()})


def write_qkv_report(analysis: QKVAnalysis, out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """qkv_similarity.json / .csv / .png in `out_dir` (written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "qkv_similarity.json", "csv": out / "qkv_similarity.csv"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(analysis.to_json(), indent=2), encoding="utf-8")
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["branch", "layer", "module", "rank", *(pair_name(*p) for p in PAIRS)])
        for b, r in analysis.branches.items():
            for lr in r.layers:
                w.writerow([b, lr.layer, lr.name, r.rank,
                            *("" if lr.phi[pair_name(*p)] is None else f"{lr.phi[pair_name(*p)]:.6f}" for p in PAIRS)])
    if plot:
        paths["png"] = plot_similarity_heatmaps(_heatmap_rows(analysis), out / "qkv_similarity.png",
                                                f"Q/K/V subspace similarity ({analysis.side} singular vectors): "
                                                f"{Path(analysis.source).name}")
    return paths


def _heatmap_rows(analysis: QKVAnalysis) -> list[dict]:
    rows = []
    for br in analysis.branches.values():
        panels = []
        for a, b in PAIRS:
            name = pair_name(a, b)
            grid, mean = br.grid(name), br.mean(name)
            head = f"{br.branch}: {name}"
            panels.append({"pair": name, "grid": grid, "title": f"{head} (q unused)" if grid is None else (
                f"{head}   φ({br.rank},{br.rank}) = {mean:.3f}\n"
                f"random ≈ {random_baseline(br.rank, br.rank, br.dim):.3f}, {br.grid_count[name]} layers")})
        rows.append({"branch": br.branch, "sizes": br.sizes, "panels": panels})
    return rows
