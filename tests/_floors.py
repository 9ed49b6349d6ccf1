"""The core's floor table, in one place: tests/test_architecture.py enforces it and
`python docs/images/make_architecture.py` writes it into docs/ARCHITECTURE.md (and draws it).

A module may import its own subpackage and anything on a lower floor; parts sharing a floor stay
independent. A new top-level piece of the core gets a row here (e.g. a second base model beside
"mochi"); a new module of a package is named in its row's text (the architecture test says which
are missing), then the page is generated again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "dreamrelation_core"
PAGE = ROOT / "docs" / "ARCHITECTURE.md"
BEGIN = ("<!-- floor table: generated from tests/_floors.py by `python docs/images/make_architecture.py`; "
         "edit it there -->")
END = "<!-- end of the generated floor table -->"


@dataclass(frozen=True)
class Part:
    floor: int
    names: tuple[str, ...]  # first names below the package; "" is the package's own __init__.py
    what: str  # markdown; a package's text names each of its modules in backticks

    def labels(self) -> list[str]:
        return [f"`{file_label(n)}`" for n in self.names]


PARTS: list[Part] = [
    Part(0, ("", "errors"), "`__init__.py` stays empty (importing it runs before any submodule); `errors.py`: the "
         "one error hierarchy, `DreamRelationError` and its subclasses; every message names the file / key / shape / "
         "field and what was expected"),
    Part(1, ("fileio", "dtypes", "statedict", "fp8", "basemodel"), "atomic writes (`atomic_file`, "
         "`save_safetensors`, `save_torch`; a full disk is one `DiskFullError`; temporary files of killed writes "
         "removed); precision names → torch dtypes, casts that refuse values the dtype cannot hold; weights files "
         "read without unpickling code (torch's `weights_only=False` advice never passed on), keys taken and "
         "leftovers refused; frozen Linears stored in fp8 / bf16 (ComfyUI's scaled fp8 files), upcast per layer; "
         "`BaseModelSpec`, the type each base model's spec implements"),
    Part(2, ("mochi",), "Mochi 1: `spec` (its `BaseModelSpec`, with the relation placements of the ablations), `loading` (transformer, VAE, T5, tokenizer from local files), `latents` "
         "(frame and size rules, latent normalisation, timestep convention), `dit_keys` / `vae_keys` (genmo/ComfyUI "
         "↔ diffusers weights), `fp8` (frozen Linears stored in fp8, upcast per layer), `attention` (our Mochi attention processor: the "
         "valid text tokens found once per step), `tiny` (random tiny models)"),
    Part(2, ("wan",), "Wan 2.1 / 2.2: `spec` (`WAN21`, `WAN22_5B` and the adapter placements), `loading` (ComfyUI's "
         "Wan DiT, VAE and umT5 files, fp8 scaled included), `latents` (4k + 1 frames, both VAEs' normalisation, time "
         "convention), `dit_keys` / `vae_keys` (ComfyUI ↔ diffusers weights, size detection), `tokenizer` (umT5's "
         "tokenizer from the SentencePiece model in ComfyUI's file), `tiny`"),
    Part(3, ("base_models",), "the registry of base models: a spec by name (`TrainConfig.base_model`), detected from "
         "a file, of a loaded model, of a LoRA module path"),
    Part(4, ("lora",), "`layout` (`LoraSet`: adapter → module → (A, B), targets), `peft_triplet` (the four adapters "
         "on the diffusers model, activation per branch), `files` (our files, reference import), `genmo` "
         "(ComfyUI/genmo LoRA keys), `comfy_export` (the stock ComfyUI LoRA of any base model: genmo keys for Mochi, "
         "`self_attn` / `cross_attn` keys for Wan)"),
    Part(4, ("data",), "`video`, `mask_files`, `latent_masks`, `dataset` (scan and validate a folder), `exemplars` "
         "(add one exemplar to a dataset folder), `encode`, `cache` (the prepared training cache), `synthetic`"),
    Part(5, ("training",), "`config` (`TrainConfig`), `flow` (noise, masked loss), `contrastive` (RCL and its banks), "
         "`trainer` (loop, checkpoints, resume), `distributed` (data parallel under torchrun: the process group, each "
         "process's share of the batch, contrastive features gathered, gradients summed), `lock` (one trainer per run folder), `runs` (a run folder: new, "
         "resumed or already finished; walk-back past unreadable checkpoints; `run_training`, the one path of "
         "`train`, `resume` and the worker), `protocol` (the worker protocol: event names, the cancel command, exit "
         "codes, run statuses, the history file read and written), `worker` / "
         "`worker_client` (training in a worker process that reports JSON lines, and the parent side that follows "
         "it), `launch` (several worker processes under torchrun: its command line, the device checks, its failure "
         "summary read back), `outside_inference` (training under a caller's `torch.inference_mode()`), `memory/` (peak-memory "
         "estimate and its meta-device trace, gradient checkpointing, block swap, the frozen base sharded over ranks (FSDP2), fp8 base; chosen by `TrainConfig`), "
         "`fallback` (an out-of-memory at step 1 retried one rung down the memory ladder), `allocator` (the "
         "training process's CUDA allocator settings), `plots`"),
    Part(5, ("masks",), "`grounding_dino`, `sam`, `tracking`, `extractor` (boxes → masks for a whole video), `images` "
         "(frame checks, normalisation), `preview`"),
    Part(5, ("evaluation",), "offline metrics of generated videos: `clip_metrics` (CLIP-T, temporal consistency), "
         "`judge` (relation accuracy by a local vision-language model), `leakage` (appearance leakage towards the "
         "exemplars), `fvd` (Fréchet Video Distance), `runner` (a folder of videos → CSV and summary)"),
    Part(5, ("analysis",), "Q/K/V analysis ([analysis.md](analysis.md)): `subspace` (φ between weights), `weights` "
         "(attention Q/K/V by key pattern, read slice by slice), `sweep` (every layer: JSON, CSV, heat map), "
         "`lora_report`, `features` (Q/K/V feature maps), `plots`"),
    Part(6, ("generate",), "relation LoRA on the diffusers model for inference, σ schedule, sampler"),
    Part(7, ("ablation",), "the synthetic-world study ([ablation.md](ablation.md)): `world` (subjects, relation "
         "programs, rendering on the latent grid), `judge` (the relation as the nearest true clip, relation distance, smooth tracks, text "
         "alignment, leakage; its own check), "
         "`denoising` (relation and leakage scores by denoising error, no sampling; the base's temporal-pooling check), "
         "`recipe`, `base` (pretraining and cache of the small base), `study` (the variants through the trainer, "
         "LoRA files and sampler)"),
    Part(8, ("cli",), "`python -m dreamrelation_core`: one module per command family (`prepare`, `masks`, `train`, "
         "`export`, `demo`, `evaluate`, `analyze`, `memory`, `ablation`), `progress` (the one progress bar of the "
         "long commands)"),
    Part(9, ("__main__",), "the module entry point"),
]

# Floors, lowest first.
FLOORS: list[tuple[str, ...]] = [tuple(n for p in PARTS if p.floor == i for n in p.names)
                                 for i in range(max(p.floor for p in PARTS) + 1)]
FLOOR_OF = {part: i for i, parts in enumerate(FLOORS) for part in parts}


def file_label(name: str) -> str:
    """`mochi/` for a package, `errors.py` for a module, `__init__.py` for the package itself."""
    if not name:
        return "__init__.py"
    return f"{name}/" if (ROOT / CORE / name).is_dir() else f"{name}.py"


def floor_table() -> str:
    """The markdown table docs/ARCHITECTURE.md shows, between BEGIN and END."""
    rows = ["| floor | part | what it holds |", "|---|---|---|"]
    rows += [f"| {p.floor} | {', '.join(p.labels())} | {p.what} |" for p in PARTS]
    return "\n".join([BEGIN, *rows, END])


def page_table(text: str) -> str | None:
    """The generated block of the page as it stands, or None without its markers."""
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN): text.index(END) + len(END)]


def with_table(text: str) -> str:
    """The page with its block replaced by the current table."""
    old = page_table(text)
    if old is None:
        raise ValueError(f"{PAGE}: no generated floor table (lines {BEGIN!r} ... {END!r}) to replace")
    return text.replace(old, floor_table())


def unnamed_modules() -> list[str]:
    """Modules of the core's packages that their part's text does not name."""
    missing = []
    for part in PARTS:
        for name in part.names:
            folder = ROOT / CORE / name if name else None
            if folder is None or not folder.is_dir():
                continue
            children = sorted([p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
                              + [p.name for p in folder.iterdir() if (p / "__init__.py").is_file()])
            missing += [f"{name}/{c}" for c in children if f"`{c}`" not in part.what and f"`{c}/`" not in part.what]
    return missing
