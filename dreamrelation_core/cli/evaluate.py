"""`evaluate`: score a folder of generated videos offline (CLIP-T, temporal consistency, relation
accuracy, appearance leakage, FVD) and write a CSV with one row per video plus a summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation import runner
from ..evaluation.fvd import FVD_FRAMES, FVD_SIZE
from .progress import progress_bar


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = runner.EvalSettings(
        clip=args.clip, clip_tokenizer=args.clip_tokenizer, no_clip_t=args.no_clip_t, i3d=args.i3d,
        reference=args.reference, judge=args.judge, exemplars=args.exemplars, device=_device(args.device),
        fvd_frames=args.fvd_frames, fvd_stride=args.fvd_stride, fvd_size=args.fvd_size,
        fvd_ddof=0 if args.fvd_biased_cov else 1, judge_frames=args.judge_frames, exemplar_frames=args.exemplar_frames,
    )
    bar, update = progress_bar("evaluate", "step", quiet=args.quiet)
    try:  # one step per message of the runner
        result = runner.evaluate(args.videos, args.prompts, settings, lambda msg: update(label=msg[-60:]))
    finally:
        bar.close()
    out = runner.write_csv(result.rows, args.out)
    summary_path = runner.write_summary(result.summary, Path(args.out).with_suffix(".summary.json"))
    print(runner.summary_table(result.summary))
    print(f"wrote {out} ({len(result.rows)} videos) and {summary_path}")
    return 0


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score generated videos offline: CLIP-T, temporal consistency, relation accuracy, leakage, FVD",
        description="Score a folder of generated videos with local model files only (nothing is downloaded). "
        "Each metric runs when its model is given. Writes a CSV (one row per video) and <out>.summary.json, "
        "and prints a summary table.",
        epilog="Prompts file: TAB-separated lines '<video>\\t<prompt>' or '<video>\\t<prompt>\\t<subject A>\\t"
        "<relation>\\t<subject B>' ('#' comments), or JSON: a list of {video, prompt, subject_a, relation, "
        "subject_b} objects, or an object mapping video names to prompts / such objects.",
    )
    p.add_argument("--videos", required=True, help="folder of generated videos (.mp4/.webm/.mkv/.mov/.gif or frame folders)")
    p.add_argument("--prompts", required=True, help="prompts file (format below)")
    p.add_argument("--out", required=True, help="output CSV file")
    p.add_argument("--clip", help="CLIP: a local Hugging Face CLIP folder, or a .safetensors such as ComfyUI's "
                   "models/clip_vision/*.safetensors (image tower only: add --no-clip-t)")
    p.add_argument("--clip-tokenizer", help="folder with the CLIP tokenizer (vocab.json, merges.txt) for a single "
                   "CLIP file that has a text tower (e.g. ComfyUI's comfy/sd1_tokenizer)")
    p.add_argument("--no-clip-t", action="store_true", help="skip CLIP-T (for a CLIP without its text tower)")
    p.add_argument("--exemplars", help="folder of the training exemplar videos: appearance leakage (needs --clip)")
    p.add_argument("--judge", help="local vision-language model folder (transformers image-text-to-text): relation accuracy")
    p.add_argument("--judge-frames", type=int, default=None, help="frames shown to the judge (default: the model's "
                   "video processor setting, else 8)")
    p.add_argument("--i3d", help="FVD feature network: TorchScript (e.g. StyleGAN-V's i3d_torchscript.pt) or a "
                   "SmallVideoNet state dict (needs --reference)")
    p.add_argument("--reference", help="folder of reference videos for FVD")
    p.add_argument("--fvd-frames", type=int, default=FVD_FRAMES, help=f"frames per clip for FVD (default {FVD_FRAMES}; "
                   "0 = all, every clip then needs the same length)")
    p.add_argument("--fvd-stride", type=int, default=1, help="take every n-th frame for FVD (default 1)")
    p.add_argument("--fvd-size", type=int, default=FVD_SIZE, help=f"FVD frame size (default {FVD_SIZE})")
    p.add_argument("--fvd-biased-cov", action="store_true", help="covariance divided by N (StyleGAN-V's metric "
                   "code) instead of N-1")
    p.add_argument("--exemplar-frames", type=int, default=16, help="frames taken from each exemplar video (default 16)")
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
