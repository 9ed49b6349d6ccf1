"""`export-comfy`, `export-relation` and `import-reference`: LoRA file conversions."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..dtypes import DTYPES
from ..lora import files as lora_files
from ..lora.comfy_export import save_comfy_lora
from ..lora.layout import ADAPTERS


def cmd_export_relation(args: argparse.Namespace) -> int:
    lora = lora_files.load_lora_file(args.input)
    step = int(lora.metadata.get("step", 0) or 0)
    out = lora_files.save_relation_only(args.output, lora, step=step)
    print(lora_files.describe(lora_files.load_lora_file(out)))
    print(f"wrote {out}")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    lora = lora_files.import_reference(args.input)
    print(lora_files.describe(lora))
    missing = [a for a in ADAPTERS if a not in lora.adapters]
    step = _step_from_name(Path(args.input).name)
    if missing or args.relation_only:
        out = lora_files.save_relation_only(args.output, lora, step=step)
    else:
        out = lora_files.save_triplet(args.output, lora, step=step)
    print(f"wrote {out}")
    return 0


def _step_from_name(name: str) -> int:
    m = re.search(r"model_(\d+)", name)
    return int(m.group(1)) if m else 0


def export_comfy(src: str | Path, dst: str | Path, dtype: str = "fp32") -> Path:
    """Read any LoRA file we accept and write its relation + ffn part as a stock ComfyUI LoRA of its base model."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    lora = lora_files.load_lora_file(src)
    return save_comfy_lora(dst, lora, dtype=DTYPES[dtype], source=str(src))


def cmd_export_comfy(args: argparse.Namespace) -> int:
    out = export_comfy(args.input, args.output, args.dtype)
    base = lora_files.load_lora_file(args.input).spec
    keys = "genmo keys" if base.family == "mochi" else "ComfyUI's Wan LoRA keys"
    print(f"wrote {out} (relation + ffn as a {base.display_name} LoRA in {keys}; load it with ComfyUI's "
          "LoraLoaderModelOnly)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-comfy",
        help="write a relation LoRA as a standard Mochi / Wan LoRA for ComfyUI's stock LoRA loaders",
        description="Read our triplet / relation-only file or a reference checkpoint and write its "
        "relation + ffn LoRAs in ComfyUI's key names for its base model (Mochi: genmo keys; Wan: "
        "diffusion_model.blocks.N.self_attn.q...); subject LoRAs are left out.",
    )
    p.add_argument("input", help="triplet, relation-only or reference .lora.pt / .safetensors file")
    p.add_argument("output", help="output .safetensors (e.g. ComfyUI/models/loras/handshake_mochi.safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="tensor precision written (default fp32)")
    p.set_defaults(func=cmd_export_comfy)
    p = subparsers.add_parser("export-relation", help="write the relation + ffn part of a triplet file (subject LoRAs dropped)")
    p.add_argument("input", help="our triplet .safetensors (or a reference checkpoint)")
    p.add_argument("output", help="output .safetensors")
    p.set_defaults(func=cmd_export_relation)
    p = subparsers.add_parser("import-reference", help="convert a reference DreamRelation checkpoint (model_<step>.lora.pt) to our format")
    p.add_argument("input", help="model_<step>.lora.pt or its .safetensors (read with weights_only=True)")
    p.add_argument("output", help="output .safetensors (our triplet format)")
    p.add_argument("--relation-only", action="store_true", help="write only relation + ffn")
    p.set_defaults(func=cmd_import_reference)
