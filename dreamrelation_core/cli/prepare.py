"""`prepare`: encode a dataset folder into the training cache."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import torch

from ..base_models import NAMES, get_spec
from ..basemodel import BaseModelSpec
from ..data.cache import DEFAULT_CACHE, MANIFEST, Encoders, model_tag, prepare_dataset
from ..data.dataset import describe_dataset
from ..data.encode import encode_captions, encode_frames
from ..dtypes import DTYPES
from .progress import progress_bar


def parse_size(text: str) -> tuple[int, int]:
    """'480x848' -> (480, 848) as (H, W)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HEIGHTxWIDTH, e.g. 480x848")
    return int(m.group(1)), int(m.group(2))


def run_prepare(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on a GPU; fp32 on the CPU, where bf16 convolutions are slow (docs/method.md "Memory fallback")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    tiling = {"on": True, "off": False}.get(args.vae_tiling, device.startswith("cuda"))
    cache = Path(args.cache) if args.cache else Path(args.data_dir) / DEFAULT_CACHE
    # Fail on the data before spending minutes loading T5-XXL.
    spec = get_spec(args.base_model)
    if spec.family == "mochi" and not args.tokenizer:
        raise SystemExit("prepare: --tokenizer (the T5 tokenizer folder) is needed for Mochi")
    frames = args.frames or (61 if spec.family == "mochi" else 81)
    max_text_len = args.max_text_len or spec.text_len
    entries = describe_dataset(args.data_dir, frames, args.size, spec).entries
    print(f"{len(entries)} video(s) in {args.data_dir}; {spec.display_name}; models on {device} in "
          f"{str(dtype).removeprefix('torch.')}, VAE {'tiled' if tiling else 'untiled'}")
    encoders = _one_model_at_a_time(args, spec, device, dtype, tiling)
    bar, update = progress_bar("prepare", "video", len(entries))
    try:
        paths = prepare_dataset(args.data_dir, cache, encoders, frames, args.size, max_text_len, progress=update)
    finally:
        bar.close()
    print(f"prepared {len(paths)} clip(s) in {cache} (manifest: {cache / MANIFEST})")
    return 0


def _one_model_at_a_time(
    args: argparse.Namespace, spec: BaseModelSpec, device: str, dtype: torch.dtype, tiling: bool,
) -> Encoders:
    """T5 encodes every caption first and is freed; then the VAE is loaded and encodes the videos
    (the two never share the device's memory)."""
    import gc

    te, tok = spec.load_text_encoder(args.text_encoder, args.tokenizer, args.text_encoder_config, dtype=dtype,
                                     device=device)
    models: dict = {"te": te}

    def free_text_encoder() -> None:
        models.pop("te", None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def vae():
        if "vae" not in models:
            models["vae"] = spec.load_vae(args.vae, args.vae_config, dtype=dtype, device=device)
            if tiling:
                models["vae"].enable_tiling()
        return models["vae"]

    tags = (_file_tag(args.vae, args.vae_config), model_tag(te))  # the VAE is not loaded yet: its files name it
    del te
    return Encoders(encode_video=lambda frames: encode_frames(vae(), frames, spec),
                    encode_text=lambda captions, n: encode_captions(models["te"], tok, captions, n),
                    tags=tags, spec=spec, after_text=free_text_encoder)


def _file_tag(*paths: str | None) -> str:
    """Identity of model files by name and size (a replaced file re-encodes the cache)."""
    parts = []
    for path in filter(None, paths):
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        parts += [f"{f.name}:{f.stat().st_size if f.exists() else 0}" for f in files]
    return "files:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="encode a relation dataset folder (videos, captions, masks) into a training cache",
        description="Check a dataset folder, then encode each video with the Mochi VAE and each caption "
        "with T5 once, writing <cache>/<name>.safetensors and manifest.json. Local model files only.",
    )
    p.add_argument("data_dir", help="dataset folder: <name>.mp4|.webm|.gif|<name>/ frames, <name>.txt, masks")
    p.add_argument("--vae", required=True, help="Mochi VAE: ComfyUI's mochi_vae.safetensors (genmo keys), a diffusers "
                   "folder, or a diffusers-layout .safetensors (with --vae-config)")
    p.add_argument("--vae-config", default=None, help="folder with the VAE's config.json (single-file --vae)")
    p.add_argument("--text-encoder", required=True, help="T5-XXL: transformers folder or .safetensors (t5xxl_fp16)")
    p.add_argument("--text-encoder-config", default=None,
                   help="folder with T5's config.json for a single-file --text-encoder (default: --tokenizer folder)")
    p.add_argument("--tokenizer", default=None, help="T5 tokenizer folder (e.g. mochi-1-preview/tokenizer; needed for "
                   "Mochi); Wan: optional, ComfyUI's umT5 files carry their tokenizer")
    p.add_argument("--cache", default=None, help=f"cache folder (default DATA_DIR/{DEFAULT_CACHE})")
    p.add_argument("--base-model", choices=[n for n in NAMES if n != "auto"], default="mochi",
                   help="whose VAE and text encoder: mochi (default) or a Wan (wan2.1 for 2.1 1.3B/14B and the 2.2 "
                   "A14B experts; wan2.2-5b for the TI2V 5B)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip: Mochi 6k+1 (default 61), Wan 4k+1 (default 81)")
    p.add_argument("--size", type=parse_size, default=(480, 848), help="HEIGHTxWIDTH, multiples of 16 (default 480x848)")
    p.add_argument("--max-text-len", type=int, default=None,
                   help="text tokens per caption (default: Mochi's T5 256, Wan's umT5 512)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model precision (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--vae-tiling", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="encode in spatial tiles, much less GPU memory (default auto: on a GPU, not on the CPU)")
    p.set_defaults(func=run_prepare)
