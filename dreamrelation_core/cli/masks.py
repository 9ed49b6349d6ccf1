"""`masks`: subject masks for videos, written where the dataset reader looks."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data import mask_files as mask_io
from ..data.video import VIDEO_SUFFIXES, is_video_path, read_video
from ..errors import MaskExtractionError
from ..masks.extractor import MODES, SubjectMaskExtractor, SubjectMaskOptions, SubjectMasks
from ..masks.grounding_dino import load_grounding_dino
from ..masks.sam import load_sam1, load_sam2
from ..masks.tracking import ORDERS
from .progress import progress_bar, say


def video_inputs(paths: list[str]) -> list[Path]:
    """Videos named on the command line: files, frame folders, or dataset folders holding them."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such video, frame folder or dataset folder")
        if p.is_file():
            found.append(p)
            continue
        children = sorted(p.iterdir())
        videos = [c for c in children if c.is_file() and c.suffix.lower() in VIDEO_SUFFIXES]
        stems = {v.stem for v in videos}
        # Frame-folder videos inside a dataset folder; `<name>/` beside `<name>.mp4` holds masks.
        folders = [c for c in children if c.is_dir() and c.name not in stems and c.name != "masks" and is_video_path(c)]
        if videos or folders:
            found += videos + folders
        elif is_video_path(p):
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: holds no videos ({', '.join(VIDEO_SUFFIXES)}) or frame folders")
    return found


def output_path(video: Path, out_dir: Path | None, png: bool) -> Path:
    """Where a video's masks go, in the layout the dataset reader looks for (see mask_io.find_masks)."""
    stem = video.name if video.is_dir() else video.stem
    if png:
        if out_dir is None:
            return video / "masks" if video.is_dir() else video.parent / stem
        return out_dir / stem
    return (out_dir or video.parent) / f"{stem}{mask_io.COMPACT_SUFFIX}"


def save_result(result: SubjectMasks, path: Path, png: bool) -> Path:
    """Write the masks at `path` (a folder for --png); refuses empty masks and never replaces
    saved masks by masks that miss a subject on most frames (mask_io.save_masks)."""
    del png  # the path names the layout: <name>.masks.npz or a <name>/ folder
    return mask_io.save_masks(path, result.subject1, result.subject2, overwrite=True)


def load_extractor(gdino: str, bert: str | None, sam: str | None, sam2: str | None, device: str) -> SubjectMaskExtractor:
    detector = load_grounding_dino(gdino, bert, device=device)
    return SubjectMaskExtractor(
        detector,
        sam=load_sam1(sam, device=device) if sam else None,
        sam2=load_sam2(sam2, device=device) if sam2 else None,
    )


def cmd_masks(args: argparse.Namespace) -> int:
    if not args.sam and not args.sam2:
        raise ValueError("give --sam (per-frame mode) and / or --sam2 (propagate mode)")
    videos = video_inputs(args.inputs)
    out_dir = Path(args.out) if args.out else None
    todo = [(v, output_path(v, out_dir, args.png)) for v in videos]
    if not args.overwrite:
        skipped = [v for v, o in todo if o.exists()]
        for v in skipped:
            print(f"{v}: masks exist, skipped (--overwrite to redo)")
        todo = [(v, o) for v, o in todo if not o.exists()]
    if not todo:
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = load_extractor(args.grounding_dino, args.bert, args.sam, args.sam2, device)
    opt = SubjectMaskOptions(
        prompt1=args.prompt1, prompt2=args.prompt2, mode=args.mode, order=args.order,
        box_threshold=args.box_threshold, text_threshold=args.text_threshold,
        detection_stride=args.stride, dilation=args.dilate, max_frames_per_batch=args.batch,
    )
    failed = 0
    for video, out in todo:
        frames = read_video(video)
        bar, update = progress_bar(video.name, "step")
        try:
            result = extractor.run(frames, opt, progress=update)
        except MaskExtractionError as e:  # subjects not found / missing on most frames: the next video
            failed += 1
            say(f"{video}: {e}")
            continue
        finally:
            bar.close()
        try:
            save_result(result, out, args.png)
        except MaskExtractionError as e:
            failed += 1
            say(f"{video}: {e}")
            continue
        for note in result.notes:
            say(f"{video.name}: {note}")
        print(f"{video}: {len(frames)} frames -> {out}")
    return 1 if failed else 0


def add_cli(subparsers) -> None:
    """The `masks` sub-command: subject masks for videos, written where the dataset reader looks."""
    p = subparsers.add_parser(
        "masks",
        help="subject masks for videos (Grounding DINO + SAM / SAM 2)",
        description="Write <name>.masks.npz (or reference PNG masks with --png) for each video.",
    )
    p.add_argument("inputs", nargs="+", help="video files, frame folders, or dataset folders holding them")
    p.add_argument("--grounding-dino", required=True, help="original .pth (e.g. groundingdino_swint_ogc.pth) or HF folder")
    p.add_argument("--bert", help="folder with bert-base-uncased's vocab.txt (needed for an original .pth)")
    p.add_argument("--sam", help="SAM checkpoint (sam_vit_h_4b8939.pth, ...): per-frame mode")
    p.add_argument("--sam2", help="SAM 2 checkpoint (sam2.1_hiera_large.pt, ...): propagate mode")
    p.add_argument("--mode", choices=MODES, default="auto", help="auto: propagate when --sam2 is given")
    p.add_argument("--prompt1", default="person", help="text prompt of subject 1")
    p.add_argument("--prompt2", default="person", help="text prompt of subject 2")
    p.add_argument("--order", choices=ORDERS, default="left_first", help="subject 1 when both prompts are equal")
    p.add_argument("--box-threshold", type=float, default=0.35)
    p.add_argument("--text-threshold", type=float, default=0.25)
    p.add_argument("--stride", type=int, default=6, help="detect every k-th frame")
    p.add_argument("--dilate", type=int, default=0, help="grow masks by this many pixels")
    p.add_argument("--batch", type=int, default=8, help="frames per forward pass")
    p.add_argument("--out", help="output folder (default: beside each video)")
    p.add_argument("--png", action="store_true", help="reference layout: <name>/frame{i}.png colour masks")
    p.add_argument("--overwrite", action="store_true", help="redo videos whose masks exist")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    p.set_defaults(func=cmd_masks)
