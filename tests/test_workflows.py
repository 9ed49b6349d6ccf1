"""Example workflows through the real ComfyUI frontend and server.

A ComfyUI server (CPU) runs with this pack in its custom_nodes and empty placeholder model files
(validation only checks that the names exist); `ui-to-api.mjs` loads the UI-format workflow into
the real frontend in headless Chromium and writes the API prompt the frontend makes of it;
`POST /prompt` must accept that prompt (it validates every node, input type and widget value).
Needs: ComfyUI (COMFYUI_DIR), Node.js with playwright-core (NODE_PATH) and Chromium — as
`../shared/tools/comfyui-setup --browser` provides. Skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, find_comfyui

pytestmark = pytest.mark.comfyui
# workflow -> node types it must keep after the frontend's conversion
WORKFLOWS = {
    "dreamrelation_generate.json": {"DreamRelationRelationLoraLoader", "DreamRelationMochiSamplerPatch",
                                    "DreamRelationAttentionMaps", "KSampler", "EmptyMochiLatentVideo", "CLIPLoader"},
    "dreamrelation_train.json": {"DreamRelationDataset", "DreamRelationPrepareDataset", "DreamRelationTrain",
                                 "VAELoader", "CLIPLoader", "PreviewImage"},
    "dreamrelation_masks.json": {"LoadVideo", "GetVideoComponents", "DreamRelationSubjectMasks",
                                 "DreamRelationSaveMasks", "PreviewImage"},
}
PLACEHOLDERS = {
    "diffusion_models": ["mochi_preview_dit_bf16.safetensors"],
    "text_encoders": ["t5xxl_fp16.safetensors"],
    "vae": ["mochi_vae.safetensors"],
    "loras": ["shaking_hands_relation.safetensors"],
    "grounding-dino": ["groundingdino_swint_ogc.pth"],
    "sams": ["sam_vit_h_4b8939.pth"],
    "sam2": ["sam2.1_hiera_large.safetensors"],
}
INPUT_PLACEHOLDERS = ["handshake_01.mp4"]  # the masks workflow's example video
# ComfyUI's own socket types our nodes use; our own all start with DREAMRELATION_
COMFY_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "MASK", "LATENT", "STRING", "INT", "FLOAT", "BOOLEAN", "COMBO"}


def _ui_to_api_script() -> Path | None:
    for cand in (ROOT.parent / "shared" / "tools" / "ui-to-api.mjs", Path(os.environ.get("DR_UI_TO_API", "/nonexistent"))):
        if cand.is_file():
            return cand
    return None


def _missing(reason: str) -> None:
    """Skip on a user's machine without the browser tooling; in CI (which installs it) fail."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the workflow tests: {reason}")
    pytest.skip(reason)


def _requirements() -> tuple[Path, Path]:
    comfy = find_comfyui()
    if comfy is None:
        _missing("ComfyUI not found: set COMFYUI_DIR")
    script = _ui_to_api_script()
    if script is None:
        _missing("ui-to-api.mjs not found (../shared/tools, or DR_UI_TO_API)")
    if not os.environ.get("NODE_PATH") or shutil.which("node") is None:
        _missing("Node.js / NODE_PATH with playwright-core missing: run comfyui-setup --browser and export NODE_PATH")
    if not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists():
        _missing("Chromium missing: run comfyui-setup --browser")
    return comfy, script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy, script = _requirements()
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "dreamrelation").symlink_to(ROOT, target_is_directory=True)
    for folder, names in PLACEHOLDERS.items():
        (base / "models" / folder).mkdir(parents=True)
        for n in names:
            (base / "models" / folder / n).write_bytes(b"")
    (base / "input").mkdir()
    for n in INPUT_PLACEHOLDERS:
        (base / "input" / n).write_bytes(b"")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), "--database-url", f"sqlite:///{base}/comfyui.db"],
        cwd=comfy, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(360):  # 180 s: a loaded shared CI machine can take minutes to start it
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI server exited: {(base / 'server.log').read_text()[-3000:]}")
            try:
                _get(f"{url}/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI server did not answer within 180 s")
        yield url, script, base
    finally:
        proc.terminate()  # the server we started, by its own handle
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_server_lists_our_nodes(server):
    url, _, _ = server
    info = _get(f"{url}/object_info")
    for name in ("DreamRelationRelationLoraLoader", "DreamRelationExportRelationLora",
                 "DreamRelationMochiSamplerPatch", "DreamRelationAttentionMaps", "DreamRelationDataset",
                 "DreamRelationPrepareDataset", "DreamRelationTrain", "DreamRelationSubjectMasks",
                 "DreamRelationSaveMasks", "DreamRelationLoadMasks", "DreamRelationScoreClip"):
        assert name in info, f"{name} not registered"
        for section, inputs in info[name]["input"].items():
            if section == "hidden":  # filled in by ComfyUI (output nodes get prompt / extra_pnginfo)
                continue
            for inp, spec in inputs.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
                assert spec[0] in COMFY_TYPES or spec[0].startswith("DREAMRELATION_"), f"{name}.{inp}: {spec[0]}"
        for out in info[name]["output"]:
            assert out in COMFY_TYPES or out.startswith("DREAMRELATION_"), f"{name} output type {out}"


def _convert(server, workflow: Path, tmp_path: Path) -> dict:
    """The API prompt the real frontend makes of a UI-format workflow file."""
    url, script, _ = server
    api = tmp_path / "api.json"
    proc = subprocess.run(["node", str(script), url, str(workflow), str(api), str(tmp_path / "shot.png")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"ui-to-api failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    prompt = json.loads(api.read_text())
    return prompt.get("output", prompt)


def _queue(server, prompt: dict) -> None:
    """POST /prompt must accept the prompt (ComfyUI validates every node, input type and widget value)."""
    url = server[0]
    req = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        pytest.fail(f"POST /prompt rejected the workflow: {e.read().decode()[:3000]}")
    assert body.get("prompt_id") and not body.get("node_errors")
    # Execution would now try to load the empty placeholder models; stop it, validation is the point.
    urllib.request.urlopen(urllib.request.Request(f"{url}/interrupt", data=b"", method="POST"), timeout=10).close()


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_converts_and_validates(server, name, tmp_path):
    prompt = _convert(server, ROOT / "workflows" / name, tmp_path)
    types = {n["class_type"] for n in prompt.values()}
    assert WORKFLOWS[name] <= types, f"lost in conversion: {WORKFLOWS[name] - types}"
    if name == "dreamrelation_generate.json":
        patch = next(n for n in prompt.values() if n["class_type"] == "DreamRelationMochiSamplerPatch")
        assert patch["inputs"]["attention_words"] == "bear, raccoon" and isinstance(patch["inputs"]["clip"], list)
    if name == "dreamrelation_train.json":
        train = next(n for n in prompt.values() if n["class_type"] == "DreamRelationTrain")
        assert train["inputs"]["steps"] == 2000 and train["inputs"]["resume"] is True
        assert train["inputs"]["gradient_checkpointing"] is True  # optional widgets kept their places
    _queue(server, prompt)


def test_workflow_saved_with_the_old_type_name_still_loads(server, tmp_path):
    """Graphs saved before the attention socket type was renamed (DR_ATTENTION) keep working."""
    text = (ROOT / "workflows" / "dreamrelation_generate.json").read_text()
    assert '"DREAMRELATION_ATTENTION"' in text
    old = tmp_path / "generate_saved_earlier.json"
    old.write_text(text.replace('"DREAMRELATION_ATTENTION"', '"DR_ATTENTION"'))
    prompt = _convert(server, old, tmp_path)
    maps = next(n for n in prompt.values() if n["class_type"] == "DreamRelationAttentionMaps")
    patch_id = next(k for k, n in prompt.items() if n["class_type"] == "DreamRelationMochiSamplerPatch")
    assert maps["inputs"]["attention"] == [patch_id, 1]  # the link survived
    _queue(server, prompt)
