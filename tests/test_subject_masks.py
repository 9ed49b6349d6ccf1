"""The mask pipeline end to end with tiny random models, plus its input checks and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreamrelation_core.data import mask_files as mask_io
from dreamrelation_core.masks.extractor import (
    Cancelled,
    SubjectMaskExtractor,
    SubjectMaskOptions,
    as_uint8_frames,
    dilate,
    mask_boxes,
)
from dreamrelation_core.masks.grounding_dino import GroundingDino
from dreamrelation_core.masks.preview import preview
from dreamrelation_core.masks.sam import Sam2Propagator, SamSegmenter
from dreamrelation_core.masks.tracking import NotEnoughSubjectsError, pick_initial_pair
from fixtures.mask_models import (
    tiny_gdino,
    tiny_sam,
    tiny_sam2,
    tiny_tokenizer,
    two_subject_clip,
    write_hf_gdino,
    write_sam,
)


@pytest.fixture(scope="module")
def extractor() -> SubjectMaskExtractor:
    return SubjectMaskExtractor(GroundingDino(tiny_gdino(), tiny_tokenizer()), SamSegmenter(tiny_sam()),
                                Sam2Propagator(tiny_sam2()))


def _opt(**kw) -> SubjectMaskOptions:
    base = dict(box_threshold=0.0, text_threshold=0.0, detector_short_side=64, detector_max_side=128,
                max_frames_per_batch=4)
    return SubjectMaskOptions(**{**base, **kw})


def test_per_frame_stride_tracks_boxes_into_sam(extractor: SubjectMaskExtractor) -> None:
    clip = two_subject_clip(7)
    calls = []
    r = extractor.run(clip, _opt(mode="per_frame", detection_stride=3), progress=lambda d, t: calls.append((d, t)))
    assert r.mode == "per_frame"
    for m in (r.subject1, r.subject2, r.relation):
        assert m.shape == (7, 64, 96) and m.dtype == bool
    assert np.array_equal(r.relation, r.subject1 | r.subject2)
    assert r.boxes.shape == (7, 2, 4) and np.isfinite(r.boxes).all()
    assert np.array_equal(np.flatnonzero(r.detected.any(1)), [0, 3, 6])
    # Frame 0's boxes are the detector's two best boxes there, subject 1 the left one.
    d0 = extractor.detector.detect(clip[:1], ["person"], _opt().detector_options())[0]
    pair = pick_initial_pair(d0, "left_first")
    assert np.allclose(r.boxes[0], d0.boxes[pair], atol=1e-4)
    assert r.boxes[0, 0, 0] + r.boxes[0, 0, 2] <= r.boxes[0, 1, 0] + r.boxes[0, 1, 2]
    # Each frame's masks are SAM's answer for that frame's two boxes.
    emb, size = extractor.sam.embed(clip[4:5])
    want, _ = extractor.sam.decode(emb[0], r.boxes[4], size, (64, 96))
    assert np.array_equal(want[0], r.subject1[4]) and np.array_equal(want[1], r.subject2[4])
    assert calls[-1] == (3 + 7, 3 + 7) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert {"detection", "embedding", "decoding", "tracking"} <= set(r.timings)


def test_propagate_covers_every_frame(extractor: SubjectMaskExtractor) -> None:
    clip = two_subject_clip(5)
    calls = []
    # auto -> propagate. The tiny SAM 2 loses both subjects (test_mask_quality: that is an error by
    # default); the check is switched off here to test the propagation mechanics.
    r = extractor.run(clip, _opt(max_empty_share=1.0), progress=lambda d, t: calls.append((d, t)))
    assert r.mode == "propagate" and r.start_frame == 0
    assert r.subject1.shape == (5, 64, 96) and r.subject1.dtype == bool
    assert r.detected[0].all() and not r.detected[1:].any()
    assert calls[-1][0] == calls[-1][1] == 1 + 5
    assert "propagation" in r.timings
    assert [len(c.empty) for c in r.coverage] == [5, 5] and "subject 2 ('person'): empty on 5 of 5 frames" in r.notes[-1]


def test_too_few_subjects_says_which_frame_and_what(extractor: SubjectMaskExtractor) -> None:
    clip = two_subject_clip(4)
    for mode in ("per_frame", "propagate"):
        with pytest.raises(NotEnoughSubjectsError) as e:
            extractor.run(clip, _opt(mode=mode, box_threshold=1.0, detection_stride=2))
        assert "frame 0: no box" in str(e.value) and "frame 2: no box" in str(e.value)


def test_cancel_stops_the_run(extractor: SubjectMaskExtractor) -> None:
    seen = []

    def cancel() -> bool:
        seen.append(1)
        return len(seen) > 1

    with pytest.raises(Cancelled):
        extractor.run(two_subject_clip(6), _opt(mode="per_frame", detection_stride=1, max_frames_per_batch=2),
                      cancel=cancel)
    assert len(seen) == 2


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="empty frame batch"):
        as_uint8_frames(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\] \(RGB\), got shape \(2, 8, 8, 4\)"):
        as_uint8_frames(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="got dtype int32"):
        as_uint8_frames(np.zeros((2, 8, 8, 3), np.int32))
    f = torch.rand(2, 8, 8, 3)
    assert np.array_equal(as_uint8_frames(f), (f.numpy() * 255 + 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="mode must be one of"):
        _opt(mode="fast").check()
    sam_only = SubjectMaskExtractor(GroundingDino(tiny_gdino(), tiny_tokenizer()), sam=SamSegmenter(tiny_sam()))
    with pytest.raises(ValueError, match="propagate mode needs a SAM 2 model"):
        sam_only.run(two_subject_clip(2), _opt(mode="propagate"))


def test_dilate_and_mask_boxes() -> None:
    m = np.zeros((2, 9, 9), bool)
    m[0, 4, 4] = True
    d = dilate(m, 1)
    assert d[0].sum() == 9 and d[0, 3:6, 3:6].all() and not d[1].any()
    b = mask_boxes(d)
    assert np.array_equal(b[0], [3, 3, 6, 6]) and np.isnan(b[1]).all()


def test_preview_tints_masks(extractor: SubjectMaskExtractor) -> None:
    clip = two_subject_clip(3)
    r = extractor.run(clip, _opt(mode="per_frame", detection_stride=2))
    p = preview(clip, r)
    assert p.shape == clip.shape and p.dtype == np.uint8
    only1 = r.subject1 & ~r.subject2
    assert only1.any() and not np.array_equal(p[only1], clip[only1])


def test_cli_writes_masks_the_dataset_reader_finds(tmp_path: Path) -> None:
    from PIL import Image

    from dreamrelation_core.cli import main

    data = tmp_path / "data"
    video = data / "clip_a"
    video.mkdir(parents=True)
    for i, frame in enumerate(two_subject_clip(4)):
        Image.fromarray(frame).save(video / f"frame{i}.png")
    gd = write_hf_gdino(tmp_path / "models" / "grounding-dino" / "tiny")
    sam = write_sam(tmp_path / "models" / "sams" / "sam_vit_b_01ec64.pth")
    args = ["masks", str(data), "--grounding-dino", str(gd), "--sam", str(sam), "--box-threshold", "0",
            "--text-threshold", "0", "--stride", "2", "--device", "cpu"]
    assert main(args) == 0
    found = mask_io.find_masks(video)
    assert found == data / "clip_a.masks.npz"
    m1, m2 = mask_io.load_masks(found)
    assert m1.shape == (4, 64, 96) and m2.shape == (4, 64, 96)
    assert main(args + ["--png"]) == 0  # reference layout goes inside a frame-folder video
    r1, r2 = mask_io.load_masks(video / "masks")
    assert r1.shape == (4, 64, 96)
