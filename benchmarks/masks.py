"""Frames per second of subject-mask extraction on a synthetic clip, with random-weight models.

    python benchmarks/masks.py                 # tiny models, CPU
    python benchmarks/masks.py --real-size     # SAM ViT-H, Grounding DINO Swin-T, SAM 2 hiera-large (GPU)

Measures per-frame detection + SAM, stride-6 detection + SAM, and SAM 2 propagation, and the
cost split (detection, image embedding, mask decoding, propagation). Random weights: the boxes are
meaningless, the arithmetic is the real one. Thresholds are 0 so every frame has two subjects.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # dreamrelation_core and fixtures (tiny models)

from dreamrelation_core.masks.extractor import SubjectMaskExtractor, SubjectMaskOptions  # noqa: E402
from dreamrelation_core.masks.grounding_dino import GroundingDino  # noqa: E402
from dreamrelation_core.masks.sam import Sam2Propagator, SamSegmenter, build_sam1, build_sam2_model  # noqa: E402


def clip(frames: int, h: int, w: int) -> np.ndarray:
    out = np.full((frames, h, w, 3), 90, np.uint8)
    for f in range(frames):
        x = int(w * 0.1) + f * 2
        out[f, h // 4 : 3 * h // 4, x : x + w // 5] = (220, 40, 40)
        out[f, h // 5 : 4 * h // 5, w - x - w // 5 : w - x] = (40, 60, 220)
    return out


def tiny_models():
    from fixtures.mask_models import tiny_gdino, tiny_sam, tiny_sam2, tiny_tokenizer

    return GroundingDino(tiny_gdino(), tiny_tokenizer()), SamSegmenter(tiny_sam()), Sam2Propagator(tiny_sam2())


def real_models(device: str):
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from fixtures.mask_models import tiny_tokenizer

    # Grounding DINO Swin-T (groundingdino_swint_ogc): transformers' defaults are that model.
    cfg = GroundingDinoConfig(backbone_config=dict(model_type="swin", embed_dim=96, depths=[2, 2, 6, 2],
                                                   num_heads=[3, 6, 12, 24], window_size=7, out_indices=[2, 3, 4]))
    gd = GroundingDino(GroundingDinoForObjectDetection(cfg), tiny_tokenizer(), device=device)
    sam = SamSegmenter(build_sam1(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)).to(device))
    sam2 = Sam2Propagator(build_sam2_model("sam2.1_hiera_l").to(device))
    return gd, sam, sam2


def timed(ex: SubjectMaskExtractor, frames: np.ndarray, opt: SubjectMaskOptions):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = ex.run(frames, opt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-size", action="store_true", help="real-size random models (needs a GPU to be quick)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-warmup", action="store_true", help="time the first run of each mode (real-size on a CPU)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.real_size:
        gd, sam, sam2 = real_models(args.device)
        frames = clip(args.frames or 25, 480, 848)
        det_size = dict(detector_short_side=800, detector_max_side=1333)
    else:
        gd, sam, sam2 = tiny_models()
        frames = clip(args.frames or 13, 64, 96)
        det_size = dict(detector_short_side=64, detector_max_side=128)
    ex = SubjectMaskExtractor(gd, sam, sam2)
    base = dict(box_threshold=0.0, text_threshold=0.0, max_frames_per_batch=4, **det_size)
    print(f"clip {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, device {args.device}, "
          f"{'real-size' if args.real_size else 'tiny'} random-weight models, torch threads {torch.get_num_threads()}")
    runs = {
        "per-frame detection + SAM": SubjectMaskOptions(mode="per_frame", detection_stride=1, **base),
        "stride-6 detection + SAM": SubjectMaskOptions(mode="per_frame", detection_stride=6, **base),
        "SAM 2 propagation (detect once)": SubjectMaskOptions(mode="propagate", detection_stride=6, **base),
    }
    fps = {}
    for name, opt in runs.items():
        if not args.no_warmup:
            timed(ex, frames, opt)  # warm-up: first calls of each tensor shape build kernels
        secs, r = timed(ex, frames, opt)
        fps[name] = len(frames) / secs
        split = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(r.timings.items()))
        print(f"{name:34s} {fps[name]:8.2f} frames/s   ({secs:.2f}s: {split})")
    ref = fps["per-frame detection + SAM"]
    for name, v in fps.items():
        print(f"  speed-up over per-frame detection + SAM: {name:34s} x{v / ref:.2f}")


if __name__ == "__main__":
    main()
