"""Example workflows through the real ComfyUI frontend and server.

The session's ComfyUI server (conftest `comfy_server`, tests/_e2e_server.py) with empty placeholder
model files (validation only checks that the names exist); `ui-to-api.mjs` loads the UI-format
workflow into the real frontend in headless Chromium and writes the API prompt the frontend makes
of it; `POST /prompt` must accept that prompt (it validates every node, input type and widget
value). Executing the workflows on tiny models: tests/test_server_workflows.py.
Needs: ComfyUI (COMFYUI_DIR), Node.js with playwright-core (NODE_PATH) and Chromium — as
`../shared/tools/comfyui-setup --browser` provides. Skips with the reason otherwise (fails in CI).
"""

from __future__ import annotations

import json

import pytest
from _e2e_server import PromptRejected, frontend_problem, missing
from conftest import ROOT

pytestmark = pytest.mark.comfyui
# workflow -> node types it must keep after the frontend's conversion
WORKFLOWS = {
    "dreamrelation_generate.json": {"DreamRelationRelationLoraLoader", "DreamRelationMochiSamplerPatch",
                                    "DreamRelationAttentionMaps", "KSampler", "EmptyMochiLatentVideo", "CLIPLoader",
                                    "PreviewAny"},
    "dreamrelation_reference_checkpoint.json": {"DreamRelationRelationLoraLoader", "DreamRelationMochiSamplerPatch",
                                                "KSampler", "EmptyMochiLatentVideo", "CLIPLoader", "PreviewAny"},
    "dreamrelation_train.json": {"DreamRelationDataset", "DreamRelationPrepareDataset", "DreamRelationTrain",
                                 "VAELoader", "CLIPLoader", "PreviewImage", "PreviewAny"},
    "dreamrelation_masks.json": {"LoadVideo", "GetVideoComponents", "ImageFromBatch", "DreamRelationSubjectMasks",
                                 "DreamRelationAddToDataset", "PreviewImage", "PreviewAny"},
    "dreamrelation_generate_wan21.json": {"UNETLoader", "DreamRelationRelationLoraLoader", "ModelSamplingSD3",
                                          "DreamRelationMochiSamplerPatch", "DreamRelationAttentionMaps", "KSampler",
                                          "EmptyHunyuanLatentVideo", "CLIPLoader", "VAELoader", "PreviewAny"},
    "dreamrelation_generate_wan22.json": {"UNETLoader", "DreamRelationRelationLoraLoader", "ModelSamplingSD3",
                                          "KSamplerAdvanced", "EmptyHunyuanLatentVideo", "CLIPLoader", "VAELoader",
                                          "PreviewAny"},
    "dreamrelation_train_wan.json": {"DreamRelationDataset", "DreamRelationPrepareDataset", "DreamRelationTrain",
                                     "VAELoader", "CLIPLoader", "PreviewImage", "PreviewAny"},
}
# model files each workflow's canvas note must name (folder/file), ComfyUI's own Mochi example names first
NOTE_NAMES = {
    "dreamrelation_generate.json": ["diffusion_models/mochi_preview_bf16.safetensors", "mochi_preview_fp8_scaled",
                                    "text_encoders/t5xxl_fp16.safetensors", "vae/mochi_vae.safetensors", "loras/"],
    "dreamrelation_reference_checkpoint.json": ["diffusion_models/mochi_preview_bf16.safetensors",
                                                "mochi_preview_fp8_scaled", "text_encoders/t5xxl_fp16.safetensors",
                                                "vae/mochi_vae.safetensors", "loras/model_2000.lora.pt"],
    "dreamrelation_train.json": ["diffusion_models/mochi_preview_bf16.safetensors", "mochi_preview_fp8_scaled",
                                 "text_encoders/t5xxl_fp16.safetensors", "t5xxl_fp8", "vae/mochi_vae.safetensors"],
    "dreamrelation_masks.json": ["grounding-dino/groundingdino_swint_ogc.pth", "bert-base-uncased",
                                 "sams/sam_vit_h_4b8939.pth", "models/sam2/", "pip install sam2"],
    "dreamrelation_generate_wan21.json": ["diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors",
                                          "wan2.1_t2v_14B_fp8_scaled", "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                          "umt5_xxl_fp16", "vae/wan_2.1_vae.safetensors", "loras/", "LoraLoaderModelOnly"],
    "dreamrelation_generate_wan22.json": ["diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                                          "wan2.2_t2v_low_noise_14B_fp8_scaled", "text_encoders/umt5_xxl_fp8_e4m3fn_scaled",
                                          "vae/wan_2.1_vae.safetensors", "loras/"],
    "dreamrelation_train_wan.json": ["diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors", "wan2.1_t2v_14B_fp8_scaled",
                                     "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "umt5_xxl_fp16",
                                     "vae/wan_2.1_vae.safetensors"],
}
# model / input files the workflows name: empty placeholders are enough, validation only checks names
# (tiny real models live under other names, see _e2e_models, so no stock loader meets one)
PLACEHOLDERS = {
    "diffusion_models": ["mochi_preview_bf16.safetensors", "wan2.1_t2v_1.3B_fp16.safetensors",
                         "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"],
    "text_encoders": ["t5xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
    "vae": ["mochi_vae.safetensors", "wan_2.1_vae.safetensors"],
    "loras": ["shaking_hands_relation.safetensors", "model_2000.lora.pt", "shaking_hands_relation_wan.safetensors"],
    "grounding-dino": ["groundingdino_swint_ogc.pth"],
    "sams": ["sam_vit_h_4b8939.pth"],
}  # no SAM 2: the masks workflow must validate without the optional model
INPUT_PLACEHOLDERS = ["handshake_01.mp4"]  # the masks workflow's example video
# ComfyUI's own socket types our nodes use; our own all start with DREAMRELATION_
COMFY_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "MASK", "LATENT", "STRING", "INT", "FLOAT", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session's ComfyUI server (conftest), with the placeholders; fails in CI without the frontend tooling."""
    problem = frontend_problem()
    if problem:
        missing(problem)
    for folder, names in PLACEHOLDERS.items():
        for n in names:
            if not (comfy_server.models(folder) / n).exists():
                (comfy_server.models(folder) / n).write_bytes(b"")
    for n in INPUT_PLACEHOLDERS:
        if not (comfy_server.input / n).exists():
            (comfy_server.input / n).write_bytes(b"")
    return comfy_server


def test_server_lists_our_nodes(server):
    info = server.get("/object_info")
    for name in ("DreamRelationRelationLoraLoader", "DreamRelationExportRelationLora",
                 "DreamRelationMochiSamplerPatch", "DreamRelationAttentionMaps", "DreamRelationDataset",
                 "DreamRelationPrepareDataset", "DreamRelationTrain", "DreamRelationSubjectMasks",
                 "DreamRelationSaveMasks", "DreamRelationLoadMasks", "DreamRelationScoreClip", "DreamRelationQKVAnalysis", "DreamRelationLoraAnalysis",
                 "DreamRelationAddToDataset"):
        assert name in info, f"{name} not registered"
        for section, inputs in info[name]["input"].items():
            if section == "hidden":  # filled in by ComfyUI (output nodes get prompt / extra_pnginfo)
                continue
            for inp, spec in inputs.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
                assert spec[0] in COMFY_TYPES or spec[0].startswith("DREAMRELATION_"), f"{name}.{inp}: {spec[0]}"
        for out in info[name]["output"]:
            assert out in COMFY_TYPES or out.startswith("DREAMRELATION_"), f"{name} output type {out}"


def _ui(name: str) -> dict:
    return json.loads((ROOT / "workflows" / name).read_text())


def test_every_workflow_is_listed():
    assert {p.name for p in (ROOT / "workflows").glob("*.json")} == set(WORKFLOWS) == set(NOTE_NAMES)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_reports_are_shown_and_a_note_names_the_models(name):
    """Every STRING report / notes output feeds a Preview Any (the stock frontend shows no ui.text otherwise);
    a Note on the canvas names each model file and its folder."""
    wf = _ui(name)
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}
    for n in wf["nodes"]:
        if not n["type"].startswith("DreamRelation"):
            continue
        for out in n.get("outputs", []):
            if out["name"] in ("report", "notes"):
                shown = [by_id[links[i][3]]["type"] for i in out.get("links") or []]
                assert "PreviewAny" in shown, f"{name}: {n['type']}.{out['name']} is not shown (links to {shown})"
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert notes, f"{name}: no Note on the canvas"
    text = "\n".join(notes)
    for wanted in NOTE_NAMES[name]:
        assert wanted in text, f"{name}: the note does not name {wanted}"
    assert "mochi_preview_dit_bf16" not in json.dumps(wf)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_converts_and_validates(server, name, tmp_path):
    prompt = server.to_api(ROOT / "workflows" / name, tmp_path)
    types = {n["class_type"] for n in prompt.values()}
    assert WORKFLOWS[name] <= types, f"lost in conversion: {WORKFLOWS[name] - types}"
    if name in ("dreamrelation_generate.json", "dreamrelation_generate_wan21.json"):
        patch = next(n for n in prompt.values() if n["class_type"] == "DreamRelationMochiSamplerPatch")
        assert patch["inputs"]["attention_words"] == "bear, raccoon" and isinstance(patch["inputs"]["clip"], list)
    if name == "dreamrelation_train.json":
        train = next(n for n in prompt.values() if n["class_type"] == "DreamRelationTrain")
        assert train["inputs"]["steps"] == 2000 and train["inputs"]["resume"] is True
        for key in ("base_dtype", "blocks_to_swap", "gradient_checkpointing", "offload_activations"):
            assert train["inputs"][key] == "auto", key  # optional widgets kept their places
        assert train["inputs"]["lora_placement"] == "default"
    if name == "dreamrelation_train_wan.json":
        train = next(n for n in prompt.values() if n["class_type"] == "DreamRelationTrain")
        assert train["inputs"]["lora_placement"] == "default" and train["inputs"]["gradient_checkpointing"] == "auto"
        dataset = next(n for n in prompt.values() if n["class_type"] == "DreamRelationDataset")
        assert (dataset["inputs"]["base_model"], dataset["inputs"]["frames"]) == ("wan2.1", 81)
    try:
        prompt_id = server.queue(prompt)  # validates every node, input type and widget value
    except PromptRejected as e:
        pytest.fail(str(e))
    # Execution would now load the empty placeholder models; validation is the point: take it off the queue.
    server.cancel(prompt_id)


def test_workflow_saved_with_the_old_type_name_still_loads(server, tmp_path):
    """Graphs saved before the attention socket type was renamed (DR_ATTENTION) keep working."""
    text = (ROOT / "workflows" / "dreamrelation_generate.json").read_text()
    assert '"DREAMRELATION_ATTENTION"' in text
    old = tmp_path / "generate_saved_earlier.json"
    old.write_text(text.replace('"DREAMRELATION_ATTENTION"', '"DR_ATTENTION"'))
    prompt = server.to_api(old, tmp_path)
    maps = next(n for n in prompt.values() if n["class_type"] == "DreamRelationAttentionMaps")
    patch_id = next(k for k, n in prompt.items() if n["class_type"] == "DreamRelationMochiSamplerPatch")
    assert maps["inputs"]["attention"] == [patch_id, 1]  # the link survived
    try:
        prompt_id = server.queue(prompt)
    except PromptRejected as e:
        pytest.fail(str(e))
    server.cancel(prompt_id)
