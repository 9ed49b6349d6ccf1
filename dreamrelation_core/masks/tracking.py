"""Keep two subjects' identities over per-frame detection boxes.

A detector answers each frame on its own: its boxes come in score order, not identity order, a
subject can be missed for a frame, a third person can appear, and two subjects that cross swap
sides. This module turns those per-frame answers into two box tracks, subject 1 and subject 2.

Matching uses only geometry (no appearance model): each identity's box is predicted with a
constant-velocity model, and detections are matched to predictions by overlap, centre distance
and size change; the pair assignment with the lowest total cost wins. The velocity is what keeps
crossing subjects apart: at the crossing frame both boxes overlap both predictions, but each
prediction has already moved on along its own direction.

Boxes are [x0, y0, x1, y1] in pixels, float. Frames without detection (detection stride > 1)
get boxes interpolated between the neighbouring detection frames ("carry-over").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from ..errors import NotEnoughSubjectsError

ORDERS = ("left_first", "largest_first")


@dataclass
class FrameDetections:
    """The detector's answer for one frame, after thresholds and NMS."""

    frame: int
    boxes: np.ndarray  # [K, 4] float xyxy, pixels
    scores: np.ndarray  # [K]
    labels: np.ndarray | None = None  # [K] prompt index per box (0 or 1); None = one shared prompt

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float64).reshape(-1)
        if len(self.scores) != len(self.boxes):
            raise ValueError(f"frame {self.frame}: {len(self.boxes)} boxes but {len(self.scores)} scores")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, np.int64).reshape(-1)

    def describe(self, limit: int = 4) -> str:
        """'2 boxes: [x0,y0,x1,y1] score 0.41, ...' for error messages."""
        if len(self.boxes) == 0:
            return "no box"
        order = np.argsort(-self.scores)[:limit]
        parts = [f"[{', '.join(f'{v:.0f}' for v in self.boxes[i])}] score {self.scores[i]:.2f}" for i in order]
        more = f" and {len(self.boxes) - limit} more" if len(self.boxes) > limit else ""
        n = len(self.boxes)
        return f"{n} box{'es' if n != 1 else ''}: " + "; ".join(parts) + more


@dataclass
class PairTrack:
    """Two box tracks over all frames of a clip."""

    boxes: np.ndarray  # [F, 2, 4] float; every frame filled (detected, carried or interpolated)
    scores: np.ndarray  # [F, 2] detection score where detected this frame, NaN otherwise
    detected: np.ndarray  # [F, 2] bool
    start_frame: int  # the frame whose detections set the identities
    ignored: dict[int, int] = field(default_factory=dict)  # frame -> detections not used (3rd person...)
    notes: list[str] = field(default_factory=list)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [N,4] with every box in b [M,4] -> [N, M]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Indices of boxes kept by greedy non-maximum suppression, best score first."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = list(np.argsort(-np.asarray(scores, np.float64)))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            ious = box_iou(boxes[i : i + 1], boxes[order])[0]
            order = [j for j, v in zip(order, ious) if v <= iou_threshold]
    return np.asarray(keep, np.int64)


def _centre(box: np.ndarray) -> np.ndarray:
    return (box[..., :2] + box[..., 2:]) / 2


def _size(box: np.ndarray) -> np.ndarray:
    return np.clip(box[..., 2:] - box[..., :2], 1e-3, None)


def order_pair(boxes: np.ndarray, order: str = "left_first") -> list[int]:
    """Which of two boxes is subject 1: the left one (smaller centre x) or the larger one."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    boxes = np.asarray(boxes, np.float64).reshape(2, 4)
    if order == "left_first":
        key = _centre(boxes)[:, 0]
    else:
        key = -_size(boxes).prod(-1)
    return [int(i) for i in np.argsort(key, kind="stable")]


def pick_initial_pair(det: FrameDetections, order: str = "left_first") -> list[int] | None:
    """Indices (subject 1, subject 2) into det's boxes, or None when the frame has too few.

    One shared prompt: the two best-scoring boxes, ordered by `order`. One prompt per subject
    (labels given): the best box of label 0 is subject 1, the best other box of label 1 subject 2.
    """
    if len(det.boxes) < 2:
        return None
    by_score = [int(i) for i in np.argsort(-det.scores, kind="stable")]
    if det.labels is None:
        top = by_score[:2]
        return [top[i] for i in order_pair(det.boxes[top], order)]
    first = next((i for i in by_score if det.labels[i] == 0), None)
    second = next((i for i in by_score if det.labels[i] == 1 and i != first), None)
    if first is None or second is None:
        return None
    return [first, second]


class _Identity:
    """One subject's last box and velocity (pixels per frame, of the box corners)."""

    def __init__(self, box: np.ndarray, frame: int) -> None:
        self.box = box.astype(np.float64)
        self.frame = frame
        self.velocity = np.zeros(4)
        self.has_velocity = False

    def predict(self, frame: int) -> np.ndarray:
        return self.box + self.velocity * (frame - self.frame)

    def observe(self, box: np.ndarray, frame: int, smoothing: float = 0.5) -> None:
        dt = frame - self.frame
        if dt != 0:
            v = (box - self.box) / dt
            # Smoothed so one jittery detection does not fling the prediction away; the first
            # measured velocity is taken as is (the zero it starts from is no measurement).
            self.velocity = smoothing * v + (1 - smoothing) * self.velocity if self.has_velocity else v
            self.has_velocity = True
        self.box = box.astype(np.float64)
        self.frame = frame

    def coast(self, frame: int) -> None:
        """Missed detection: move along the prediction, keep the velocity."""
        self.box = self.predict(frame)
        self.frame = frame


@dataclass
class TrackerOptions:
    distance_weight: float = 1.0  # centre distance, in units of the predicted box's diagonal
    size_weight: float = 0.5  # |log size ratio|
    label_penalty: float = 2.0  # detection of the other subject's prompt
    gate: float = 2.5  # a match costing more is no match (missed detection)


def _match_cost(pred: np.ndarray, boxes: np.ndarray, labels: np.ndarray | None, ident: int, opt: TrackerOptions) -> np.ndarray:
    """Cost of matching one predicted box with each detection -> [K]."""
    iou = box_iou(pred[None], boxes)[0]
    diag = float(np.linalg.norm(_size(pred)))
    dist = np.linalg.norm(_centre(boxes) - _centre(pred), axis=-1) / max(diag, 1e-6)
    size = np.abs(np.log(_size(boxes) / _size(pred))).sum(-1)
    cost = (1 - iou) + opt.distance_weight * dist + opt.size_weight * size
    if labels is not None:
        cost = cost + opt.label_penalty * (labels != ident)
    return cost


def assign(preds: np.ndarray, det: FrameDetections, opt: TrackerOptions) -> list[int | None]:
    """Best detection index for each of the two predictions (or None), no detection used twice."""
    k = len(det.boxes)
    if k == 0:
        return [None, None]
    costs = np.stack([_match_cost(preds[i], det.boxes, det.labels, i, opt) for i in range(2)])
    choices = list(range(k)) + [None]
    best, best_cost = [None, None], float("inf")
    # K is small (a handful of boxes after NMS): trying every pair is exact and cheap.
    for a, b in itertools.product(choices, choices):
        if a is not None and a == b:
            continue
        total = 0.0
        for ident, j in enumerate((a, b)):
            if j is None:
                total += opt.gate  # a miss costs what the worst acceptable match would
            elif costs[ident, j] > opt.gate:
                total = float("inf")
                break
            else:
                total += costs[ident, j]
        if total < best_cost:
            best, best_cost = [a, b], total
    return best


def _run(dets: list[FrameDetections], first: list[int], opt: TrackerOptions, out: PairTrack) -> None:
    """Track through `dets` (already in visiting order; dets[0] is the start frame)."""
    d0 = dets[0]
    ids = [_Identity(d0.boxes[first[i]], d0.frame) for i in range(2)]
    for i in range(2):
        out.boxes[d0.frame, i] = d0.boxes[first[i]]
        out.scores[d0.frame, i] = d0.scores[first[i]]
        out.detected[d0.frame, i] = True
    out.ignored[d0.frame] = len(d0.boxes) - 2
    for det in dets[1:]:
        preds = np.stack([ids[i].predict(det.frame) for i in range(2)])
        match = assign(preds, det, opt)
        for i, j in enumerate(match):
            if j is None:
                ids[i].coast(det.frame)
            else:
                ids[i].observe(det.boxes[j], det.frame)
                out.scores[det.frame, i] = det.scores[j]
                out.detected[det.frame, i] = True
            out.boxes[det.frame, i] = ids[i].box
        out.ignored[det.frame] = len(det.boxes) - sum(j is not None for j in match)


def _interpolate(boxes: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill frames where `known` is False: linear between known frames, held at the ends."""
    frames = np.flatnonzero(known)
    out = boxes.copy()
    all_f = np.arange(len(boxes))
    for s in range(2):
        for c in range(4):
            out[:, s, c] = np.interp(all_f, frames, boxes[frames, s, c])
    return out


def track_pair(
    detections: list[FrameDetections],
    num_frames: int,
    order: str = "left_first",
    options: TrackerOptions | None = None,
) -> PairTrack:
    """Two identity tracks over `num_frames` frames from detections on some of them.

    The identities are set at the first detection frame with two subjects (see
    `pick_initial_pair`); tracking runs forward from there and backward to frame 0. Frames
    without detections get interpolated boxes. Raises NotEnoughSubjectsError, listing what each
    detection frame held, when no frame has two subjects.
    """
    opt = options or TrackerOptions()
    dets = sorted(detections, key=lambda d: d.frame)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    for d in dets:
        if not 0 <= d.frame < num_frames:
            raise ValueError(f"detection for frame {d.frame} outside the clip's {num_frames} frames")
    start = None
    for idx, d in enumerate(dets):
        first = pick_initial_pair(d, order)
        if first is not None:
            start = idx
            break
    if start is None:
        raise NotEnoughSubjectsError(describe_missing(dets))
    out = PairTrack(
        boxes=np.full((num_frames, 2, 4), np.nan),
        scores=np.full((num_frames, 2), np.nan),
        detected=np.zeros((num_frames, 2), bool),
        start_frame=dets[start].frame,
    )
    _run(dets[start:], first, opt, out)
    if start > 0:
        _run(dets[start::-1], first, opt, out)
    known = ~np.isnan(out.boxes[:, 0, 0])
    out.boxes = _interpolate(out.boxes, known)
    for f, n in sorted(out.ignored.items()):
        if n > 0:
            out.notes.append(f"frame {f}: {n} extra detection{'s' if n > 1 else ''} ignored (third subject?)")
    return out


def describe_missing(dets: list[FrameDetections], limit: int = 6) -> str:
    """Error text: which frames were searched and what each held."""
    if not dets:
        return "no frame was searched for subjects (empty clip?)"
    lines = [f"frame {d.frame}: {d.describe()}" for d in dets[:limit]]
    more = f"\n  ... and {len(dets) - limit} more frames" if len(dets) > limit else ""
    return (
        f"two subjects were not found together in any of the {len(dets)} frame(s) searched; "
        "lower the box threshold or change the prompts. Found:\n  " + "\n  ".join(lines) + more
    )
