"""Loss-curve plot of a training history (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def plot_losses(history: list[dict[str, Any]], path: str | os.PathLike, title: str = "Relation LoRA training") -> Path:
    """Reconstruction terms (log scale, left) and the relational contrastive loss (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    k = max(1, len(history) // 15)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("total", "total"), ("mse", "MSE (all pixels)"), ("masked", "masked MSE (subjects)")):
        vals = [h[key] for h in history]
        ax.plot(steps, vals, alpha=0.25)
        ax.plot(steps, _smooth(vals, k), label=label, color=ax.lines[-1].get_color())
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("reconstruction (mask weight applied in total)")
    ax.legend(fontsize=8)
    rcl = [(h["step"], h["rcl"]) for h in history if not math.isnan(h["rcl"])]
    if rcl:
        ax2.plot([s for s, _ in rcl], [v for _, v in rcl], alpha=0.25, color="C3")
        ax2.plot([s for s, _ in rcl], _smooth([v for _, v in rcl], k), color="C3", label="RCL")
    ax2.set_xlabel("step")
    ax2.set_title("relational contrastive loss")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
