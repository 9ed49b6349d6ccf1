"""Figures of the README (run from the repository root: python docs/images/make_figures.py)."""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
HERE = Path(__file__).resolve().parent


def triplet_diagram() -> None:
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.set_xlim(0, 9)
    ax.set_ylim(0, 3.4)
    ax.axis("off")
    colours = {"relation": "#e4572e", "subject": "#4c9be8", "ffn": "#76b041", "base": "#d9d9d9"}

    def box(x, y, w, h, text, c, fs=9):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=c, ec="black", lw=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs)

    for _row, (stream, y) in enumerate((("video tokens", 2.2), ("text tokens", 0.7))):
        ax.text(0.1, y + 0.25, stream, fontsize=10, va="center")
        box(1.4, y, 0.9, 0.5, "W_q", colours["relation"])
        box(2.4, y, 0.9, 0.5, "W_k", colours["relation"])
        box(3.4, y, 0.9, 0.5, "W_v", colours["subject"])
        box(6.4, y, 1.0, 0.5, "W_out", colours["ffn"])
    box(4.6, 0.95, 1.5, 1.6, "joint\nattention", colours["base"], 10)
    ax.annotate("", xy=(4.6, 1.75), xytext=(4.3, 2.45), arrowprops=dict(arrowstyle="->"))
    ax.annotate("", xy=(4.6, 1.75), xytext=(4.3, 0.95), arrowprops=dict(arrowstyle="->"))
    ax.annotate("", xy=(6.4, 2.45), xytext=(6.1, 1.9), arrowprops=dict(arrowstyle="->"))
    ax.annotate("", xy=(6.4, 0.95), xytext=(6.1, 1.6), arrowprops=dict(arrowstyle="->"))
    legend = [("relation LoRA (Q, K): interaction, kept", colours["relation"]),
              ("subject 1 / subject 2 LoRAs (V): appearance, dropped", colours["subject"]),
              ("FFN LoRA (output projections): kept", colours["ffn"])]
    for i, (t, c) in enumerate(legend):
        ax.add_patch(FancyBboxPatch((7.55, 2.6 - i * 0.45), 0.18, 0.18, boxstyle="square,pad=0", fc=c, ec="black", lw=0.6))
        ax.text(7.8, 2.69 - i * 0.45, t, fontsize=7.5, va="center", wrap=True)
    ax.set_title("Relation LoRA triplet in each of Mochi's 48 MM-DiT blocks", fontsize=11)
    fig.savefig(HERE / "triplet.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def synthetic_strip() -> None:
    from dreamrelation_core.data.synthetic import synthetic_clip

    frames, m1, m2 = synthetic_clip(25, (64, 64), 0)
    picks = [0, 8, 16, 24]
    fig, axes = plt.subplots(2, len(picks), figsize=(8, 4.2))
    for j, i in enumerate(picks):
        axes[0, j].imshow(frames[i])
        axes[0, j].set_title(f"frame {i}", fontsize=9)
        over = np.zeros(frames[i].shape[:2] + (3,))
        over[m1[i]] = (1.0, 0.55, 0.1)
        over[m2[i]] = (0.2, 0.5, 1.0)
        axes[1, j].imshow(over)
        for a in axes[:, j]:
            a.axis("off")
    axes[1, 0].set_title("subject 1 / subject 2 masks", fontsize=9, loc="left")
    fig.suptitle("The demo's synthetic clip: two subjects approach and touch (masks exact)", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "synthetic_clip.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    triplet_diagram()
    synthetic_strip()
