"""Training nodes in the real ComfyUI (in-process, CPU): prepare, train, cancel, resume."""


import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core.data.cache import Encoders, load_prepared, prepare_dataset
from dreamrelation_core.data.dataset import describe_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.lora.files import load_lora_file
from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae
from fixtures.comfy_nodes import node_classes, run_node

FRAMES, SIZE = 7, (32, 32)


@pytest.fixture(scope="module")
def comfy_dirs(comfyui, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("comfy")
    kinds = ("diffusion_models", "loras")
    with pytest.MonkeyPatch.context() as mp:  # ComfyUI's folders restored when this module ends
        for kind in kinds:
            (root / kind).mkdir()
            paths, exts = folder_paths.folder_names_and_paths[kind]
            # ours first: the nodes write into the first loras folder, never the user's
            mp.setitem(folder_paths.folder_names_and_paths, kind, ([str(root / kind)] + list(paths), set(exts)))
        mp.setattr(folder_paths, "output_directory", str(root / "output"))
        sd = diffusers_to_genmo(tiny_transformer(num_layers=2).state_dict(), prefix="model.diffusion_model.")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "diffusion_models" / "mochi_tiny.safetensors"))
        yield root
    for kind in kinds:  # file lists cached with our folders in them
        folder_paths.filename_list_cache.pop(kind, None)


@pytest.fixture(scope="module")
def prepared(pack, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data = write_synthetic_dataset(root / "data", num_videos=1, num_frames=FRAMES, size=SIZE)
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), FRAMES, SIZE, max_text_len=16)
    return pack.nodes.train.PreparedDataset(root / "cache", 1, "")


def run_train(pack, prepared, **kw):
    args = dict(prepared=prepared, transformer="mochi_tiny.safetensors", name="hands", steps=6, rank=2, alpha=2.0,
                learning_rate=1e-3, mask_weight=50.0, rcl_weight=0.01, positives_per_anchor=1, seed=0, resume=True,
                warmup_steps=1, caption_dropout=0.1, checkpoint_every=2, gradient_checkpointing="off")
    args.update(kw)
    return run_node(node_classes(pack)["DreamRelationTrain"], **args)


def test_schema_has_tooltips(pack, comfy_dirs):
    classes = node_classes(pack)
    for node_id in ("DreamRelationTrain", "DreamRelationPrepareDataset"):
        schema = classes[node_id].GET_SCHEMA()
        assert schema.category == "DreamRelation/training"
        for inp in schema.inputs:
            assert inp.tooltip, (node_id, inp.id)
    train = classes["DreamRelationTrain"]
    assert "mochi_tiny.safetensors" in train.INPUT_TYPES()["required"]["transformer"][1]["options"]
    assert train in pack.nodes.train.NODES


def test_gpus_take_their_own_devices_and_a_batch_they_cannot_share_is_refused(pack):
    """Several GPUs: the worker's device is plain 'cuda' (process N takes GPU N), and a global batch
    the GPUs cannot share evenly is refused before anything starts."""
    from dreamrelation_core.errors import TrainingError

    device = pack.nodes.train.training_device
    assert device("cuda:0", 2, 2) == "cuda" and device("cuda:0", 1, 1) == "cuda:0" and device("cpu", 2, 4) == "cpu"
    with pytest.raises(TrainingError, match="batch_size 3 cannot be shared by 2 GPUs.*multiple of 2"):
        device("cpu", 2, 3)


def test_train_in_worker_reports_what_the_run_did(pack, comfy_dirs, prepared):
    """New run through the worker: steps and loss-curve previews on ComfyUI's progress bar, the LoRA in
    loras/dreamrelation/, the report; re-queued unchanged it is "already finished"; changed rank is refused.
    (Cancel / re-queue through the real executor: tests/test_server_workflows.py.)"""
    import comfy.utils
    import folder_paths
    from PIL import Image

    from dreamrelation_core.errors import TrainingError

    updates: list[tuple[int, int, object]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total, preview)))
    try:
        out = run_train(pack, prepared)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    lora_name, plot, report = out.outputs
    assert [v for v, _, _ in updates][0] == 0 and updates[-1][:2] == (6, 6)
    previews = [p for _, _, p in updates if p is not None]
    assert previews and all(p[0] == "PNG" and isinstance(p[1], Image.Image) for p in previews)
    assert out.ui == {"text": [report]}
    assert lora_name == "dreamrelation/hands.safetensors"
    lora = load_lora_file(comfy_dirs / "loras" / lora_name)
    assert set(lora.adapters) == {"relation", "ffn"} and lora.metadata["step"] == "6"
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= float(plot.min()) <= float(plot.max()) <= 1
    assert "new run" in report and "finished at step 6" in report and "hands" in report
    assert lora_name in folder_paths.get_filename_list("loras")  # the loader node can list it

    again = run_train(pack, prepared).outputs[2]
    assert "already finished at step 6" in again
    with pytest.raises(TrainingError, match=r"rank: saved 2, new 4"):
        run_train(pack, prepared, rank=4)
    with pytest.raises(TrainingError, match="turn resume on"):
        run_train(pack, prepared, resume=False)


def test_train_node_reports_a_run_folder_in_use(pack, comfy_dirs, prepared):
    """Another trainer (here: this process) holds the run folder: the node refuses at once, naming it."""
    import os

    from dreamrelation_core.errors import TrainingError
    from dreamrelation_core.training.lock import RunLock

    run = comfy_dirs / "output" / "dreamrelation" / "busy"
    with RunLock(run):
        with pytest.raises(TrainingError, match=rf"{run} is in use by another training run \(PID {os.getpid()} on "):
            run_train(pack, prepared, name="busy")
        assert [p.name for p in run.iterdir()] == [".dreamrelation.lock"]  # nothing written
    assert not run.exists()


def test_bad_run_name(pack, comfy_dirs, prepared):
    from dreamrelation_core.errors import TrainingError

    with pytest.raises(TrainingError, match="run name"):
        run_train(pack, prepared, name="../escape")


class _ComfyVAE:
    """Holds a Mochi VAE model as ComfyUI's `comfy.sd.VAE` does (`first_stage_model`): here ComfyUI's
    own genmo Encoder/Decoder classes at a tiny size (ComfyUI builds its Mochi VAE only full size)."""

    def __init__(self, model):
        self.first_stage_model = model


class _ComfyCLIPAPI:
    """ComfyUI's CLIP interface (`tokenize`, `encode_from_tokens(..., return_dict=True)`) over the tiny
    T5; pads to 256 tokens with an attention mask, as ComfyUI's Mochi T5 does."""

    def __init__(self):
        self.cond_stage_model, self.tok = tiny_text_encoder(), tiny_tokenizer(256)

    def tokenize(self, text):
        return self.tok([text], padding="max_length", max_length=256, return_tensors="pt")

    def encode_from_tokens(self, tokens, return_dict=False):
        with torch.no_grad():
            cond = self.cond_stage_model(**tokens).last_hidden_state
        return {"cond": cond, "pooled_output": None, "attention_mask": tokens["attention_mask"]}


def test_prepare_node_with_comfy_encoders(pack, comfy_dirs, tmp_path):
    from safetensors.torch import save_file as save

    from dreamrelation_core.mochi.loading import load_vae
    from fixtures.comfy_vae import comfy_tiny_vae

    comfy_vae = comfy_tiny_vae([1, 2, 3])
    data = write_synthetic_dataset(tmp_path / "data", num_videos=1, num_frames=FRAMES, size=SIZE)
    spec = describe_dataset(data, FRAMES, SIZE)
    prepare = node_classes(pack)["DreamRelationPrepareDataset"]
    prepared, report = run_node(prepare, dataset=spec, vae=_ComfyVAE(comfy_vae), clip=_ComfyCLIPAPI(), max_text_len=16,
                                cache_dir=str(tmp_path / "cache")).outputs
    clip = load_prepared(prepared.cache_dir)[0]
    assert clip.y_feat.shape == (16, 32) and clip.y_mask.sum() == 12  # caption tokens + </s>, cut to 16
    # same latents (mean and variance) as the core's prepare with that VAE saved as ComfyUI's file
    save({k: v.contiguous() for k, v in comfy_vae.state_dict().items()}, str(tmp_path / "mochi_vae.safetensors"))
    core = tmp_path / "core"
    prepare_dataset(data, core, Encoders.from_models(load_vae(tmp_path / "mochi_vae.safetensors"), tiny_text_encoder(), tiny_tokenizer(16)),
                    FRAMES, SIZE, max_text_len=16)
    ref = load_prepared(core)[0]
    assert torch.equal(clip.mean, ref.mean) and torch.equal(clip.logvar, ref.logvar)
    assert torch.equal(clip.mask1, ref.mask1) and torch.allclose(clip.y_feat, ref.y_feat, atol=1e-5)
    assert "1 clip(s)" in report
    with pytest.raises(ValueError, match="has no encoder weights"):
        run_node(prepare, dataset=spec, vae=_ComfyVAE(torch.nn.Linear(2, 2)), clip=_ComfyCLIPAPI(), max_text_len=16,
                 cache_dir=str(tmp_path / "c2"))
