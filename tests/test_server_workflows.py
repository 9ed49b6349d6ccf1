"""The shipped workflows executed by a real ComfyUI server, on tiny models.

Each workflow is loaded in the real frontend (`ui-to-api.mjs`), the API prompt it makes is edited
only to swap the stock Mochi loaders for the test-only tiny ones (same inputs and outputs, see
`comfy_test_nodes/`) and to shrink clip sizes / steps, then queued with `POST /prompt`; results,
errors and progress come from `/history` and the websocket. Nothing here calls a node method.

To add a workflow: put a test below that converts it with `comfy_server.to_api`, applies
`use_tiny_models` + `shrink` (extend `_e2e_models.TINY_INPUTS` / `TinyModels.model_inputs` for new
node types), writes the inputs it needs into `comfy_server.input`, runs it, and asserts on the
`Run`; then add its file name to EXECUTED.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from _e2e_models import nodes_of, only, set_inputs, shrink, use_tiny_models
from conftest import ROOT

pytestmark = pytest.mark.comfyui

WORKFLOWS = ROOT / "workflows"
# every workflow in workflows/ and the test that executes it
EXECUTED = {
    "dreamrelation_generate.json": "test_generate_workflow",
    "dreamrelation_reference_checkpoint.json": "test_reference_checkpoint_workflow",
    "dreamrelation_masks.json": "test_masks_workflow",
    "dreamrelation_train.json": "test_gui_chain_masks_dataset_prepare_train_generate",
    "dreamrelation_generate_wan21.json": "test_generate_wan21_workflow_and_the_stock_lora_loader",
    "dreamrelation_generate_wan22.json": "test_generate_wan22_two_experts_workflow",
    "dreamrelation_train_wan.json": "test_train_wan_workflow_then_generate_with_its_lora",
}


def tiny_prompt(server, tiny_models, workflow: str, tmp_path: Path) -> dict:
    return shrink(use_tiny_models(server.to_api(WORKFLOWS / workflow, tmp_path), tiny_models))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def write_dataset(server, frames: int = 7) -> str:
    """A one-clip relation dataset (video, caption, masks) in the server's input folder; its name there."""
    from dreamrelation_core.data.synthetic import write_synthetic_dataset

    name = unique("e2e_dataset")
    write_synthetic_dataset(server.input / name, num_videos=1, num_frames=frames, size=(32, 32))
    return name


def assert_success(run) -> None:
    assert run.status == "success", run.describe()


def read_frames(path: Path) -> np.ndarray:
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def test_every_shipped_workflow_is_executed():
    shipped = {p.name for p in WORKFLOWS.glob("*.json")}
    assert shipped == set(EXECUTED), f"workflows without an execution test: {shipped - set(EXECUTED)}; " \
                                     f"tests of removed workflows: {set(EXECUTED) - shipped}"
    for test in EXECUTED.values():
        assert test in globals(), test


def test_tiny_loaders_stand_in_for_the_stock_ones(comfy_server):
    """Same inputs and output types as UNETLoader / CLIPLoader / VAELoader: swapping class_type keeps the prompt valid."""
    from _e2e_models import TINY_REPLACES

    info = comfy_server.get("/object_info")
    for stock, tiny in TINY_REPLACES.items():
        assert info[tiny]["input"] == info[stock]["input"], tiny
        assert info[tiny]["output"] == info[stock]["output"], tiny


def test_train_node_shows_its_memory_options(comfy_server):
    """The four memory options are advanced optional inputs of the Train node, 'auto' by default, each with
    the values the core accepts (what the frontend builds its widgets from)."""
    optional = comfy_server.get("/object_info/DreamRelationTrain")["DreamRelationTrain"]["input"]["optional"]
    expected = {"base_dtype": ["auto", "bf16", "fp8", "fp32"], "gradient_checkpointing": ["auto", "on", "off"],
                "offload_activations": ["auto", "on", "off"], "blocks_to_swap": ["auto", *map(str, range(49))]}
    for name, values in expected.items():
        kind, options = optional[name]
        assert (options.get("options") or kind) == values, name
        assert options["default"] == "auto" and options["advanced"] is True, (name, options)
        assert options["tooltip"].endswith("."), (name, options["tooltip"])


# ---------------------------------------------------------------------------------------------
# generation


def test_generate_workflow(comfy_server, tiny_models, tmp_path):
    """Loader -> relation LoRA -> sampler patch -> KSampler -> VAE decode -> saved animation + attention maps."""
    prompt = tiny_prompt(comfy_server, tiny_models, "dreamrelation_generate.json", tmp_path)
    save = only(prompt, "SaveAnimatedWEBP")
    save["inputs"]["filename_prefix"] = unique("e2e/generate")
    run = comfy_server.run(prompt)
    assert_success(run)
    files = run.files(comfy_server.base)
    video = [p for p in files if p.suffix == ".webp"]
    assert len(video) == 1 and video[0].is_file(), run.outputs
    frames = read_frames(video[0])
    assert frames.shape == (7, 32, 32, 3)  # EmptyMochiLatentVideo 7 x 32 x 32 through the tiny VAE
    preview_id = nodes_of(prompt, "PreviewImage")[0][0]
    maps = run.outputs[preview_id]["images"]
    assert maps and all((comfy_server.base / m["type"] / m["subfolder"] / m["filename"]).is_file() for m in maps)

    # The relation LoRA reaches the sampled video: the same prompt at strength 0 gives other frames.
    only(prompt, "DreamRelationRelationLoraLoader")["inputs"]["strength"] = 0.0
    save["inputs"]["filename_prefix"] = unique("e2e/generate_no_lora")
    plain = comfy_server.run(prompt)
    assert_success(plain)
    other = read_frames(next(p for p in plain.files(comfy_server.base) if p.suffix == ".webp"))
    assert np.abs(other.astype(int) - frames.astype(int)).max() > 0


def test_reference_checkpoint_workflow(comfy_server, tiny_models, tmp_path):
    """An official-format checkpoint (model_<step>.lora.pt) through the loader: imported with its own
    rank/alpha, relation + FFN applied, subject LoRAs dropped and said so; the video is saved."""
    prompt = tiny_prompt(comfy_server, tiny_models, "dreamrelation_reference_checkpoint.json", tmp_path)
    only(prompt, "DreamRelationRelationLoraLoader")["inputs"]["lora_name"] = tiny_models.reference
    only(prompt, "SaveAnimatedWEBP")["inputs"]["filename_prefix"] = unique("e2e/reference")
    run = comfy_server.run(prompt)
    assert_success(run)
    assert [p for p in run.files(comfy_server.base) if p.suffix == ".webp"], run.outputs
    report = "\n".join(run.texts())
    assert "reference" in report and "relation" in report, report


# ---------------------------------------------------------------------------------------------
# generation on Wan (ComfyUI's own Wan graphs; the DiT through ComfyUI's stock loading function)


def test_generate_wan21_workflow_and_the_stock_lora_loader(comfy_server, tiny_wan_models, tmp_path):
    """UNETLoader -> relation LoRA -> sampler patch -> ModelSamplingSD3 -> KSampler -> VAE decode on a
    tiny Wan, attention maps shown; then ComfyUI's own graph with its LoraLoaderModelOnly reading the
    LoRA's ComfyUI export (no patch: its defaults change nothing) gives the same video, and
    strength 0 another one."""
    prompt = tiny_prompt(comfy_server, tiny_wan_models, "dreamrelation_generate_wan21.json", tmp_path)
    save = only(prompt, "SaveAnimatedWEBP")
    save["inputs"]["filename_prefix"] = unique("e2e/wan21")
    run = comfy_server.run(prompt)
    assert_success(run)
    frames = read_frames(next(p for p in run.files(comfy_server.base) if p.suffix == ".webp"))
    assert frames.shape == (5, 32, 32, 3)  # EmptyHunyuanLatentVideo 5 x 32 x 32 through the tiny Wan VAE
    assert "relation" in "\n".join(run.texts()), run.texts()
    maps = run.outputs[nodes_of(prompt, "PreviewImage")[0][0]]["images"]
    assert maps and all((comfy_server.base / m["type"] / m["subfolder"] / m["filename"]).is_file() for m in maps)

    # ComfyUI's own graph: the stock loader in the DreamRelation loader's place, ModelSamplingSD3 fed by it
    loader_id, loader = nodes_of(prompt, "DreamRelationRelationLoraLoader")[0]
    stock = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": loader["inputs"]["model"],
             "lora_name": tiny_wan_models.lora_comfy, "strength_model": 1.0}}
    prompt[loader_id] = stock
    only(prompt, "ModelSamplingSD3")["inputs"]["model"] = [loader_id, 0]
    for kind in ("DreamRelationMochiSamplerPatch", "DreamRelationAttentionMaps", "PreviewImage", "PreviewAny"):
        for i, _ in nodes_of(prompt, kind):
            del prompt[i]
    save["inputs"]["filename_prefix"] = unique("e2e/wan21_stock")
    stock_run = comfy_server.run(prompt)
    assert_success(stock_run)
    same = read_frames(next(p for p in stock_run.files(comfy_server.base) if p.suffix == ".webp"))
    assert np.abs(same.astype(int) - frames.astype(int)).max() <= 1  # the same patches: the same video

    stock["inputs"]["strength_model"] = 0.0
    save["inputs"]["filename_prefix"] = unique("e2e/wan21_no_lora")
    plain = comfy_server.run(prompt)
    assert_success(plain)
    other = read_frames(next(p for p in plain.files(comfy_server.base) if p.suffix == ".webp"))
    assert np.abs(other.astype(int) - frames.astype(int)).max() > 1


def test_generate_wan22_two_experts_workflow(comfy_server, tiny_wan_models, tmp_path):
    """Wan 2.2 A14B's graph: two experts, the relation LoRA loaded into each, KSamplerAdvanced hands
    the high-noise expert's latent to the low-noise expert; each expert is used (changing the
    low-noise expert's file changes the video)."""
    prompt = tiny_prompt(comfy_server, tiny_wan_models, "dreamrelation_generate_wan22.json", tmp_path)
    loaders = nodes_of(prompt, "TinyMochiUNETLoader")
    assert len(loaders) == 2
    low = next(n for _, n in loaders if "low_noise" in n["_meta"]["title"].replace("-", "_").replace(" ", "_"))
    low["inputs"]["unet_name"] = tiny_wan_models.dit_low
    for _, k in nodes_of(prompt, "KSamplerAdvanced"):  # 4 steps: the experts switch at step 2
        if k["inputs"]["add_noise"] == "enable":
            k["inputs"]["end_at_step"] = 2
        else:
            k["inputs"]["start_at_step"] = 2
    save = only(prompt, "SaveAnimatedWEBP")
    save["inputs"]["filename_prefix"] = unique("e2e/wan22")
    run = comfy_server.run(prompt)
    assert_success(run)
    frames = read_frames(next(p for p in run.files(comfy_server.base) if p.suffix == ".webp"))
    assert frames.shape == (5, 32, 32, 3)
    reports = [t for t in run.texts() if "relation" in t]
    assert len(reports) == 2, run.texts()  # one per expert

    low["inputs"]["unet_name"] = tiny_wan_models.dit  # the high-noise weights for both experts
    save["inputs"]["filename_prefix"] = unique("e2e/wan22_one_expert")
    one = comfy_server.run(prompt)
    assert_success(one)
    other = read_frames(next(p for p in one.files(comfy_server.base) if p.suffix == ".webp"))
    assert np.abs(other.astype(int) - frames.astype(int)).max() > 1


# ---------------------------------------------------------------------------------------------
# masks


def test_masks_workflow(comfy_server, tiny_models, tmp_path):
    """Load Video -> components -> first 6k + 1 frames -> Subject Masks (tiny Grounding DINO + per-frame SAM, no
    SAM 2) -> Add To Dataset (frames, masks, caption in input/<dataset>/) + preview + reports in Preview Any."""
    from dreamrelation_core.data.dataset import describe_dataset
    from dreamrelation_core.data.mask_files import load_masks
    from dreamrelation_core.data.synthetic import write_video
    from dreamrelation_core.data.video import read_video
    from fixtures.mask_models import two_subject_clip

    prompt = tiny_prompt(comfy_server, tiny_models, "dreamrelation_masks.json", tmp_path)
    assert only(prompt, "DreamRelationSubjectMasks")["inputs"]["sam2"] == "none"  # runs without the optional SAM 2
    clip = unique("e2e_clip")
    write_video(comfy_server.input / clip, two_subject_clip(frames=7), "mp4")
    set_inputs(prompt, "LoadVideo", file=f"{clip}.mp4")
    folder = unique("e2e_masks")
    set_inputs(prompt, "DreamRelationAddToDataset", dataset=folder, clip_name=clip)
    run = comfy_server.run(prompt, timeout=180)
    assert_success(run)
    dataset = comfy_server.input / folder
    assert (dataset / clip / "frame0006.png").is_file(), sorted(p.name for p in dataset.glob("*"))
    m1, m2 = load_masks(dataset / f"{clip}.masks.npz")
    assert m1.shape == m2.shape == (7, 64, 96)
    assert m1.reshape(7, -1).any(1).all() and m2.reshape(7, -1).any(1).all(), "empty masks saved"
    assert read_video(dataset / clip).shape == (7, 64, 96, 3)
    assert (dataset / f"{clip}.txt").read_text().strip() == "a person shaking hands with another person"
    spec = describe_dataset(dataset, 7, (32, 32))  # what the train workflow's Dataset node checks
    assert [e.name for e in spec.entries] == [clip]
    preview_id = nodes_of(prompt, "PreviewImage")[0][0]
    assert run.outputs[preview_id]["images"]
    shown = [run.outputs[i]["text"][0] for i, _ in nodes_of(prompt, "PreviewAny")]
    assert any("added" in t and clip in t for t in shown), shown  # the Add To Dataset report
    assert any("subject 1 ('person')" in t for t in shown), shown  # the Subject Masks notes

    # The same exemplar queued again under another name is found, not stored twice.
    set_inputs(prompt, "DreamRelationAddToDataset", clip_name=f"{clip}_again")
    again = comfy_server.run(prompt, timeout=180)
    assert_success(again)
    shown = [again.outputs[i]["text"][0] for i, _ in nodes_of(prompt, "PreviewAny") if i in again.outputs]
    assert any("already in the dataset" in t for t in shown), shown
    assert sorted(p.name for p in dataset.glob("*.txt")) == [f"{clip}.txt"]


@pytest.mark.parametrize("case", ["frames_not_6k_plus_1", "empty_caption", "path_in_clip_name"])
def test_add_to_dataset_bad_input_is_reported_in_history(comfy_server, tiny_models, tmp_path, case):
    """The masks workflow's Add To Dataset refuses what the Dataset node would refuse; the message names the
    field and the valid choice; nothing is written."""
    from dreamrelation_core.data.synthetic import write_video
    from fixtures.mask_models import two_subject_clip

    prompt = tiny_prompt(comfy_server, tiny_models, "dreamrelation_masks.json", tmp_path)
    clip, folder = unique("e2e_bad_clip"), unique("e2e_bad_masks")
    frames, inputs, expected = {
        "frames_not_6k_plus_1": (10, {}, ("10 frames", "7 and 13")),
        "empty_caption": (7, {"caption": "  "}, ("caption is empty",)),
        "path_in_clip_name": (7, {"clip_name": "../escape"}, ("'../escape'", "plain name")),
    }[case]
    write_video(comfy_server.input / clip, two_subject_clip(frames=frames), "mp4")
    set_inputs(prompt, "LoadVideo", file=f"{clip}.mp4")
    set_inputs(prompt, "DreamRelationAddToDataset", dataset=folder, **{"clip_name": clip, **inputs})
    run = comfy_server.run(prompt, timeout=180)
    assert run.status == "error", run.describe()
    assert run.error["node_type"] == "DreamRelationAddToDataset", run.describe()
    message = run.error["exception_message"]
    for word in expected:
        assert word in message, f"{case}: {word!r} not in the message {message!r}"
    assert "Traceback" not in message
    assert not (comfy_server.input / folder).exists() or not any((comfy_server.input / folder).iterdir())


# ---------------------------------------------------------------------------------------------
# training


def train_prompt(server, tiny_models, tmp_path: Path, dataset: str, run_name: str, **train) -> dict:
    prompt = tiny_prompt(server, tiny_models, "dreamrelation_train.json", tmp_path)
    set_inputs(prompt, "DreamRelationDataset", folder=dataset)
    set_inputs(prompt, "DreamRelationTrain", name=run_name, seed=0, **train)
    return prompt


def lora_files(server) -> set[Path]:
    return set((server.base / "models" / "loras").rglob("*.safetensors"))


def test_gui_chain_masks_dataset_prepare_train_generate(comfy_server, tiny_models, tmp_path):
    """The whole GUI path on tiny models, each workflow reading only what the one before wrote:
    masks workflow -> Add To Dataset (input/<folder>) -> train workflow: Dataset -> Prepare (the T5 in
    ComfyUI's scaled-fp8 layout, t5xxl_fp8_e4m3fn_scaled, through CLIPLoader) -> Train (a relation LoRA in
    models/loras, its report and loss plot) -> generate workflow sampling with that LoRA."""
    from dreamrelation_core.data.cache import DEFAULT_CACHE, load_prepared
    from dreamrelation_core.data.synthetic import write_video
    from fixtures.mask_models import two_subject_clip

    masks = tiny_prompt(comfy_server, tiny_models, "dreamrelation_masks.json", tmp_path)
    clip, folder = unique("e2e_chain_clip"), unique("e2e_chain")
    write_video(comfy_server.input / clip, two_subject_clip(frames=7), "mp4")
    set_inputs(masks, "LoadVideo", file=f"{clip}.mp4")
    set_inputs(masks, "DreamRelationAddToDataset", dataset=folder, clip_name=clip)
    assert_success(comfy_server.run(masks, timeout=180))

    name = unique("e2e_run")
    before = lora_files(comfy_server)
    prompt = train_prompt(comfy_server, tiny_models, tmp_path, folder, name, steps=2)
    set_inputs(prompt, "TinyMochiCLIPLoader", clip_name=tiny_models.t5_fp8)
    run = comfy_server.run(prompt, timeout=300)
    assert_success(run)
    prepared = load_prepared(comfy_server.input / folder / DEFAULT_CACHE)
    assert [c.name for c in prepared] == [clip] and prepared[0].y_feat.shape == (16, 32)
    assert torch.isfinite(prepared[0].y_feat).all() and prepared[0].y_feat.abs().sum() > 0
    new = lora_files(comfy_server) - before
    assert len(new) == 1 and name in new.pop().name, lora_files(comfy_server)
    report = next((t for t in run.texts() if name in t), None)
    assert report is not None, f"no report naming the run in the outputs: {run.outputs}"
    assert "ComfyUI's models unloaded" in report and "Memory options: fp32 no-ckpt" in report, report
    preview_id = nodes_of(prompt, "PreviewImage")[0][0]
    assert run.outputs[preview_id]["images"], "no loss plot"

    lora = next(p for p in lora_files(comfy_server) if name in p.name)
    gen = tiny_prompt(comfy_server, tiny_models, "dreamrelation_generate.json", tmp_path)
    set_inputs(gen, "DreamRelationRelationLoraLoader",
               lora_name=str(lora.relative_to(comfy_server.base / "models" / "loras")))
    only(gen, "SaveAnimatedWEBP")["inputs"]["filename_prefix"] = unique("e2e/trained")
    generated = comfy_server.run(gen)
    assert_success(generated)
    assert [p for p in generated.files(comfy_server.base) if p.suffix == ".webp"], generated.outputs


def test_train_wan_workflow_then_generate_with_its_lora(comfy_server, tiny_wan_models, tmp_path):
    """Dataset (Wan 2.1, 9 frames) -> Prepare (tiny Wan VAE + umT5 through ComfyUI's loaders) -> Train
    (tiny Wan DiT file): a Wan relation LoRA on disk, report and loss plot shown; then the Wan 2.1
    generate workflow samples with it."""
    from dreamrelation_core.data.synthetic import write_synthetic_dataset
    from dreamrelation_core.lora.files import load_lora_file
    from dreamrelation_core.wan.spec import WAN21

    dataset = unique("e2e_wan_dataset")
    write_synthetic_dataset(comfy_server.input / dataset, num_videos=1, num_frames=9, size=(32, 32), spec=WAN21)
    name = unique("e2e_wan_run")
    before = lora_files(comfy_server)
    prompt = tiny_prompt(comfy_server, tiny_wan_models, "dreamrelation_train_wan.json", tmp_path)
    set_inputs(prompt, "DreamRelationDataset", folder=dataset, frames=9)
    set_inputs(prompt, "DreamRelationTrain", name=name, seed=0, steps=4)
    run = comfy_server.run(prompt, timeout=300)
    assert_success(run)
    new = lora_files(comfy_server) - before
    assert len(new) == 1 and name in next(iter(new)).name, lora_files(comfy_server)
    lora = new.pop()
    meta = load_lora_file(lora).metadata
    assert meta["base_model"] == "wan2.1" and meta["placement"] == "default", meta
    assert any(name in text for text in run.texts()), f"no report naming the run in the outputs: {run.outputs}"
    assert run.outputs[nodes_of(prompt, "PreviewImage")[0][0]]["images"], "no loss plot"

    gen = tiny_prompt(comfy_server, tiny_wan_models, "dreamrelation_generate_wan21.json", tmp_path)
    set_inputs(gen, "DreamRelationRelationLoraLoader",
               lora_name=str(lora.relative_to(comfy_server.base / "models" / "loras")))
    only(gen, "SaveAnimatedWEBP")["inputs"]["filename_prefix"] = unique("e2e/wan_trained")
    assert_success(comfy_server.run(gen))


def test_cancel_then_requeue_continues_where_it_stopped(comfy_server, tiny_models, tmp_path):
    """POST /interrupt at step k; the re-queued prompt resumes from the step the run had reached."""
    steps, k, name = 12, 3, unique("e2e_cancel")
    prompt = train_prompt(comfy_server, tiny_models, tmp_path, write_dataset(comfy_server), name,
                          steps=steps, checkpoint_every=5, resume=True)
    train_id = nodes_of(prompt, "DreamRelationTrain")[0][0]
    state: dict = {}
    sent = threading.Event()

    def on_progress(event: dict) -> None:
        if "prompt_id" in state and str(event.get("node")) == train_id and event["value"] >= k and not sent.is_set():
            sent.set()
            comfy_server.interrupt(state["prompt_id"])

    with comfy_server.watch(on_progress) as progress:
        state["prompt_id"] = comfy_server.queue(prompt)
        first = comfy_server.wait(state["prompt_id"], timeout=300)
    assert sent.is_set(), f"training never reached step {k}: {first.describe()}"
    assert first.interrupted, first.describe()
    reached = max(progress.values(train_id))  # steps done when the cancel took effect
    assert k <= reached < steps

    with comfy_server.watch() as progress:
        second = comfy_server.run(prompt, timeout=300)
    assert_success(second)
    values = progress.values(train_id)
    assert values and values[0] >= reached, f"resumed at step {values[:1]}, the cancelled run had reached {reached}"
    assert values[-1] == steps
    assert any(name in text for text in second.texts()), f"no report naming the run: {second.outputs}"


def test_train_node_on_two_processes_through_the_server(comfy_server, tiny_models, tmp_path):
    """The Train node's `gpus` and `batch_size` are advanced inputs in /object_info (1 by default); with
    gpus 2 the node's worker runs under torchrun (two CPU processes with gloo on this server) and the
    run ends as with one: the relation LoRA in models/loras, the report, one history of every step."""
    from dreamrelation_core.training.protocol import read_history

    optional = comfy_server.get("/object_info/DreamRelationTrain")["DreamRelationTrain"]["input"]["optional"]
    for name in ("gpus", "batch_size"):
        kind, options = optional[name]
        assert kind == "INT" and options["default"] == 1 and options["min"] == 1, (name, options)
        assert options["advanced"] is True and options["tooltip"].endswith("."), (name, options)

    name = unique("e2e_two_processes")
    before = lora_files(comfy_server)
    prompt = train_prompt(comfy_server, tiny_models, tmp_path, write_dataset(comfy_server), name, steps=2, gpus=2,
                          batch_size=2)
    run = comfy_server.run(prompt, timeout=300)
    assert_success(run)
    new = lora_files(comfy_server) - before
    assert len(new) == 1 and name in new.pop().name, lora_files(comfy_server)
    report = next((t for t in run.texts() if name in t), "")
    assert "starting a new run" in report and "Step 2/2" in report and "on 2 processes (torchrun)" in report, report
    history = read_history(comfy_server.output / "dreamrelation" / name)
    assert [h["step"] for h in history] == [1, 2], history


# ---------------------------------------------------------------------------------------------
# bad input: a readable message in /history naming the field / file


@pytest.mark.parametrize("case", ["missing_folder", "frames_not_6k_plus_1", "clip_too_short"])
def test_bad_dataset_input_is_reported_in_history(comfy_server, tiny_models, tmp_path, case):
    good, absent = write_dataset(comfy_server, frames=7), unique("no_such_dataset")
    dataset, frames, expected = {  # the folder, the frames field, words the message must hold
        "missing_folder": (absent, 7, (absent,)),
        "frames_not_6k_plus_1": (good, 10, ("frames", "10")),
        "clip_too_short": (good, 13, ("clip0", "13")),  # the 7-frame video by name, the length asked
    }[case]
    name = unique("e2e_bad")
    prompt = train_prompt(comfy_server, tiny_models, tmp_path, dataset, name)
    set_inputs(prompt, "DreamRelationDataset", frames=frames)
    run = comfy_server.run(prompt, timeout=120)
    assert run.status == "error", run.describe()
    err = run.error
    assert err["node_type"] == "DreamRelationDataset", run.describe()
    message = err["exception_message"]
    for word in expected:
        assert word in message, f"{case}: {word!r} not in the message {message!r}"
    assert "Traceback" not in message and len(message) < 600, message
    assert not any(name in str(p) for p in comfy_server.output.rglob("*")), "a failed run left files behind"
