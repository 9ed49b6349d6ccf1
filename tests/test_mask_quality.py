"""Empty masks fail loudly (extraction, saving, dataset), and latent masks are marked from the
source-resolution crop so thin subjects keep their latent cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreamrelation_core.data import mask_files as mask_io
from dreamrelation_core.data.cache import Encoders, load_prepared, prepare_dataset
from dreamrelation_core.data.dataset import describe_dataset
from dreamrelation_core.data.latent_masks import frame_cells, latent_mask
from dreamrelation_core.data.synthetic import synthetic_clip, write_synthetic_dataset, write_video
from dreamrelation_core.data.video import _resize_mask, crop_masks, fit_clip
from dreamrelation_core.errors import DatasetError, MaskExtractionError
from dreamrelation_core.masks.extractor import SubjectMaskExtractor, SubjectMaskOptions, check_coverage
from dreamrelation_core.masks.grounding_dino import GroundingDino
from dreamrelation_core.masks.sam import Sam2Propagator, SamSegmenter
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_vae
from dreamrelation_core.mochi.tiny import tiny_tokenizer as tiny_t5_tokenizer
from fixtures.mask_models import tiny_gdino, tiny_sam, tiny_sam2, tiny_tokenizer, two_subject_clip

# ------------------------------------------------------------------ coverage and extraction


def _stack(frames: int, present: list[int], at: int = 2) -> np.ndarray:
    m = np.zeros((frames, 8, 8), bool)
    m[present, at : at + 3, 2:5] = True
    return m


def test_coverage_counts_empty_frames_and_names_them():
    c1, c2 = mask_io.mask_coverage(_stack(10, list(range(10))), _stack(10, [0, 1, 5]))
    assert c1.empty == () and c1.share == 0 and c1.describe("person") == "subject 1 ('person'): present on all 10 frames"
    assert c2.empty == (2, 3, 4, 6, 7, 8, 9) and c2.share == pytest.approx(0.7) and c2.mostly_empty
    assert c2.describe() == "subject 2: empty on 7 of 10 frames (70 %): 2-4, 6-9"
    assert mask_io.frame_ranges(list(range(0, 40, 2)), limit=3) == "0, 2, 4, ..."


def test_missing_on_most_frames_is_an_error_half_is_not():
    opt = SubjectMaskOptions(prompt1="person", prompt2="raccoon", box_threshold=0.3)
    half = mask_io.mask_coverage(_stack(10, list(range(10))), _stack(10, list(range(5))))
    check_coverage(half, opt, "propagate")  # 50 %: allowed
    most = mask_io.mask_coverage(_stack(10, list(range(10))), _stack(10, list(range(4))))
    with pytest.raises(MaskExtractionError) as e:
        check_coverage(most, opt, "propagate")
    msg = str(e.value)
    assert "subject 2 ('raccoon') is missing on 6 of 10 frames (60 %: frames 4-9)" in msg
    assert "another prompt for subject 2" in msg and "lower box threshold (now 0.3)" in msg and "per_frame mode" in msg
    with pytest.raises(MaskExtractionError, match="smaller detection stride .now 6. or propagate mode"):
        check_coverage(most, opt, "per_frame")
    check_coverage(most, SubjectMaskOptions(max_empty_share=1.0), "propagate")  # switched off


@pytest.fixture(scope="module")
def extractor() -> SubjectMaskExtractor:
    return SubjectMaskExtractor(GroundingDino(tiny_gdino(), tiny_tokenizer()), SamSegmenter(tiny_sam()),
                                Sam2Propagator(tiny_sam2()))


def _opt(**kw) -> SubjectMaskOptions:
    base = dict(box_threshold=0.0, text_threshold=0.0, detector_short_side=64, detector_max_side=128,
                max_frames_per_batch=4)
    return SubjectMaskOptions(**{**base, **kw})


def test_extractor_fails_loudly_on_empty_propagated_masks(extractor):
    """The tiny SAM 2 loses both subjects on every frame: the real pipeline must not hand that on."""
    clip = two_subject_clip(4)
    with pytest.raises(MaskExtractionError) as e:
        extractor.run(clip, _opt(mode="propagate", prompt1="person", prompt2="bear"))
    msg = str(e.value)
    assert msg.startswith("propagate mode: subject 1 ('person') is missing on 4 of 4 frames (100 %: frames 0-3); "
                          "subject 2 ('bear') is missing on 4 of 4 frames")
    assert "per_frame mode" in msg
    # per-frame SAM finds them on every frame: coverage reported, no error
    r = extractor.run(clip, _opt(mode="per_frame"))
    assert [c.share for c in r.coverage] == [0.0, 0.0]
    assert not any("empty on" in n for n in r.notes)


# ------------------------------------------------------------------ saving


def test_save_masks_refuses_all_empty_and_never_overwrites_good_with_empty(tmp_path: Path):
    good1, good2 = _stack(7, list(range(7))), _stack(7, list(range(7)), at=5)  # apart: PNGs keep both
    for target in (tmp_path / "clip.masks.npz", tmp_path / "clip"):  # compact file, reference folder
        with pytest.raises(MaskExtractionError, match=r"not saved: subject 2's mask is empty on all 7 frames"):
            mask_io.save_masks(target, good1, np.zeros_like(good2))
        assert not target.exists()
        assert mask_io.save_masks(target, good1, good2) == target
        with pytest.raises(FileExistsError, match="overwrite"):
            mask_io.save_masks(target, good1, good2)
        poor = _stack(7, [0, 1], at=5)  # subject 2 on 2 of 7 frames
        with pytest.raises(MaskExtractionError) as e:
            mask_io.save_masks(target, good1, poor, overwrite=True)
        assert "not overwritten" in str(e.value) and "subject 2 on 5 of 7 frames (2-6), the saved ones on 0 of 7" in str(e.value)
        m1, m2 = mask_io.load_masks(target)
        assert np.array_equal(m2, good2)  # the good masks are still there
        better = good2.copy()
        better[:, 0, 6] = True
        mask_io.save_masks(target, good1, better, overwrite=True)  # as good or better: replaced
        assert np.array_equal(mask_io.load_masks(target)[1], better)
    # mostly-empty masks may be saved where nothing good is replaced (the dataset check refuses them)
    mask_io.save_masks(tmp_path / "new.masks.npz", good1, _stack(7, [3]))


# ------------------------------------------------------------------ dataset


def test_dataset_refuses_a_clip_whose_subject_is_missing_on_most_frames(tmp_path: Path):
    d = write_synthetic_dataset(tmp_path / "data", num_videos=2, num_frames=13, size=(32, 32))
    describe_dataset(d, 13, (32, 32))  # fine as written
    m1, m2 = mask_io.load_masks(d / "clip1.masks.npz")
    m2[:7] = False  # subject 2 gone on frames 0-6 of the 13 trained on
    mask_io.save_compact_masks(d / "clip1.masks.npz", m1, m2)
    with pytest.raises(DatasetError) as e:
        describe_dataset(d, 13, (32, 32))
    msg = str(e.value)
    assert "clip1.masks.npz (clip1): subject 2 is empty on 7 of the 13 frames used for training (54 %: frames 0-6)" in msg
    assert "clip0" not in msg
    with pytest.raises(DatasetError, match="7 of the 7 frames"):
        describe_dataset(d, 7, (32, 32))


# ------------------------------------------------------------------ latent masks from the source crop


def _thin_subject(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """A stick figure of 1-2 pixel lines (limbs, an arm reaching out), moving a little per frame."""
    rng = np.random.default_rng(seed)
    m = np.zeros((frames, h, w), bool)
    for f in range(frames):
        x0, y0 = 300 + 37 * seed + 3 * f, 200 + 5 * f
        m[f, y0 : y0 + 600, x0 : x0 + 2] = True  # body, 2 px
        for k in range(6):  # limbs: 1 px diagonal lines
            ang = rng.uniform(0, np.pi)
            length = rng.integers(150, 400)
            t = np.arange(length)
            ys = np.clip((y0 + 150 + k * 60 + t * np.sin(ang)).astype(int), 0, h - 1)
            xs = np.clip((x0 + t * np.cos(ang) * (1 if k % 2 else -1)).astype(int), 0, w - 1)
            m[f, ys, xs] = True
    return m


def test_latent_masks_from_the_source_crop_keep_thin_subjects_1080p():
    F, H, W, size = 13, 1080, 1920, (480, 848)
    grid = (60, 106)
    for seed in (0, 1):
        mask = _thin_subject(F, H, W, seed)
        cropped, _ = crop_masks((mask, mask), F, size)
        old = latent_mask(_resize_mask(cropped, size))  # the old path: resized to 480x848 (as fit_clip), then marked
        assert cropped.shape == (F, 1080, 1908)  # the frames' centre crop (6 columns each side), no resize
        new = latent_mask(cropped, grid)
        assert new.shape == old.shape == (3, 60, 106)
        # every positive source pixel marks the cell at its scaled position, per frame
        for f in (0, 5):
            ys, xs = np.nonzero(cropped[f])
            cells = np.zeros(grid, bool)
            cells[ys * grid[0] // 1080, xs * grid[1] // 1908] = True
            assert np.array_equal(frame_cells(cropped[f : f + 1], grid)[0], cells | cropped[f][
                np.arange(60) * 1080 // 60][:, np.arange(106) * 1908 // 106])
        assert torch.all(new >= old)  # keeps every cell the old path had (here: exactly nested grids)
        lost = int(((new > 0) & (old == 0)).sum())
        assert lost > 0.05 * int((new > 0).sum()), lost  # thin limbs: the old path loses many cells


def test_prepare_marks_latent_masks_from_the_source_crop(tmp_path: Path):
    """36x64 video trained at 32x32: crop 36x36, resize 36 -> 32 drops 4 columns; a 1-pixel line
    on a dropped column keeps its latent cells only when marked from the source crop."""
    F = 7
    frames, m1, m2 = synthetic_clip(F, (36, 64), seed=0)
    cropped_cols = np.arange(14, 50)  # crop: columns 14..49
    idx = np.floor((np.arange(32) + 0.5) * 36 / 32).astype(int)  # nearest-exact samples of 36 -> 32
    dropped = sorted(set(range(36)) - set(idx.tolist()))
    line = cropped_cols[dropped[1]]
    m1 = np.zeros_like(m1)
    m1[:, 4:30, line] = True  # subject 1: a one-pixel vertical line
    d = tmp_path / "data"
    write_video(d / "clip0", frames, "png")
    (d / "clip0.txt").write_text("A red square is touching a blue circle.\n")
    mask_io.save_compact_masks(d / "clip0.masks.npz", m1, m2)
    prepare_dataset(d, tmp_path / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_t5_tokenizer(16)), F, (32, 32),
                    max_text_len=16)
    clip = load_prepared(tmp_path / "cache")[0]
    c1, c2 = crop_masks((m1, m2), F, (32, 32))
    torch.testing.assert_close(clip.mask1, latent_mask(c1, (4, 4)))
    torch.testing.assert_close(clip.mask2, latent_mask(c2, (4, 4)))
    _, (r1, _) = fit_clip(frames, (m1, m2), F, (32, 32))
    assert not r1.any() and latent_mask(r1).sum() == 0  # resized first, the line is gone
    assert clip.mask1.sum() > 0  # marked from the source crop, it is there
