"""`train`, `resume`, `export-relation` and `import-reference` commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import formats


def _bar(total: int, start: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(info) -> None:
        bar.update(info.step - bar.n)
        l = info.losses
        bar.set_postfix_str(f"{info.branch} total {l['total']:.4f} masked {l['masked']:.4f} rcl {l['rcl']:.3f} lr {info.lr:.2e}")

    return bar, update


def _report(result) -> int:
    print(f"{result.status} at step {result.step}")
    print(f"checkpoint:    {result.checkpoint}")
    print(f"triplet:       {result.triplet_path}")
    print(f"relation-only: {result.relation_path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .trainer import Trainer, list_checkpoints

    config = TrainConfig.load_yaml(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    if list_checkpoints(config.output_dir) and not args.overwrite:
        raise ValueError(f"{config.output_dir} already holds checkpoints: use `resume {config.output_dir}` or --overwrite")
    trainer = Trainer(config)
    bar, update = _bar(config.num_steps, 0)
    try:
        return _report(trainer.train(progress=update))
    finally:
        bar.close()


def cmd_resume(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    trainer = Trainer.resume(args.run_dir, checkpoint=args.checkpoint)
    bar, update = _bar(trainer.config.num_steps, trainer.step)
    try:
        return _report(trainer.train(progress=update))
    finally:
        bar.close()


def cmd_export_relation(args: argparse.Namespace) -> int:
    lora = formats.load_lora_file(args.input)
    step = int(lora.metadata.get("step", 0) or 0)
    out = formats.save_relation_only(args.output, lora, step=step)
    print(formats.describe(formats.load_lora_file(out)))
    print(f"wrote {out}")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    lora = formats.import_reference(args.input)
    print(formats.describe(lora))
    missing = [a for a in ("relation", "subject1", "subject2", "ffn") if a not in lora.adapters]
    step = _step_from_name(Path(args.input).name)
    if missing or args.relation_only:
        out = formats.save_relation_only(args.output, lora, step=step)
    else:
        out = formats.save_triplet(args.output, lora, step=step)
    print(f"wrote {out}")
    return 0


def _step_from_name(name: str) -> int:
    import re

    m = re.search(r"model_(\d+)", name)
    return int(m.group(1)) if m else 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a relation LoRA triplet from a YAML config")
    p.add_argument("config", help="YAML file of TrainConfig options (see README)")
    p.add_argument("--output-dir", help="override output_dir of the config")
    p.add_argument("--overwrite", action="store_true", help="start over even if output_dir has checkpoints")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("run_dir", help="the run's output folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a specific checkpoint_<step>.pt instead of the last one")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("export-relation", help="write the relation + ffn part of a triplet file (subject LoRAs dropped)")
    p.add_argument("input", help="our triplet .safetensors (or a reference checkpoint)")
    p.add_argument("output", help="output .safetensors")
    p.set_defaults(func=cmd_export_relation)
    p = sub.add_parser("import-reference", help="convert a reference DreamRelation checkpoint (model_<step>.lora.pt) to our format")
    p.add_argument("input", help="model_<step>.lora.pt or its .safetensors (read with weights_only=True)")
    p.add_argument("output", help="output .safetensors (our triplet format)")
    p.add_argument("--relation-only", action="store_true", help="write only relation + ffn")
    p.set_defaults(func=cmd_import_reference)
