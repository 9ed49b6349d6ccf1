"""Pictures of the analysis: phi heat maps, a relation LoRA's picture, Q/K/V feature maps.

matplotlib with the Agg backend (no display); every function takes plain data, writes one PNG and
returns its path (the analysis modules assemble the data: nothing here imports them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..fileio import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_similarity_heatmaps(rows: list[dict], path: str | os.PathLike, title: str) -> Path:
    """One row of panels per branch: rows = [{"branch", "sizes": [i...], "panels": [{"pair": "q-k",
    "grid": [len(sizes)]^2 tensor or None (not computed), "title": str}]}]."""
    plt = _plt()
    ncols = max(len(r["panels"]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.8 * ncols, 3.4 * len(rows)), squeeze=False)
    fig.subplots_adjust(wspace=0.45, hspace=0.5)  # room for each panel's axis labels and two-line title
    im = None
    for ax_row, row in zip(axes, rows):
        labels = [str(s) for s in row["sizes"]]
        for ax, panel in zip(ax_row, row["panels"]):
            a, b = panel["pair"].split("-")
            grid = panel["grid"]
            if grid is None:
                ax.set_axis_off()
                ax.set_title(panel["title"], fontsize=8)
                continue
            im = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
            ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_xlabel(f"j ({b})", fontsize=8)
            ax.set_ylabel(f"i ({a})", fontsize=8)
            if len(labels) <= 10:
                for y in range(len(labels)):
                    for x in range(len(labels)):
                        v = float(grid[y, x])
                        ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                                color="black" if v > 0.6 else "white")
            ax.set_title(panel["title"], fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="φ(i, j)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_lora_report(norms: dict[str, tuple[list[int], list[float], bool]], phis: dict[str, dict[str, float | None]],
                     baseline: float, path: str | os.PathLike, title: str, phi_label: str) -> Path:
    """Left: norms[label] = (blocks, ||dW||_F per block, text branch?) as lines (dashed: text).
    Right: phis[adapter][column] as grouped bars, with the random-subspace level `baseline`."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for n, (label, (blocks, values, text)) in enumerate(sorted(norms.items())):
        ax.plot(blocks, values, "--" if text else "-", marker=".", color=f"C{n % 10}", label=label)
    ax.set_xlabel("block")
    ax.set_ylabel("‖ΔW‖_F")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("adapter strength per block (dashed: text branch)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    adapters = list(phis)
    cols = list(next(iter(phis.values()), {}))
    width = 0.8 / max(len(cols), 1)
    for c, col in enumerate(cols):
        vals = [phis[a][col] for a in adapters]
        ax2.bar([i + c * width for i in range(len(adapters))], [v if v is not None else 0.0 for v in vals],
                width=width, label=f"base {col}" if col != "self" else "own base weight")
    ax2.axhline(baseline, color="grey", lw=0.8, ls=":", label="random subspaces")
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(adapters))], adapters)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel(phi_label)
    ax2.set_title("where the LoRA writes", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_feature_maps(maps: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike, title: str = "") -> Path:
    """Rows: one per run (e.g. "base", "lora"), plus their difference when there are two;
    columns: Q, K, V. Each panel has its own colour scale."""
    plt = _plt()
    runs = list(maps)
    rows = [(run, maps[run], "viridis") for run in runs]
    if len(runs) == 2:
        a, b = runs
        rows.append((f"{b} − {a}", {r: maps[b][r] - maps[a][r] for r in maps[a]}, "RdBu_r"))
    roles = list(maps[runs[0]])
    fig, axes = plt.subplots(len(rows), len(roles), figsize=(3.4 * len(roles), 2.8 * len(rows)), squeeze=False)
    for ax_row, (label, m, cmap) in zip(axes, rows):
        for ax, role in zip(ax_row, roles):
            img = m[role].float().numpy()
            kw = {}
            if cmap == "RdBu_r":
                lim = float(abs(img).max()) or 1.0
                kw = {"vmin": -lim, "vmax": lim}
            im = ax.imshow(img, cmap=cmap, **kw)
            ax.set_title(f"{label}: {role.upper()}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title or "Q/K/V features of the visual tokens (mean over heads, layers and frames)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def png_to_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """A PNG as ComfyUI's IMAGE: float [1, H, W, 3] in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
