"""Training nodes: encode a dataset with ComfyUI's own VAE and text encoder (Mochi or Wan), train a relation LoRA.

Prepare: DREAMRELATION_DATASET + VAE + CLIP -> DREAMRELATION_PREPARED (an encoded cache folder).
Train:   DREAMRELATION_PREPARED + a Mochi or Wan DiT file from models/diffusion_models -> relation LoRA
         written to models/loras/dreamrelation/, the run folder under output/dreamrelation/, a loss
         plot and a report. Training runs in a worker process (dreamrelation_core.training.worker,
         JSON-lines progress; under torchrun with `gpus` > 1): ComfyUI's progress bar shows its steps
         with the loss curve as preview;
         Cancel makes the worker checkpoint at the current step, and running the node again with
         `resume` on continues there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from .comfy_types import Dataset, Prepared

RUN_SUBDIR = "dreamrelation"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PreparedDataset:
    """Node output: an encoded dataset cache and how it was made."""

    cache_dir: Path
    num_clips: int
    report: str


# ---------------------------------------------------------------------------------------------
# ComfyUI VAE / CLIP as the core's encoders


def comfy_encoders(vae, clip, precision: str = "auto", tiling: str = "auto"):
    """`dataset.Encoders` from ComfyUI's VAE and CLIP objects; the VAE tells the base model.

    Text first, for every clip to encode: ComfyUI's T5 (Mochi, with its attention mask) or umT5
    (Wan: 512 rows, zeros past the caption), loaded and freed by ComfyUI's own memory management,
    cut or padded to `max_len` tokens. Then every model ComfyUI holds leaves the GPU
    (`release_comfy_models`), the text encoder included. Video: the weights of ComfyUI's VAE are
    converted to diffusers' (Mochi: AutoencoderKLMochi's encoder, which keeps genmo's causal
    temporal attention where ComfyUI's own VAE Encode runs it non-causally; Wan: AutoencoderKLWan)
    and encode there, in bf16 with spatial tiling on a GPU (fp32 untiled on the CPU, where bf16
    convolutions are slow), giving the posterior's mean and variance.
    """
    from dreamrelation_core.data.cache import Encoders, model_tag
    from dreamrelation_core.data.encode import encode_frames

    spec = base_model_of_vae(vae)
    reference_vae = None

    def encode_video(frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal reference_vae
        if reference_vae is None:  # converted once per prepare run, on the first clip to encode
            reference_vae = reference_vae_from_comfy(vae, spec, precision, tiling)
        return encode_frames(reference_vae, frames, spec)  # [C, T, h, w] each, raw latents

    def encode_text(captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats, masks = [], []
        for caption in captions:
            out = clip.encode_from_tokens(clip.tokenize(caption), return_dict=True)
            cond = out["cond"][0].float().cpu()  # [L, 4096]
            mask = out.get("attention_mask")
            mask = mask[0].bool().cpu() if mask is not None else torch.ones(cond.shape[0], dtype=torch.bool)
            feats.append(_fit_length(cond, max_len, 0.0))
            masks.append(_fit_length(mask, max_len, False))
        return torch.stack(feats), torch.stack(masks)

    tags = (f"comfy-vae-{model_tag(vae.first_stage_model)}", f"comfy-clip-{model_tag(clip.cond_stage_model)}")
    return Encoders(encode_video=encode_video, encode_text=encode_text, tags=tags, spec=spec,
                    after_text=release_comfy_models)


def encoding_settings(device: torch.device, precision: str = "auto", tiling: str = "auto") -> tuple[torch.dtype, bool]:
    """(dtype, tiled) of the video encoder: auto is bf16 and tiled on a GPU, fp32 untiled on the CPU."""
    gpu = device.type != "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(precision, torch.bfloat16 if gpu else torch.float32)
    return dtype, {"on": True, "off": False}.get(tiling, gpu)


# latent channels of ComfyUI's VAE -> base model
VAE_BASE_MODELS = {12: "mochi", 16: "wan2.1", 48: "wan2.2-5b"}


def base_model_of_vae(vae):
    """The base model spec of a ComfyUI VAE, from its latent channels (Mochi 12, Wan 2.1 16, Wan 2.2 48)."""
    from dreamrelation_core.base_models import get_spec

    if getattr(vae, "first_stage_model", None) is None:
        raise ValueError(f"the vae input is a {type(vae).__name__}, not a ComfyUI VAE")
    channels = getattr(vae, "latent_channels", 12)  # a VAE object that does not say: Mochi's, as before Wan
    if channels not in VAE_BASE_MODELS:
        raise ValueError(f"the vae input ({type(vae.first_stage_model).__name__}) has {channels} latent channels; "
                         "training needs Mochi's VAE (12, mochi_vae.safetensors) or a Wan VAE (16, "
                         "wan_2.1_vae.safetensors; 48, wan2.2_vae.safetensors)")
    return get_spec(VAE_BASE_MODELS[channels])


def reference_vae_from_comfy(vae, spec=None, precision: str = "auto", tiling: str = "auto"):
    """diffusers VAE (Mochi: AutoencoderKLMochi, encoder only; Wan: AutoencoderKLWan) from the weights of
    ComfyUI's loaded VAE, on ComfyUI's device in the dtype and tiling of `encoding_settings`."""
    import comfy.model_management as mm

    spec = spec or base_model_of_vae(vae)
    model = vae.first_stage_model
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if not any(k.startswith("encoder.") for k in sd):
        raise ValueError(f"the vae input ({type(model).__name__}) has no encoder weights: load the full VAE "
                         "(models/vae/mochi_vae.safetensors or wan_2.1_vae.safetensors) with Load VAE")
    device = mm.get_torch_device()
    dtype, tiled = encoding_settings(device, precision, tiling)
    ref = spec.vae_from_comfy_state_dict(sd, dtype, source=f"the vae input ({type(model).__name__})")
    if tiled:
        ref.enable_tiling()
    return ref.to(device)


# ---------------------------------------------------------------------------------------------
# ComfyUI's models off the GPU

HELD_LIMIT = 1 << 30  # bytes ComfyUI may still hold on the GPU after unloading (latents, conditioning)


def _vram_mode() -> str | None:
    """The command-line flag that keeps ComfyUI's models on the GPU after use, or None."""
    import comfy.model_management as mm
    from comfy.cli_args import args

    if getattr(args, "gpu_only", False):
        return "--gpu-only"
    if mm.vram_state == mm.VRAMState.HIGH_VRAM:
        return "--highvram"
    return None


def _held_bytes(device: torch.device) -> int:
    """GPU memory this process (ComfyUI) still has allocated."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def release_comfy_models() -> str:
    """Every model ComfyUI tracks leaves the GPU, whatever the VRAM mode: under --highvram /
    --gpu-only a model's offload device is the GPU itself, so each is unloaded to the CPU instead
    (its own offload device is put back afterwards; ComfyUI loads it again when a node needs it).
    Refuses (TrainingError naming the mode) when ComfyUI still holds more than HELD_LIMIT there,
    e.g. models that mode placed on the GPU without ever tracking them. Returns a report line."""
    import comfy.model_management as mm

    from dreamrelation_core.errors import TrainingError

    device = mm.get_torch_device()
    cpu = torch.device("cpu")
    redirected = []
    for loaded in list(mm.current_loaded_models):
        patcher = loaded.model
        if patcher is not None and torch.device(patcher.offload_device).type != "cpu":
            redirected.append((patcher, patcher.offload_device))
            patcher.offload_device = cpu
    try:
        mm.unload_all_models()
    finally:
        for patcher, offload in redirected:
            patcher.offload_device = offload
    mm.soft_empty_cache()
    held, mode = _held_bytes(device), _vram_mode()
    if mode is not None and held > HELD_LIMIT:
        raise TrainingError(
            f"ComfyUI runs with {mode} and still holds {held / 2**30:.1f} GiB on the GPU after unloading its models: "
            f"training needs that memory. Restart ComfyUI without {mode} to prepare and train (its models then leave "
            "the GPU after use), or run the `prepare` / `train` commands outside ComfyUI")
    note = f" ({len(redirected)} moved to the CPU despite {mode})" if redirected and mode else ""
    return f"ComfyUI's models unloaded{note}; ComfyUI holds {held / 2**30:.2f} GiB on {device}."


def _fit_length(t: torch.Tensor, n: int, pad) -> torch.Tensor:
    """Truncate or pad dim 0 to n (Mochi's text length is 256 tokens)."""
    if t.shape[0] >= n:
        return t[:n]
    padding = torch.full((n - t.shape[0], *t.shape[1:]), pad, dtype=t.dtype)
    return torch.cat([t, padding])


# ---------------------------------------------------------------------------------------------
# nodes


class DreamRelationPrepareDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationPrepareDataset",
            display_name="DreamRelation Prepare Dataset",
            category="DreamRelation/training",
            description="Encode every video (latents as ComfyUI's Mochi sees them), caption and mask of a dataset once.",
            inputs=[
                Dataset.Input("dataset", tooltip="A checked dataset folder (DreamRelation Dataset node)."),
                io.Vae.Input("vae", tooltip="The Mochi VAE (Load VAE: mochi_vae.safetensors; its encoder encodes with "
                                            "genmo's causal attention) or a Wan VAE (wan_2.1_vae / wan2.2_vae."
                                            "safetensors). It tells the base model."),
                io.Clip.Input("clip", tooltip="T5-XXL loaded by CLIPLoader with type 'mochi', or umT5 with type 'wan': "
                                              "it encodes the captions."),
                io.Int.Input("max_text_len", default=256, min=8, max=512,
                             tooltip="Text tokens per caption (Mochi uses 256; Wan always 512)."),
                io.String.Input("cache_dir", optional=True, default="", tooltip=(
                    "Where the encoded clips go. Empty: <dataset folder>/.dreamrelation_cache. Unchanged clips are "
                    "not encoded again.")),
                advanced(io.Combo.Input("precision", options=["auto", "bf16", "fp32"], default="auto", optional=True,
                                        tooltip=("Precision of the video encoder. Auto is bf16 on a GPU and fp32 on "
                                                 "the CPU, where bf16 is slow."))),
                advanced(io.Combo.Input("vae_tiling", options=list(ON_OFF), default="auto", optional=True,
                                        tooltip=("Encode each video in overlapping spatial tiles: much less GPU "
                                                 "memory. Auto tiles on a GPU, not on the CPU."))),
            ],
            outputs=[
                Prepared.Output(display_name="prepared"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, dataset, vae, clip, max_text_len: int, cache_dir: str = "", precision: str = "auto",
                vae_tiling: str = "auto") -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from dreamrelation_core.data.cache import DEFAULT_CACHE, load_prepared, prepare_dataset

        cache = Path(cache_dir.strip()) if cache_dir.strip() else Path(dataset.folder) / DEFAULT_CACHE
        bar = comfy.utils.ProgressBar(len(dataset.entries))

        def progress(done: int, total: int, name: str) -> None:
            bar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        release_comfy_models()  # other models (a DiT from an earlier run) leave the GPU before T5 and the VAE
        encoders = comfy_encoders(vae, clip, precision, vae_tiling)
        if dataset.spec is not None and dataset.spec.name != encoders.spec.name:
            raise ValueError(f"the dataset was checked for {dataset.spec.name} but the vae input is {encoders.spec.name}'s; "
                             "set the Dataset node's base_model to match the VAE")
        if encoders.spec.family == "wan":
            max_text_len = encoders.spec.text_len  # ComfyUI's Wan always reads 512 umT5 rows
        prepare_dataset(dataset.folder, cache, encoders, dataset.num_frames, dataset.size, max_text_len,
                        progress=progress)
        clips = load_prepared(cache)
        dtype, tiled = encoding_settings(mm.get_torch_device(), precision, vae_tiling)
        report = (f"{len(clips)} clip(s) encoded in {cache}: latents {tuple(clips[0].mean.shape)}, text "
                  f"{tuple(clips[0].y_feat.shape)}; video encoder {str(dtype).removeprefix('torch.')}, "
                  f"{'tiled' if tiled else 'untiled'}")
        return io.NodeOutput(PreparedDataset(cache, len(clips), report), report)


class DreamRelationTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="DreamRelationTrain",
            display_name="DreamRelation Train Relation LoRA",
            category="DreamRelation/training",
            description=("Train a Relation LoRA triplet (hybrid mask training + relational contrastive loss) and save the "
                         "relation-only LoRA (subject LoRAs dropped) to models/loras/dreamrelation/."),
            is_output_node=True,
            inputs=[
                Prepared.Input("prepared", tooltip="The encoded dataset (DreamRelation Prepare Dataset)."),
                io.Combo.Input("transformer", options=folder_paths.get_filename_list("diffusion_models"), tooltip=(
                    "Mochi or Wan DiT weights (mochi_preview_*, wan2.1_t2v_*, wan2.2_*.safetensors; the base model is "
                    "read from the file) to train on. They are loaded for training only; ComfyUI's loaded models are "
                    "freed first.")),
                io.String.Input("name", default="my_relation", tooltip=(
                    "The run's name: the LoRA is saved as loras/dreamrelation/<name>.safetensors, the run in "
                    "output/dreamrelation/<name>/.")),
                io.Int.Input("steps", default=2000, min=1, max=100000, tooltip="Training steps (the paper: 1800-2000)."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank of every adapter."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5, tooltip="LoRA alpha: the scale is alpha / rank."),
                io.Float.Input("learning_rate", default=2e-4, min=1e-7, max=1e-1, step=1e-5, round=False,
                               tooltip="AdamW learning rate (linear warm-up, then cosine to 0)."),
                io.Float.Input("mask_weight", default=50.0, min=0.0, max=1000.0, step=1.0,
                               tooltip="Weight of the loss on the subjects' masks (hybrid mask training)."),
                io.Float.Input("rcl_weight", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Weight of the relational contrastive loss (0 turns it off)."),
                io.Int.Input("positives_per_anchor", default=4, min=1, max=10,
                             tooltip="Contrastive positives per anchor (the paper: 4 for high-five, 1 for shaking hands)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of every random choice in training."),
                io.Boolean.Input("resume", default=True, tooltip=(
                    "Continue the run called <name> from its last checkpoint if it exists. Off: refuse to touch an "
                    "existing run.")),
                io.Int.Input("warmup_steps", optional=True, default=200, min=0, max=100000,
                             tooltip="Linear learning-rate warm-up steps."),
                io.Float.Input("caption_dropout", optional=True, default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of steps trained without text (makes CFG work)."),
                io.Int.Input("checkpoint_every", optional=True, default=200, min=1, max=100000,
                             tooltip="Steps between checkpoints."),
                *memory_inputs(),
                io.Combo.Input("lora_placement", options=["default", "self_attention"], default="default", optional=True,
                               tooltip=("Where the triplet sits on Wan: default puts the relation LoRA on self- and "
                                        "cross-attention Q and K; self_attention on the self-attention only. Mochi: "
                                        "default only.")),
                *parallel_inputs(),  # last: the widget values of saved workflows keep their places
            ],
            outputs=[
                io.String.Output(display_name="lora_name"),
                io.Image.Output(display_name="loss_plot"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, prepared, transformer: str, name: str, steps: int, rank: int, alpha: float, learning_rate: float,
                mask_weight: float, rcl_weight: float, positives_per_anchor: int, seed: int, resume: bool,
                warmup_steps: int = 200, caption_dropout: float = 0.1, checkpoint_every: int = 200,
                base_dtype: str = "auto", blocks_to_swap: str = "auto", gradient_checkpointing: str = "auto",
                offload_activations: str = "auto", lora_placement: str = "default", gpus: int = 1,
                batch_size: int = 1) -> io.NodeOutput:
        import shutil

        import comfy.model_management as mm
        import folder_paths

        from dreamrelation_core.errors import TrainingError
        from dreamrelation_core.training.config import TrainConfig
        from dreamrelation_core.training.launch import Launch, check_devices
        from dreamrelation_core.training.protocol import Status
        from dreamrelation_core.training.worker_client import run_training_worker

        name = name.strip()
        if not _NAME_RE.match(name):
            raise TrainingError(f"name {name!r}: a run name uses letters, digits, '_', '-', '.' (at most 64, no path)")
        run_dir = Path(folder_paths.get_output_directory()) / RUN_SUBDIR / name
        device = training_device(str(mm.get_torch_device()), gpus, batch_size)
        check_devices(device, gpus)  # before anything starts: more processes than GPUs is an error
        # Paths only: the worker reads the prepared cache from disk (upstream tensors are inference tensors).
        config = TrainConfig(
            cache_dir=str(prepared.cache_dir), output_dir=str(run_dir),
            transformer=folder_paths.get_full_path_or_raise("diffusion_models", transformer),
            num_steps=steps, rank=rank, alpha=alpha, learning_rate=learning_rate, mask_weight=mask_weight,
            rcl_weight=rcl_weight, positives_per_anchor=positives_per_anchor, seed=seed, warmup_steps=warmup_steps,
            caption_dropout=caption_dropout, checkpoint_every=checkpoint_every, device=device,
            lora_placement=lora_placement, batch_size=batch_size,
            **memory_config(base_dtype, blocks_to_swap, gradient_checkpointing, offload_activations),
        )
        released = release_comfy_models()  # the worker loads the DiT being trained: it needs the memory
        live = _LiveProgress(steps, name, Path(folder_paths.get_temp_directory()) / RUN_SUBDIR)
        # The interrupt is raised inside the progress update (on_event): the client then has the worker
        # checkpoint at the current step and re-raises it. should_cancel covers the time between updates.
        result = run_training_worker(
            config, resume=resume, overwrite=False, on_event=live, should_cancel=mm.processing_interrupted,
            stderr_log=live.temp_dir / f"{name}_worker.log", launch=Launch(nproc=gpus),
        )
        if result.status == Status.CANCELLED:
            mm.throw_exception_if_processing_interrupted()  # checkpoint written: stop the queue here
            raise TrainingError(f"run {name}: {result.message}")  # stopped by a signal, not by ComfyUI
        if result.relation_path is None or not result.relation_path.is_file():
            raise TrainingError(f"run {name}: the worker reported {result.status!r} but wrote no relation LoRA "
                                f"in {result.run_dir}")
        lora_dir = Path(folder_paths.get_folder_paths("loras")[0]) / RUN_SUBDIR
        lora_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.relation_path, lora_dir / f"{name}.safetensors")
        plot = _loss_plot(result.history, run_dir / "loss_curve.png", name)
        report = f"{released} {_report(result, name, run_dir)}"
        if gpus > 1:
            report += f"; trained on {gpus} processes (torchrun), {batch_size} clip(s) per step over all of them"
        return io.NodeOutput(f"{RUN_SUBDIR}/{name}.safetensors", plot, report, ui=ui.PreviewText(report))


# ---------------------------------------------------------------------------------------------
# memory options (advanced inputs; 'auto' everywhere by default)

MAX_SWAP = 48  # Mochi's transformer blocks
ON_OFF = ("auto", "on", "off")


def advanced(inp):
    """Mark an input as advanced (shown folded away by frontends that know the flag; the V3 schema's
    `advanced` option where this ComfyUI has it, else the same key in the input's options)."""
    inp.extra_dict["advanced"] = True
    return inp


def memory_inputs() -> list:
    return [advanced(i) for i in (
        io.Combo.Input("base_dtype", options=["auto", "bf16", "fp8", "fp32"], default="auto", optional=True, tooltip=(
            "Precision of the frozen base weights. Auto keeps an fp8 file in fp8 and picks bf16 or fp8 to fit "
            "the GPU; fp8 halves their memory.")),
        io.Combo.Input("blocks_to_swap", options=["auto"] + [str(i) for i in range(MAX_SWAP + 1)], default="auto",
                       optional=True, tooltip=(
                           "Transformer blocks whose weights wait in CPU memory and are copied in when needed. "
                           "More saves GPU memory and costs speed; auto swaps only what the GPU needs.")),
        io.Combo.Input("gradient_checkpointing", options=list(ON_OFF), default="auto", optional=True, tooltip=(
            "Recompute activations in the backward pass: much less GPU memory, about 30 % slower. Auto turns it "
            "on when the run would not fit without it.")),
        io.Combo.Input("offload_activations", options=list(ON_OFF), default="auto", optional=True, tooltip=(
            "Keep the checkpointed activations in CPU memory (needs gradient checkpointing). Auto turns it on "
            "only when swapping blocks is not enough.")),
    )]


def memory_config(base_dtype: str, blocks_to_swap: str, gradient_checkpointing: str,
                  offload_activations: str) -> dict:
    """The node's memory inputs as TrainConfig fields ('auto', or a value)."""
    def on_off(v):
        return {"on": True, "off": False}.get(str(v), "auto") if not isinstance(v, bool) else v

    swap = blocks_to_swap if blocks_to_swap == "auto" else int(blocks_to_swap)
    return dict(base_dtype=base_dtype, blocks_to_swap=swap, gradient_checkpointing=on_off(gradient_checkpointing),
                offload_activations=on_off(offload_activations))


# ---------------------------------------------------------------------------------------------
# several GPUs (advanced inputs; one GPU by default)

MAX_GPUS = 64


def parallel_inputs() -> list:
    return [advanced(i) for i in (
        io.Int.Input("gpus", default=1, min=1, max=MAX_GPUS, optional=True, tooltip=(
            "Training processes, one per GPU of this machine (torchrun). More GPUs train more clips per second; "
            "each GPU still holds the whole model. batch_size must be a multiple of it.")),
        io.Int.Input("batch_size", default=1, min=1, max=256, optional=True, tooltip=(
            "Clips per training step over all GPUs together, shared out evenly. The same batch_size on 1 or "
            "several GPUs gives the same run.")),
    )]


def training_device(comfy_device: str, gpus: int, batch_size: int) -> str:
    """The worker's device: ComfyUI's, or plain 'cuda' for several GPUs (each process takes its
    own). A batch that several GPUs cannot share evenly is refused here, before anything starts."""
    from dreamrelation_core.training.launch import check_batch

    check_batch(batch_size, gpus, "GPUs")
    if gpus > 1 and comfy_device.startswith("cuda"):
        return "cuda"
    return comfy_device


PREVIEW_EVERY = 10  # previews per run (plus one at each checkpoint)


class _LiveProgress:
    """The worker's events on ComfyUI's progress bar, with the loss curve as the preview image now and then.

    Called by the worker client for each event; ComfyUI's interrupt is raised from `update_absolute`."""

    def __init__(self, total: int, name: str, temp_dir: Path) -> None:
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.name, self.temp_dir = total, name, temp_dir
        self.history: list[dict] = []
        self.last_preview = -1

    def __call__(self, ev) -> None:
        from dreamrelation_core.training.protocol import Action, Event

        if ev.event == Event.START:
            self.total = int(ev.total or self.total)
            if ev.action == Action.RESUME and ev.run_dir:
                self.history = [h for h in _saved_history(Path(ev.run_dir)) if h.get("step", 0) <= (ev.step or 0)]
            self.bar.update_absolute(int(ev.step or 0), self.total)
        elif ev.event == Event.STEP:
            self.history.append(ev.history_entry())
            every = max(1, self.total // PREVIEW_EVERY)
            due = ev.step % every == 0 or ev.step == self.total
            self.bar.update_absolute(ev.step, self.total, self._preview(ev.step) if due else None)
        elif ev.event == Event.CHECKPOINT and ev.step != self.last_preview:
            self.bar.update_absolute(int(ev.step or 0), self.total, self._preview(int(ev.step or 0)))

    def _preview(self, step: int):
        """("PNG", PIL image, max size): the loss curve so far, as ComfyUI's progress previews are passed."""
        from comfy.cli_args import args
        from PIL import Image

        from dreamrelation_core.training.plots import plot_losses

        if not self.history:
            return None
        self.last_preview = step
        path = plot_losses(self.history, self.temp_dir / f"{self.name}_live_loss.png",
                           f"DreamRelation: {self.name} (step {step}/{self.total})")
        with Image.open(path) as im:
            return "PNG", im.convert("RGB"), args.preview_size


def _saved_history(run_dir: Path) -> list[dict]:
    """The history.json of an earlier session of the run (NaN as null), or nothing."""
    from dreamrelation_core.training.protocol import read_history

    return read_history(run_dir)


def _report(result, name: str, run_dir: Path) -> str:
    """What the run did (the worker's plan, its memory options and any out-of-memory retries, the
    outcome), where its files are, its last loss."""
    last = result.history[-1] if result.history else {}
    loss = last.get("total", float("nan"))
    return (f"{result.message} Step {result.step}/{result.total}. Relation LoRA: "
            f"loras/{RUN_SUBDIR}/{name}.safetensors; run folder (checkpoints, triplet): {run_dir}; last loss {loss:.4f}")


def _loss_plot(history: list[dict], path: Path, name: str) -> torch.Tensor:
    """IMAGE [1, H, W, 3] float in [0, 1] of the loss curves (blank when there is no history)."""
    from PIL import Image

    from dreamrelation_core.training.plots import plot_losses

    if not history:
        return torch.ones(1, 64, 64, 3)
    plot_losses(history, path, f"DreamRelation: {name}")
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]


NODES: list[type[io.ComfyNode]] = [DreamRelationPrepareDataset, DreamRelationTrain]
