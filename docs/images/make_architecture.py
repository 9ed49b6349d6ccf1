"""docs/ARCHITECTURE.md's floor table and docs/images/architecture.png (the floors drawn from the
real import graph), both from tests/_floors.py.

Run from the repository root: python docs/images/make_architecture.py [--page-only]
The floor table and the import scanner are the ones tests/test_architecture.py checks, so the page
and the picture show exactly what the test enforces (and the test fails while the page is stale).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _floors():
    """tests/_floors.py, the floor table (the architecture test imports it the same way)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("_floors")


def _rules():
    _floors()  # on the path for the test's own import
    spec = importlib.util.spec_from_file_location("test_architecture", ROOT / "tests" / "test_architecture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def part_edges(rules) -> tuple[dict[str, int], set[tuple[str, str]]]:
    """Lines of code per floor-table part, and part -> part imports (nodes/ included as 'nodes')."""
    modules = rules.core_modules()
    lines: dict[str, int] = {}
    edges: set[tuple[str, str]] = set()
    sources = [(m, p) for m, p in modules.items()]
    sources += [(f"nodes.{p.stem}", p) for p in sorted((ROOT / "nodes").glob("*.py"))]
    for module, path in sources:
        part = "nodes" if module.startswith("nodes.") else rules.part_of(module)
        lines[part] = lines.get(part, 0) + len(path.read_text(encoding="utf-8").splitlines())
        for imp in rules.imports_of(module, path):
            target = rules._core_target(imp.target, modules)
            if target is not None and rules.part_of(target) != part:
                edges.add((part, rules.part_of(target)))
    return lines, edges


def draw() -> Path:
    rules = _rules()
    lines, edges = part_edges(rules)
    # the package's own __init__.py is empty: not drawn
    floors = [[p for p in row if p in lines and p] for row in rules.FLOORS] + [["nodes"]]
    floors = [row for row in floors if row]
    colours = ["#e8e8e8", "#dfe9f5", "#c9def3", "#cfe8c9", "#f6dcc0", "#f3c9c9", "#e2d3f0", "#f0f0d0", "#ffffff"]
    width, row_h, box_h = 10.0, 1.0, 0.55
    fig, ax = plt.subplots(figsize=(9.5, 0.78 * len(floors) + 0.9))
    ax.set_xlim(-1.6, width + 0.2)  # room for the rounded edge of a full row
    ax.set_ylim(-0.6, len(floors) * row_h)
    ax.axis("off")
    centre: dict[str, tuple[float, float, float]] = {}  # part -> (x, y, box width)
    for level, row in enumerate(floors):
        y = level * row_h
        box_w = min(2.6, (width - 0.4 * (len(row) - 1)) / len(row))
        total = len(row) * box_w + 0.4 * (len(row) - 1)
        x0 = (width - total) / 2
        is_nodes = row == ["nodes"]
        label = "ComfyUI nodes" if is_nodes else f"floor {level}"
        ax.text(-1.5, y + box_h / 2, label, va="center", fontsize=8.5, color="#555555")
        for i, part in enumerate(row):
            x = x0 + i * (box_w + 0.4)
            package = is_nodes or (ROOT / rules.CORE / part).is_dir()
            name = part + ("/" if package else ".py")
            fc = "#fff7d6" if is_nodes else colours[level % len(colours)]
            ax.add_patch(FancyBboxPatch((x, y), box_w, box_h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                        fc=fc, ec="#333333", lw=0.9, ls="--" if is_nodes else "-", zorder=2))
            ax.text(x + box_w / 2, y + box_h * 0.62, name, ha="center", va="center", fontsize=9.5, zorder=3,
                    family="monospace")
            ax.text(x + box_w / 2, y + box_h * 0.25, f"{lines[part]} lines", ha="center", va="center",
                    fontsize=7, color="#555555", zorder=3)
            if is_nodes:  # one arrow stands for all of them: the nodes sit on the whole core
                used = sorted(dst for src, dst in edges if src == "nodes")
                ax.text(x + box_w + 0.2, y + box_h / 2, "imports " + ", ".join(used) + "\n(the core never imports nodes/)",
                        va="center", fontsize=7.5, color="#555555")
            centre[part] = (x + box_w / 2, y, box_w)
    for src, dst in sorted(edges):
        if src not in centre or dst not in centre or src == "nodes":
            continue
        (xs, ys, ws), (xd, yd, wd) = centre[src], centre[dst]
        # leave from the bottom of the importer, arrive on the top of the imported part; offsets by
        # target keep parallel arrows apart
        start = (xs + 0.25 * ws * ((xd - xs) / (abs(xd - xs) + 1.0)), ys)
        end = (xd + 0.25 * wd * ((xs - xd) / (abs(xs - xd) + 1.0)), yd + box_h)
        up = yd > ys
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8, lw=1.6 if up else 0.7,
                                     color="#d62728" if up else "#777777", alpha=0.9 if up else 0.55,
                                     connectionstyle="arc3,rad=0.08", zorder=1))
    top = centre["nodes"]
    ax.add_patch(FancyArrowPatch((top[0], top[1]), (top[0], top[1] - 0.42), arrowstyle="-|>", mutation_scale=12,
                                 lw=2.2, color="#777777", zorder=1))
    core_edges = sum(1 for src, _ in edges if src != "nodes")
    ax.set_title(f"dreamrelation_core floors: each arrow is an import between two parts ({core_edges}, read from "
                 "the source); all run down", fontsize=9.5)
    out = HERE / "architecture.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def write_page() -> Path:
    """Replace the generated floor table in docs/ARCHITECTURE.md by the current one."""
    floors = _floors()
    text = floors.PAGE.read_text(encoding="utf-8")
    new = floors.with_table(text)
    if new != text:
        floors.PAGE.write_text(new, encoding="utf-8")
    return floors.PAGE


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(write_page())
    if "--page-only" not in sys.argv[1:]:
        print(draw())
