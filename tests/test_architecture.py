"""The core's import rules (docs/ARCHITECTURE.md), read from the source with `ast`.

Every import counts: top-level and inside functions, relative and absolute, `importlib.import_module`
with a constant name. Between modules of `dreamrelation_core` imports run one way, down the floors
below; siblings on one floor stay independent of each other; no cycles. The core never imports
ComfyUI, and only `cli/` uses argparse and tqdm. Each failure names the importing file, its line
and the imported module.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import _floors as table
import pytest
from _floors import CORE, FLOOR_OF, FLOORS, ROOT

# The floor table (FLOORS, lowest first) is in _floors.py, which docs/ARCHITECTURE.md is generated from.

# Top-level names of ComfyUI itself (its root folder) and of this pack's node layer.
COMFY_NAMES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "folder_paths", "nodes",
               "node_helpers", "server", "execution", "latent_preview", "comfyui_version", "dreamrelation_pack"}
CLI_ONLY = {"argparse", "tqdm"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name as written (absolute)
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def core_modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the core (packages by their __init__.py)."""
    out = {}
    for path in sorted((ROOT / CORE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path) -> list[Import]:
    return imports_in(path.read_text(encoding="utf-8"), module, path.name == "__init__.py",
                      str(path.relative_to(ROOT)))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_in(source: str, module: str, is_package: bool, rel: str) -> list[Import]:
    """Every import in the source, top level or nested, as absolute dotted names: `from X import y`
    gives X.y (a submodule or a name in X: `_core_target` tells which)."""
    tree = ast.parse(source, filename=rel)
    # `if TYPE_CHECKING:` imports are for type checkers only: never executed, so no edge
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    found: list[Import] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, rel, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module or ""
            found += [Import(module, f"{base}.{a.name}" if a.name != "*" else base, rel, node.lineno) for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            name = node.args[0].value
            if name.startswith("."):  # import_module(".x", __package__)
                level = len(name) - len(name.lstrip("."))
                name = _resolve_relative(module, is_package, level, name[level:] or None)
            found.append(Import(module, name, rel, node.lineno))
    return found


def _core_target(name: str, modules: dict[str, Path]) -> str | None:
    """The core module an imported name lands in (longest module prefix), or None outside the core."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def part_of(module: str) -> str:
    """The floor-table entry of a core module: its first name below the package ("" for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    modules = core_modules()
    edges = []
    for module, path in modules.items():
        edges += imports_of(module, path)
    return modules, edges


def _core_edges(graph) -> list[tuple[Import, str]]:
    modules, edges = graph
    out = {}
    for imp in edges:
        target = _core_target(imp.target, modules)
        if target is not None and target != imp.importer:
            out.setdefault((imp.importer, target, imp.line), (imp, target))  # one per statement
    return list(out.values())


def test_the_walk_sees_every_kind_of_import(graph):
    """The scanner itself: relative, absolute, nested and submodule imports are all resolved."""
    modules, _ = graph
    assert len(modules) > 30 and f"{CORE}.errors" in modules and f"{CORE}.lora" in modules
    source = ("from ..errors import DreamRelationError\nfrom . import genmo as g\nimport dreamrelation_core.mochi.tiny\n"
              "def f():\n    from .layout import LoraSet\n    import importlib\n"
              "    importlib.import_module('dreamrelation_core.data.video')\n"
              "    importlib.import_module('..mochi.loading', __package__)\n")
    got = {(i.target, i.line) for i in imports_in(source, f"{CORE}.lora.probe", False, "probe.py")}
    assert got == {(f"{CORE}.errors.DreamRelationError", 1), (f"{CORE}.lora.genmo", 2), (f"{CORE}.mochi.tiny", 3),
                   (f"{CORE}.lora.layout.LoraSet", 5), ("importlib", 6), (f"{CORE}.data.video", 7),
                   (f"{CORE}.mochi.loading", 8)}
    assert _core_target(f"{CORE}.errors.DreamRelationError", modules) == f"{CORE}.errors"
    assert _core_target(f"{CORE}.lora.genmo", modules) == f"{CORE}.lora.genmo"
    assert _core_target("torch.nn", modules) is None


def test_every_part_of_the_core_has_a_floor(graph):
    modules, _ = graph
    unknown = sorted({part_of(m) for m in modules} - set(FLOOR_OF))
    assert not unknown, f"{unknown}: not in the floor table of tests/_floors.py (then run docs/images/make_architecture.py)"
    gone = sorted(set(FLOOR_OF) - {part_of(m) for m in modules} - {""})
    assert not gone, f"{gone}: in the floor table of tests/_floors.py but not in the core"


def test_floor_table_names_every_module():
    missing = table.unnamed_modules()
    assert not missing, (f"{missing}: not named (in backticks) in their part's text in tests/_floors.py; name them, then "
                         "run python docs/images/make_architecture.py")


def test_architecture_page_shows_the_floor_table():
    """docs/ARCHITECTURE.md carries the table generated from _floors.py, as it is now."""
    assert len(table.PARTS) >= len(FLOORS) and FLOORS[FLOOR_OF["errors"]] == ("", "errors")
    shown = table.page_table(table.PAGE.read_text(encoding="utf-8"))
    assert shown is not None, f"{table.PAGE}: the generated floor table's markers are gone"
    assert "`evaluation/`" in shown and "`worker_client`" in shown and "`memory/`" in shown
    assert shown == table.floor_table(), f"{table.PAGE} is stale: run python docs/images/make_architecture.py"
    stale = f"before\n{table.BEGIN}\n| 0 | `errors.py` | old |\n{table.END}\nafter"
    assert table.with_table(stale) == f"before\n{table.floor_table()}\nafter"  # what the generator writes


def floor_violations(edges: list[tuple[Import, str]]) -> list[str]:
    """Imports that go up a floor or sideways to a sibling on the same floor."""
    bad = []
    for imp, target in edges:
        a, b = part_of(imp.importer), part_of(target)
        if a == b or a not in FLOOR_OF or b not in FLOOR_OF:
            continue
        fa, fb = FLOOR_OF[a], FLOOR_OF[b]
        if fb > fa:
            bad.append(f"{imp.where()}: {imp.importer} imports {target}: upward, floor {fa} '{a}' -> floor {fb} '{b}'")
        elif fb == fa:
            bad.append(f"{imp.where()}: {imp.importer} imports {target}: '{a}' and '{b}' share floor {fa} and "
                       "stay independent (move the shared piece a floor down)")
    return bad


def find_cycles(edges: list[tuple[Import, str]]) -> list[str]:
    """Each cycle found by depth-first search, spelled out edge by edge with file:line."""
    adjacency: dict[str, dict[str, Import]] = {}
    for imp, target in edges:
        adjacency.setdefault(imp.importer, {}).setdefault(target, imp)
    colour: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []
    for start in sorted(adjacency):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(adjacency[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                loop = path[path.index(child):] + [child]
                cycles.append(" -> ".join(f"{a} ({adjacency[a][b].where()})" for a, b in zip(loop, loop[1:]))
                              + f" -> {child}")
            elif not colour.get(child):
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(adjacency.get(child, {})))))
    return cycles


def test_the_checks_catch_what_they_are_for():
    def edge(a: str, b: str) -> tuple[Import, str]:
        return Import(f"{CORE}.{a}", f"{CORE}.{b}", f"{a}.py", 7), f"{CORE}.{b}"

    assert floor_violations([edge("lora.files", "errors"), edge("cli.train", "training.trainer")]) == []
    up = floor_violations([edge("mochi.loading", "lora.layout")])
    assert up == [f"mochi.loading.py:7: {CORE}.mochi.loading imports {CORE}.lora.layout: upward, floor 2 'mochi' "
                  "-> floor 4 'lora'"]
    assert "share floor 4" in floor_violations([edge("data.encode", "lora.layout")])[0]
    loop = find_cycles([edge("lora.files", "lora.genmo"), edge("lora.genmo", "lora.layout"),
                        edge("lora.layout", "lora.files"), edge("lora.files", "errors")])
    assert loop == [f"{CORE}.lora.files (lora.files.py:7) -> {CORE}.lora.genmo (lora.genmo.py:7) -> "
                    f"{CORE}.lora.layout (lora.layout.py:7) -> {CORE}.lora.files"]
    assert find_cycles([edge("lora.files", "lora.layout"), edge("lora.genmo", "lora.layout")]) == []


def test_imports_run_down_the_floors(graph):
    bad = floor_violations(_core_edges(graph))
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    cycles = find_cycles(_core_edges(graph))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_core_never_imports_comfyui(graph):
    _, edges = graph
    bad = [f"{i.where()}: {i.importer} imports {i.target}" for i in edges if i.target.split(".")[0] in COMFY_NAMES]
    assert not bad, "the core stays free of ComfyUI (the nodes convert its types):\n" + "\n".join(bad)


def test_only_cli_uses_argparse_and_tqdm(graph):
    _, edges = graph
    bad = [f"{i.where()}: {i.importer} imports {i.target}" for i in edges
           if i.target.split(".")[0] in CLI_ONLY and FLOOR_OF.get(part_of(i.importer), 0) < FLOOR_OF["cli"]]
    assert not bad, "argparse / tqdm belong to cli/; the library takes arguments and progress callbacks:\n" + "\n".join(bad)


def test_benchmarks_import_no_test_file():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"tests", "conftest"}
    bad = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}:{node.lineno}: imports {n}" for n in names if n.split(".")[0] in test_modules]
        if '"tests"' in text or "'tests'" in text:
            bad.append(f"{path.name}: puts tests/ on sys.path")
    assert not bad, "benchmarks take tiny models from fixtures/, never from tests/:\n" + "\n".join(bad)


def test_method_references_name_real_sections():
    """Code comments cite docs/method.md by section heading: each cited heading exists."""
    import re

    headings = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "method.md").read_text(encoding="utf-8"), re.M))
    cited = re.compile(r'method\.md[^"\n]{0,20}((?:"[^"\n]+"(?:, )?)+)')
    bad, seen = [], 0
    for folder in (CORE, "nodes", "fixtures"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for m in cited.finditer(path.read_text(encoding="utf-8")):
                for name in re.findall(r'"([^"]+)"', m.group(1)):
                    seen += 1
                    if name not in headings:
                        bad.append(f"{path.relative_to(ROOT)}: docs/method.md has no section {name!r}")
    assert seen > 0 and not bad, "\n".join(bad) + f"\nsections: {sorted(headings)}"


def tooltip_faults(source: str, rel: str) -> list[str]:
    """Tooltips that are not short full sentences: each starts with a capital letter (or a quoted
    name, a number) and ends with a full stop. Only literal text is judged (f-strings by their ends)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg != "tooltip":
                continue
            parts = kw.value.values if isinstance(kw.value, ast.JoinedStr) else [kw.value]
            first, last = parts[0], parts[-1]
            if not all(isinstance(p, ast.Constant) and isinstance(p.value, str) for p in (first, last)):
                continue
            head, tail = first.value.lstrip(), last.value.rstrip()
            if not (head[:1].isupper() or head[:1] in "'\"0123456789") or not tail.endswith((".", ".)")):
                bad.append(f"{rel}:{kw.value.lineno}: {(head[:40] + ' … ' + tail[-20:]) if len(head) > 60 else head!r}")
    return bad


def test_node_tooltips_in_one_voice():
    bad = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        bad += tooltip_faults(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert tooltip_faults('io.Int.Input("x", tooltip="frames per batch")\nio.Int.Input("y", tooltip="Frames.")', "t.py") \
        == ["t.py:1: 'frames per batch'"]
    assert not bad, "tooltips are short full sentences, capitalised, ending with a full stop:\n" + "\n".join(bad)
