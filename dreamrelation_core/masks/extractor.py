"""Two subjects' masks for every frame of a video: Grounding DINO boxes -> SAM / SAM 2 masks.

Modes:
- `per_frame`: Grounding DINO on every `detection_stride`-th frame (and the last), identities
  kept by `tracking.track_pair` (boxes interpolated between detection frames), then SAM masks
  from the two boxes on every frame.
- `propagate`: Grounding DINO on the first frame where two subjects are found (frames searched
  every `detection_stride`), then SAM 2 propagates both masks through the clip, forward and
  backward; identities are fixed by construction.
- `auto` (default): `propagate` when a SAM 2 model is given, else `per_frame`.

Subject 1 is the left subject of the start frame (or the larger with `order="largest_first"`);
with a different prompt per subject, subject k is what prompt k found.

A subject missing on most frames (its mask empty on more than `max_empty_share` of them) is an
error naming the prompt, the frames and what to try; the share of empty frames of each subject is
in `SubjectMasks.coverage` and, where not zero, in the notes.

No ComfyUI here: the node passes a progress callback and a cancel check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data.mask_files import MOSTLY_EMPTY, SubjectCoverage, frame_ranges, mask_coverage
from ..errors import Cancelled, MaskExtractionError, NotEnoughSubjectsError
from .grounding_dino import DetectorOptions, GroundingDino
from .sam import Sam2Propagator, SamSegmenter
from .tracking import ORDERS, FrameDetections, describe_missing, pick_initial_pair, track_pair

log = logging.getLogger("dreamrelation.masks")

MODES = ("auto", "per_frame", "propagate")
Progress = Callable[[int, int], None]  # (units done, units in all)
CancelCheck = Callable[[], "bool | None"]  # True (or raising) stops the run


@dataclass
class SubjectMaskOptions:
    prompt1: str = "person"
    prompt2: str = "person"
    mode: str = "auto"
    order: str = "left_first"  # which subject is subject 1 when both prompts are equal
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    detection_stride: int = 6  # detect every k-th frame (per_frame) / search step (propagate)
    dilation: int = 0  # grow every mask by this many pixels
    max_frames_per_batch: int = 8  # frames per detector / SAM image-encoder forward pass
    detector_short_side: int = 800
    detector_max_side: int = 1333
    max_empty_share: float = MOSTLY_EMPTY  # a subject empty on more of the frames is an error; 1.0: never

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.detection_stride < 1 or self.max_frames_per_batch < 1 or self.dilation < 0:
            raise ValueError(
                f"detection_stride and max_frames_per_batch must be >= 1 and dilation >= 0; got "
                f"{self.detection_stride}, {self.max_frames_per_batch}, {self.dilation}"
            )
        if not 0.0 <= self.max_empty_share <= 1.0:
            raise ValueError(f"max_empty_share must be in [0, 1], got {self.max_empty_share}")
        if not self.prompt1.strip() or not self.prompt2.strip():
            raise ValueError("both subject prompts must be non-empty (e.g. 'person')")

    def detector_options(self) -> DetectorOptions:
        return DetectorOptions(
            box_threshold=self.box_threshold, text_threshold=self.text_threshold,
            short_side=self.detector_short_side, max_side=self.detector_max_side,
            batch_size=self.max_frames_per_batch,
        )


@dataclass
class SubjectMasks:
    subject1: np.ndarray  # bool [F, H, W]
    subject2: np.ndarray  # bool [F, H, W]
    boxes: np.ndarray  # float [F, 2, 4] xyxy pixels (NaN where a propagated mask is empty)
    scores: np.ndarray  # float [F, 2] detection score on frames where the detector found the subject
    detected: np.ndarray  # bool [F, 2]
    start_frame: int  # the frame whose detections set the identities
    mode: str
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    coverage: tuple[SubjectCoverage, ...] = ()  # per subject: the frames where its mask is empty

    @property
    def relation(self) -> np.ndarray:
        """Union of the two subjects (the relation branch's mask)."""
        return self.subject1 | self.subject2


# ---------------------------------------------------------------------------------------------
# Inputs and small helpers


def as_uint8_frames(frames) -> np.ndarray:
    """uint8 [F,H,W,3] from uint8 or float (0..1) frames, numpy or torch."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3] (RGB), got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"empty frame batch: shape {tuple(frames.shape)}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"expected uint8 (0..255) or float (0..1) frames, got dtype {frames.dtype}")


def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Grow boolean masks [N,H,W] by `pixels` (square neighbourhood)."""
    if pixels <= 0:
        return masks
    t = torch.from_numpy(masks).float()[:, None]
    return (F.max_pool2d(t, 2 * pixels + 1, stride=1, padding=pixels)[:, 0] > 0).numpy()


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Bounding boxes [N,4] (xyxy, pixel edges) of boolean masks [N,H,W]; NaN for empty ones."""
    out = np.full((len(masks), 4), np.nan)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def _prompts(opt: SubjectMaskOptions) -> list[str]:
    """The detector's prompts: one when both subjects have the same, else one per subject."""
    p1, p2 = opt.prompt1.strip().lower(), opt.prompt2.strip().lower()
    return [p1] if p1 == p2 else [p1, p2]


class _Reporter:
    """Progress + cancellation in one place."""

    def __init__(self, total: int, progress: Progress | None, cancel: CancelCheck | None) -> None:
        self.done, self.total, self.progress, self.cancel = 0, total, progress, cancel

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("subject mask extraction cancelled")

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)
        self.check()


# ---------------------------------------------------------------------------------------------
# Pipeline


class SubjectMaskExtractor:
    """Detector + SAM (per-frame mode) and / or SAM 2 (propagate mode)."""

    def __init__(self, detector: GroundingDino, sam: SamSegmenter | None = None, sam2: Sam2Propagator | None = None) -> None:
        if sam is None and sam2 is None:
            raise ValueError("a SAM model (per-frame mode) or a SAM 2 model (propagate mode) is needed")
        self.detector, self.sam, self.sam2 = detector, sam, sam2

    def resolve_mode(self, mode: str) -> str:
        if mode == "auto":
            return "propagate" if self.sam2 is not None else "per_frame"
        if mode == "per_frame" and self.sam is None:
            raise ValueError("per_frame mode needs a SAM model (models/sams/); only SAM 2 was given")
        if mode == "propagate" and self.sam2 is None:
            raise ValueError("propagate mode needs a SAM 2 model (models/sam2/); only SAM was given")
        return mode

    def run(
        self,
        frames,
        options: SubjectMaskOptions | None = None,
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
    ) -> SubjectMasks:
        opt = options or SubjectMaskOptions()
        opt.check()
        frames = as_uint8_frames(frames)
        mode = self.resolve_mode(opt.mode)
        if mode == "per_frame":
            result = self._per_frame(frames, opt, progress, cancel)
        else:
            result = self._propagate(frames, opt, progress, cancel)
        if opt.dilation:
            result.subject1 = dilate(result.subject1, opt.dilation)
            result.subject2 = dilate(result.subject2, opt.dilation)
        result.coverage = mask_coverage(result.subject1, result.subject2)
        prompts = (opt.prompt1.strip(), opt.prompt2.strip())
        result.notes += [c.describe(prompts[c.subject - 1]) for c in result.coverage if c.empty]
        check_coverage(result.coverage, opt, mode)
        return result

    def _detect(self, frames: np.ndarray, idx: list[int], opt: SubjectMaskOptions, rep: _Reporter,
                timings: dict[str, float]) -> list[FrameDetections]:
        prompts = _prompts(opt)
        dopt = opt.detector_options()
        out: list[FrameDetections] = []
        for s in range(0, len(idx), opt.max_frames_per_batch):
            chunk = idx[s : s + opt.max_frames_per_batch]
            t = time.perf_counter()
            out += self.detector.detect(frames[chunk], prompts, dopt, frame_indices=chunk)
            timings["detection"] = timings.get("detection", 0.0) + time.perf_counter() - t
            rep.step(len(chunk))
        return out

    def _per_frame(self, frames: np.ndarray, opt: SubjectMaskOptions, progress: Progress | None,
                   cancel: CancelCheck | None) -> SubjectMasks:
        n, h, w = frames.shape[:3]
        idx = list(range(0, n, opt.detection_stride))
        if idx[-1] != n - 1:
            idx.append(n - 1)  # detect the last frame too: interpolate to the end, never extrapolate
        rep = _Reporter(len(idx) + n, progress, cancel)
        rep.check()
        timings: dict[str, float] = {}
        dets = self._detect(frames, idx, opt, rep, timings)
        t = time.perf_counter()
        track = track_pair(dets, n, opt.order)
        timings["tracking"] = time.perf_counter() - t
        masks = np.zeros((n, 2, h, w), bool)
        timings.setdefault("embedding", 0.0)
        timings.setdefault("decoding", 0.0)
        for s in range(0, n, opt.max_frames_per_batch):
            t = time.perf_counter()
            emb, input_size = self.sam.embed(frames[s : s + opt.max_frames_per_batch])
            timings["embedding"] += time.perf_counter() - t
            t = time.perf_counter()
            for k in range(len(emb)):
                masks[s + k], _ = self.sam.decode(emb[k], track.boxes[s + k], input_size, (h, w))
            timings["decoding"] += time.perf_counter() - t
            rep.step(len(emb))
        return SubjectMasks(
            subject1=masks[:, 0], subject2=masks[:, 1], boxes=track.boxes.astype(np.float32),
            scores=track.scores.astype(np.float32), detected=track.detected, start_frame=track.start_frame,
            mode="per_frame", notes=list(track.notes), timings=timings,
        )

    def _find_start(self, frames: np.ndarray, opt: SubjectMaskOptions, rep: _Reporter,
                    timings: dict[str, float]) -> tuple[FrameDetections, list[int], list[FrameDetections]]:
        """First searched frame with two subjects, its chosen pair, and every frame searched."""
        n = len(frames)
        search = list(range(0, n, opt.detection_stride))
        seen: list[FrameDetections] = []
        for s in range(0, len(search), opt.max_frames_per_batch):
            for det in self._detect(frames, search[s : s + opt.max_frames_per_batch], opt, rep, timings):
                seen.append(det)
                pair = pick_initial_pair(det, opt.order)
                if pair is not None:
                    return det, pair, seen
        raise NotEnoughSubjectsError(describe_missing(seen))

    def _propagate(self, frames: np.ndarray, opt: SubjectMaskOptions, progress: Progress | None,
                   cancel: CancelCheck | None) -> SubjectMasks:
        n = len(frames)
        # Progress: up to ceil(n / stride) searched frames, then n propagated frames.
        rep = _Reporter(-(-n // opt.detection_stride) + n, progress, cancel)
        rep.check()
        timings: dict[str, float] = {}
        det, pair, seen = self._find_start(frames, opt, rep, timings)
        rep.total = rep.done + n
        boxes0 = det.boxes[pair]
        t = time.perf_counter()
        masks = self.sam2.propagate(frames, det.frame, boxes0, on_frame=lambda _i: rep.step())
        timings["propagation"] = time.perf_counter() - t
        boxes = np.stack([mask_boxes(masks[:, 0]), mask_boxes(masks[:, 1])], 1)
        scores = np.full((n, 2), np.nan)
        scores[det.frame] = det.scores[pair]
        detected = np.zeros((n, 2), bool)
        detected[det.frame] = True
        notes = []
        if len(det.boxes) > 2:
            notes.append(f"frame {det.frame}: {len(det.boxes) - 2} extra detection(s) ignored (third subject?)")
        return SubjectMasks(
            subject1=masks[:, 0], subject2=masks[:, 1], boxes=boxes.astype(np.float32),
            scores=scores.astype(np.float32), detected=detected, start_frame=det.frame,
            mode="propagate", notes=notes, timings=timings,
        )


# ---------------------------------------------------------------------------------------------
# Empty masks


def check_coverage(coverage: tuple[SubjectCoverage, ...], opt: SubjectMaskOptions, mode: str) -> None:
    """MaskExtractionError when a subject's mask is empty on more than opt.max_empty_share of the
    frames: which prompt, which frames, and what to try in this mode."""
    prompts = (opt.prompt1.strip(), opt.prompt2.strip())
    missing = [c for c in coverage if c.share > opt.max_empty_share]
    if not missing:
        return
    what = "; ".join(
        f"subject {c.subject} ({prompts[c.subject - 1]!r}) is missing on {len(c.empty)} of {c.frames} frames "
        f"({100 * c.share:.0f} %: frames {frame_ranges(c.empty)})" for c in missing
    )
    tries = [f"another prompt for subject {' and '.join(str(c.subject) for c in missing)} (a plainer word, "
             "e.g. 'person')", f"a lower box threshold (now {opt.box_threshold})"]
    if mode == "propagate":
        tries.append("per_frame mode (detection and SAM on every frame instead of SAM 2 propagation)")
    else:
        tries.append(f"a smaller detection stride (now {opt.detection_stride}) or propagate mode with a SAM 2 model")
    raise MaskExtractionError(f"{mode} mode: {what}. Try {', '.join(tries[:-1])}, or {tries[-1]}")
