"""Identity tracking over hand-made box sequences (no model involved)."""

from __future__ import annotations

import numpy as np
import pytest

from dreamrelation_core.masks.tracking import (
    FrameDetections,
    NotEnoughSubjectsError,
    box_iou,
    nms,
    order_pair,
    track_pair,
)


def _box(cx: float, cy: float = 50.0, w: float = 20.0, h: float = 40.0) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _dets(frame: int, boxes: list[list[float]], scores: list[float] | None = None, shuffle: int = 0) -> FrameDetections:
    boxes_a = np.asarray(boxes, float)
    scores_a = np.asarray(scores if scores is not None else [0.9 - 0.1 * i for i in range(len(boxes))])
    if shuffle:
        perm = np.random.default_rng(shuffle).permutation(len(boxes))
        boxes_a, scores_a = boxes_a[perm], scores_a[perm]
    return FrameDetections(frame, boxes_a, scores_a)


def test_box_iou_and_nms() -> None:
    a = np.array([_box(50), _box(60), _box(200)])
    iou = box_iou(a, a)
    assert np.allclose(np.diag(iou), 1.0)
    assert iou[0, 2] == 0.0
    # 10 px shift of a 20 px wide box: overlap 10*40 over union 30*40
    assert iou[0, 1] == pytest.approx(1 / 3)
    keep = nms(a, np.array([0.5, 0.9, 0.3]), iou_threshold=0.3)
    assert list(keep) == [1, 2]  # box 0 overlaps the better box 1 too much


def test_order_pair_left_and_largest() -> None:
    right_big = _box(150, w=60, h=80)
    left_small = _box(30)
    assert order_pair(np.array([right_big, left_small]), "left_first") == [1, 0]
    assert order_pair(np.array([right_big, left_small]), "largest_first") == [0, 1]
    with pytest.raises(ValueError, match="order must be one of"):
        order_pair(np.array([right_big, left_small]), "tallest")


def test_crossing_subjects_keep_identity() -> None:
    # A walks left->right, B right->left; they pass through each other around frame 10, where
    # the detector sees a single merged box. Detections come in shuffled order every frame.
    frames = 21
    dets = []
    for f in range(frames):
        a, b = _box(20 + 8 * f), _box(180 - 8 * f, w=22)
        boxes = [a] if f == 10 else [a, b]
        dets.append(_dets(f, boxes, shuffle=f + 1))
    tr = track_pair(dets, frames)
    # Subject 1 is the left one at frame 0 (A) and must still be A at the end, now on the right.
    assert tr.start_frame == 0
    assert np.allclose(tr.boxes[-1, 0], _box(20 + 8 * 20), atol=1e-6)
    assert np.allclose(tr.boxes[-1, 1], _box(180 - 8 * 20, w=22), atol=1e-6)
    assert tr.boxes[-1, 0, 0] > tr.boxes[-1, 1, 0]  # they swapped sides
    # At the merged frame one identity was detected, the other carried along its motion.
    assert tr.detected[10].sum() == 1
    missing = int(np.flatnonzero(~tr.detected[10])[0])
    assert np.isnan(tr.scores[10, missing])
    truth_10 = [_box(100), _box(100, w=22)][missing]
    assert np.abs(tr.boxes[10, missing] - truth_10).max() < 2.0


def test_dropped_detection_is_carried_by_velocity() -> None:
    frames = 8
    dets = []
    for f in range(frames):
        boxes = [_box(20 + 5 * f), _box(150, cy=60)]
        if f == 4:
            boxes = boxes[1:]  # subject 1 missed on frame 4
        dets.append(_dets(f, boxes, shuffle=f + 3))
    tr = track_pair(dets, frames)
    assert not tr.detected[4, 0] and tr.detected[4, 1]
    assert np.allclose(tr.boxes[4, 0], _box(40), atol=1e-6)  # predicted at constant velocity
    assert tr.detected[5].all()
    assert np.allclose(tr.boxes[7, 0], _box(55))


def test_third_person_is_ignored_with_a_note() -> None:
    frames = 6
    dets = []
    for f in range(frames):
        boxes = [_box(40 + f), _box(120 - f)]
        scores = [0.6, 0.5]
        if f == 3:  # a bystander with the best score of all walks in far away
            boxes.append(_box(300, cy=150, w=30, h=60))
            scores.append(0.95)
        dets.append(_dets(f, boxes, scores))
    tr = track_pair(dets, frames)
    assert np.allclose(tr.boxes[3, 0], _box(43))
    assert np.allclose(tr.boxes[3, 1], _box(117))
    assert tr.ignored[3] == 1
    assert any("frame 3" in n and "ignored" in n for n in tr.notes)


def test_third_person_before_start_does_not_pick_initial_pair_wrongly() -> None:
    # The two best-scoring boxes at the start frame set the identities; the weaker third is ignored.
    det = _dets(0, [_box(40), _box(300, w=5, h=5), _box(120)], [0.9, 0.2, 0.8])
    tr = track_pair([det], 1)
    assert np.allclose(tr.boxes[0], [_box(40), _box(120)])


def test_stride_carry_over_interpolates_between_detection_frames() -> None:
    frames = 13
    dets = [_dets(f, [_box(10 + 4 * f), _box(200 - 2 * f)], shuffle=f + 1) for f in range(0, frames, 6)]
    tr = track_pair(dets, frames)
    assert tr.detected[[0, 6, 12]].all() and not tr.detected[[1, 5, 7, 11]].any()
    for f in range(frames):
        assert np.allclose(tr.boxes[f, 0], _box(10 + 4 * f))
        assert np.allclose(tr.boxes[f, 1], _box(200 - 2 * f))


def test_late_start_tracks_backward_and_holds_ends() -> None:
    frames = 10
    # Frames 0 and 3 see one subject only; identities are set at frame 6 and traced back.
    dets = [
        _dets(0, [_box(100)]),
        _dets(3, [_box(106)]),
        _dets(6, [_box(112), _box(30)]),
        _dets(9, [_box(118), _box(30)]),
    ]
    tr = track_pair(dets, frames)
    assert tr.start_frame == 6
    # Subject 1 = left at frame 6 (the static one at x=30); subject 2 the mover.
    assert np.allclose(tr.boxes[6, 0], _box(30)) and np.allclose(tr.boxes[6, 1], _box(112))
    assert tr.detected[0, 1] and not tr.detected[0, 0]
    assert np.allclose(tr.boxes[0, 1], _box(100))
    assert np.allclose(tr.boxes[0, 0], _box(30))  # carried back unchanged (no velocity)


def test_different_prompts_use_labels() -> None:
    # subject 1 = label 0 (e.g. "bear"), even though it is on the right and scores lower.
    frames = 4
    dets = [
        FrameDetections(f, [_box(30 + f), _box(150 - f)], [0.9, 0.5], labels=[1, 0]) for f in range(frames)
    ]
    tr = track_pair(dets, frames)
    assert np.allclose(tr.boxes[:, 0, 0], [150 - f - 10 for f in range(frames)])


def test_no_two_subjects_names_frames_and_findings() -> None:
    dets = [_dets(0, []), _dets(6, [[10, 20, 30, 60]], [0.41])]
    with pytest.raises(NotEnoughSubjectsError) as e:
        track_pair(dets, 12)
    msg = str(e.value)
    assert "frame 0: no box" in msg
    assert "frame 6: 1 box: [10, 20, 30, 60] score 0.41" in msg


def test_detection_outside_clip_is_rejected() -> None:
    with pytest.raises(ValueError, match="frame 5 outside the clip's 3 frames"):
        track_pair([_dets(5, [_box(10), _box(50)])], 3)
