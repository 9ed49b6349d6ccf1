"""A relation LoRA's own picture: how strong each adapter is per block and where it writes.

For every adapter module (e.g. `relation` on block 3's `to_q`), with dW = scale * B @ A:
- ||dW||_F, and ||dW||_F / ||W||_F against the base weight W it is added to;
- phi(r, rank) between dW's r singular vectors and the top-`rank` ones of the base q, k and v of
  the same block and branch (visual: to_q/to_k/to_v, text: add_*_proj), and of its own base
  weight ("self"; for the output projections the only comparison).
Relation adapters (on Q/K) writing into the base q/k subspaces and subject adapters (on V) into
v's is what the paper's analysis predicts. dW's singular vectors come from the factors (QR of B
and A, SVD of an r x r core): no dense dW is formed for the SVD. The base weights are read block
by block (see `weights`), so a full-size base costs one block's memory.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import LoraFormatError
from ..fileio import atomic_path
from ..lora.files import load_lora_file
from ..lora.layout import LoraSet, parse_module_path
from .plots import plot_lora_report
from .subspace import lowrank_singular_vectors, random_baseline, similarity_grid, singular_vectors
from .weights import WeightFile, mochi_module_ref

QKV_OF_BRANCH = {
    "visual": ("to_q", "to_k", "to_v"),
    "text": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
BRANCH_OF = {m: b for b, mods in QKV_OF_BRANCH.items() for m in mods} | {"to_out.0": "visual", "to_add_out": "text"}


@dataclass
class ModuleResult:
    adapter: str
    block: int
    module: str  # diffusers sub-module name: to_q, add_v_proj, to_out.0, ...
    branch: str
    rank: int  # LoRA rank r (number of dW singular vectors compared)
    norm: float  # ||dW||_F
    base_norm: float  # ||W||_F of the base weight dW is added to
    phi_q: float | None
    phi_k: float | None
    phi_v: float | None
    phi_self: float | None  # None for every phi when dW is zero (an untrained adapter)

    @property
    def rel_norm(self) -> float:
        return self.norm / self.base_norm if self.base_norm else float("nan")


@dataclass
class LoraAnalysis:
    lora: str
    base: str
    rank: int  # top-`rank` base singular vectors
    side: str
    dim: int  # width of the space compared (rows of the visual q for side="left")
    modules: list[ModuleResult] = field(default_factory=list)

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(r.adapter for r in self.modules))

    def mean_phi(self, adapter: str, col: str) -> float | None:
        vals = [getattr(r, f"phi_{col}") for r in self.modules if r.adapter == adapter]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def random_baseline(self) -> float:
        ranks = [r.rank for r in self.modules] or [1]
        return random_baseline(max(ranks), self.rank, self.dim)

    def summary(self) -> dict:
        out = {}
        for a in self.adapters:
            rows = [r for r in self.modules if r.adapter == a]
            out[a] = {
                "modules": len(rows),
                "mean_norm": sum(r.norm for r in rows) / len(rows),
                "mean_rel_norm": sum(r.rel_norm for r in rows) / len(rows),
                "mean_phi": {c: self.mean_phi(a, c) for c in ("q", "k", "v", "self")},
            }
        return out


Progress = Callable[[int, int, str], None]


def _base_vectors(wf: WeightFile, block: int, subs: list[str], k: int, side: str, device: str) -> dict[str, tuple[torch.Tensor, float]]:
    """sub-module -> (top-k singular vectors, ||W||_F) of the base weights, one batched SVD where shapes agree."""
    ws = wf.read_many([mochi_module_ref(wf, block, s) for s in subs])
    out: dict[str, tuple[torch.Tensor, float]] = {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, w in enumerate(ws):
        groups.setdefault(tuple(w.shape), []).append(n)
    for idx in groups.values():
        stack = torch.stack([ws[n] for n in idx]).to(device)
        kk = min(k, *stack.shape[-2:])
        u = singular_vectors(stack, kk, side)
        norms = torch.linalg.matrix_norm(stack).tolist()
        for j, n in enumerate(idx):
            out[subs[n]] = (u[j], float(norms[j]))
    return out


def _phi(ud: torch.Tensor, ub: torch.Tensor) -> float | None:
    if ud.shape[0] != ub.shape[0]:
        return None  # different spaces (e.g. to_out's output vs the q/k/v head space of another width)
    return float(similarity_grid(ud, ub)[-1, -1])


def analyze_lora(
    lora: str | os.PathLike | LoraSet,
    base: str | os.PathLike,
    rank: int = 64,
    side: str = "left",
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> LoraAnalysis:
    """Per adapter module: ||dW||, relative norm and phi to the base q/k/v (see module docstring)."""
    source = str(lora) if not isinstance(lora, LoraSet) else lora.metadata.get("source", "<LoraSet>")
    ls = lora if isinstance(lora, LoraSet) else load_lora_file(lora)
    wf = WeightFile(base)
    by_block: dict[int, list[tuple[str, str, str]]] = {}
    for adapter in ls.adapters:
        for path in ls.weights[adapter]:
            block, sub = parse_module_path(path)
            by_block.setdefault(block, []).append((adapter, path, sub))
    result = LoraAnalysis(source, str(base), rank, side, 0)
    device = str(device)
    for n, block in enumerate(sorted(by_block)):
        entries = by_block[block]
        branches = sorted({BRANCH_OF[sub] for _, _, sub in entries})
        subs = sorted({s for b in branches for s in QKV_OF_BRANCH[b]} | {sub for _, _, sub in entries})
        base_u = _base_vectors(wf, block, subs, rank, side, device)
        if not result.dim:
            result.dim = base_u[QKV_OF_BRANCH[branches[0]][0]][0].shape[0]
        for adapter, path, sub in entries:
            a, b = ls.weights[adapter][path]
            w_shape = wf.ref_shape(mochi_module_ref(wf, block, sub))
            if (b.shape[0], a.shape[1]) != tuple(w_shape):
                raise LoraFormatError(
                    f"{source}: {adapter} on {path} makes a dW of shape {(b.shape[0], a.shape[1])}, the base weight in "
                    f"{base} is {tuple(w_shape)}: LoRA and base model do not match"
                )
            ud, s = lowrank_singular_vectors(b.to(device), a.to(device), side)
            scale = ls.scales[adapter]
            keep = int((s > s.max() * 1e-6).sum())  # directions dW really has (0 for an untrained adapter)
            ud = ud[:, :keep]
            qkv = QKV_OF_BRANCH[BRANCH_OF[sub]]
            phis = {role: (_phi(ud, base_u[m][0]) if sub in qkv and keep else None) for role, m in zip("qkv", qkv)}
            result.modules.append(ModuleResult(
                adapter=adapter, block=block, module=sub, branch=BRANCH_OF[sub], rank=int(a.shape[0]),
                norm=abs(scale) * float(s.norm()), base_norm=base_u[sub][1],
                phi_q=phis["q"], phi_k=phis["k"], phi_v=phis["v"], phi_self=_phi(ud, base_u[sub][0]) if keep else None,
            ))
        if progress is not None:
            progress(n + 1, len(by_block), f"block {block}")
    return result


def write_lora_report(report: LoraAnalysis, out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """lora_report.json (summary per adapter + every module), lora_report.csv, lora_report.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "lora_report.json", "csv": out / "lora_report.csv"}
    payload = {
        "lora": report.lora, "base": report.base, "rank": report.rank, "side": report.side, "dim": report.dim,
        "random_baseline": report.random_baseline(),
        "definition": "dW = scale * B @ A; phi(r, rank) between dW's r singular vectors and the base weight's top-rank ones",
        "adapters": report.summary(),
        "modules": [asdict(r) | {"rel_norm": r.rel_norm} for r in report.modules],
    }
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    cols = ["adapter", "block", "module", "branch", "rank", "norm", "base_norm", "rel_norm", "phi_q", "phi_k", "phi_v", "phi_self"]
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in sorted(report.modules, key=lambda r: (r.adapter, r.block, r.module)):
            row = asdict(r) | {"rel_norm": r.rel_norm}
            w.writerow(["" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in cols])
    if plot:
        norms: dict[str, tuple[list[int], list[float], bool]] = {}
        for r in sorted(report.modules, key=lambda r: r.block):
            blocks, values, _ = norms.setdefault(f"{r.adapter}: {r.module}", ([], [], r.branch == "text"))
            blocks.append(r.block)
            values.append(r.norm)
        phis = {a: {c: report.mean_phi(a, c) for c in ("q", "k", "v", "self")} for a in report.adapters}
        paths["png"] = plot_lora_report(
            norms, phis, report.random_baseline(), out / "lora_report.png",
            f"Relation LoRA: {Path(report.lora).name} on {Path(report.base).name} ({report.side} singular vectors)",
            f"φ(r, {report.rank}) of ΔW vs base",
        )
    return paths
