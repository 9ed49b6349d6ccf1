"""Pictures of the shipped workflows as ComfyUI's real frontend draws them (for the README).

Run from the repository root: `python docs/images/make_workflow_pictures.py [name.json ...]`.
It starts the tests' ComfyUI server (tests/_e2e_server.py: ComfyUI's own main.py with this pack,
on a free loopback port, stopped afterwards), puts empty placeholder files under the model names
the workflows use (so the loaders' lists hold them, as on a user's machine), loads each workflow
into the frontend in headless Chromium (`ui-to-api.mjs`, which also takes the screenshot) and
writes docs/images/workflow_<name>.png. The picture is taken of a copy of the workflow whose view
(zoom and offset, `extra.ds`) frames every node; the shipped files keep their own view. Needs what the workflow tests need: COMFYUI_DIR, Node.js
with playwright-core (NODE_PATH) and Chromium.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


VIEW = (1500, 900)  # canvas pixels the screenshot shows, next to the frontend's side bar and menu
ROW = 22  # rough height of a node's title or widget row: sizes in the file are often short


def framed(workflow: dict) -> dict:
    """A copy of a UI workflow whose view shows the bounding box of all its nodes."""
    boxes = []
    for n in workflow["nodes"]:
        (x, y), (w, h) = n["pos"], n.get("size", [300, 100])
        rows = 1 + len(n.get("widgets_values") or []) + max(len(n.get("inputs", [])), len(n.get("outputs", [])))
        boxes.append((x, y - 30, x + w, y + max(h, rows * ROW)))
    x0, y0 = min(b[0] for b in boxes) - 20, min(b[1] for b in boxes) - 20
    x1, y1 = max(b[2] for b in boxes) + 20, max(b[3] for b in boxes) + 20
    scale = round(min(VIEW[0] / (x1 - x0), VIEW[1] / (y1 - y0), 1.0), 3)
    out = json.loads(json.dumps(workflow))
    out.setdefault("extra", {})["ds"] = {"scale": scale, "offset": [-x0, -y0]}
    return out


def main(names: list[str]) -> None:
    from _e2e_server import frontend_problem, start_server
    from test_workflows import INPUT_PLACEHOLDERS, PLACEHOLDERS

    from fixtures.comfyui import find_comfyui

    comfy = find_comfyui()
    problem = frontend_problem() or (None if comfy else "ComfyUI not found: set COMFYUI_DIR")
    if problem:
        raise SystemExit(problem)
    workflows = [ROOT / "workflows" / n for n in names] or sorted((ROOT / "workflows").glob("*.json"))
    with tempfile.TemporaryDirectory() as tmp, start_server(Path(tmp) / "comfy", comfy) as server:
        for folder, files in PLACEHOLDERS.items():
            for f in files:
                server.models(folder).mkdir(parents=True, exist_ok=True)
                (server.models(folder) / f).write_bytes(b"")
        for f in INPUT_PLACEHOLDERS:
            (server.input / f).write_bytes(b"")
        work = Path(tmp) / "work"
        work.mkdir()
        for wf in workflows:
            copy = work / wf.name
            copy.write_text(json.dumps(framed(json.loads(wf.read_text()))))
            server.to_api(copy, work)  # also writes work/<stem>.png, the frontend's screenshot
            out = HERE / f"workflow_{wf.stem}.png"
            shutil.copyfile(work / f"{wf.stem}.png", out)
            print(out.relative_to(ROOT))


if __name__ == "__main__":
    main(sys.argv[1:])
