"""Latent-mask arithmetic on hand-made masks, frame-count rule, synthetic clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamrelation_core.data.latent_masks import frame_cells, latent_mask, relation_mask
from dreamrelation_core.data.synthetic import synthetic_clip
from dreamrelation_core.mochi.latents import check_frame_count, latent_frame_count


def test_61_frames_give_11_latent_frames_with_hand_values():
    m = np.zeros((61, 16, 24), bool)  # latent grid 2 x 3
    m[0, 0:8, 0:8] = True  # frame 0 alone -> latent 0, cell (0, 0)
    m[1:4, 0:8, 0:8] = True  # 3 of frames 1..6 -> latent 1, cell (0, 0) = 0.5
    m[7:13, 8:16, 16:24] = True  # all of frames 7..12 -> latent 2, cell (1, 2) = 1
    m[60, 9, 9] = True  # last frame of group 55..60 -> latent 10, cell (1, 1) = 1/6
    lat = latent_mask(m)
    assert lat.dtype == torch.float32
    assert tuple(lat.shape) == (11, 2, 3) and latent_frame_count(61) == 11
    expected = torch.zeros(11, 2, 3)
    expected[0, 0, 0] = 1.0
    expected[1, 0, 0] = 0.5
    expected[2, 1, 2] = 1.0
    expected[10, 1, 1] = 1.0 / 6.0
    torch.testing.assert_close(lat, expected)


def test_frame_zero_is_not_averaged_into_the_first_group():
    m = np.zeros((7, 8, 8), bool)
    m[0] = True
    lat = latent_mask(m)
    assert lat[0, 0, 0] == 1.0 and lat[1, 0, 0] == 0.0


def test_one_pixel_wide_subject_survives_where_nearest_alone_loses_it():
    m = np.zeros((13, 32, 32), bool)
    m[:, :, 13] = True  # a one-pixel vertical line, never on a nearest sample column (0, 8, 16, 24)
    m[5, 7, 30] = True  # a single pixel in one frame
    nearest_only = torch.nn.functional.interpolate(torch.from_numpy(m).float()[None], size=(4, 4), mode="nearest")
    assert nearest_only.sum() == 0  # the reason the re-marking exists
    lat = latent_mask(m)
    assert torch.all(lat[:, :, 1] == 1.0)  # every row of the line's cell column
    assert lat[:, :, 0].sum() == 0 and lat[:, :, 2].sum() == 0
    assert lat[1, 0, 3] == pytest.approx(1 / 6)  # frame 5 is in group 1..6


def test_float_masks_match_bool_masks_and_relation_mask_sums():
    m1 = np.zeros((7, 16, 16), bool)
    m2 = np.zeros((7, 16, 16), bool)
    m1[:, 0:9, 0:4] = True  # rows 0..8 reach into cell row 1
    m2[:, 8:16, 0:16] = True  # overlaps m1 in cell (1, 0)
    torch.testing.assert_close(latent_mask(m1.astype(np.float32)), latent_mask(torch.from_numpy(m1)))
    rel = relation_mask(latent_mask(m1), latent_mask(m2))
    assert rel[0, 1, 0] == 2.0 and rel[0, 0, 0] == 1.0 and rel[0, 1, 1] == 1.0 and rel[0, 0, 1] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        relation_mask(torch.zeros(2, 2, 2), torch.zeros(2, 2, 3))


def test_cells_on_a_grid_that_is_not_a_multiple():
    # 10 rows -> 3 cells: rows 0-3 -> 0, 4-6 -> 1, 7-9 -> 2 by scaled position; nearest samples
    # rows 0, 3, 6. Row 3 is owned by cell 0 but is also cell 1's nearest sample.
    m = np.zeros((1, 10, 10), bool)
    m[0, 3, 0] = True
    cells = frame_cells(m, (3, 3))
    assert cells[0, :, 0].tolist() == [True, True, False]
    assert cells[0, :, 1:].sum() == 0


@pytest.mark.parametrize("bad, lo, hi", [(60, 55, 61), (62, 61, 67), (64, 61, 67), (1, 7, 13), (3, 7, 13)])
def test_wrong_frame_count_names_nearest_valid_lengths(bad, lo, hi):
    with pytest.raises(ValueError, match=rf"{bad} frames.*nearest valid lengths are {lo} and {hi}"):
        check_frame_count(bad)
    with pytest.raises(ValueError, match=f"{lo} and {hi}"):
        latent_mask(np.zeros((bad, 8, 8), bool))


@pytest.mark.parametrize("good", [7, 13, 25, 61, 85])
def test_valid_frame_counts(good):
    check_frame_count(good)
    assert latent_frame_count(good) == 1 + (good - 1) // 6


def test_bad_mask_shapes():
    with pytest.raises(ValueError, match=r"12x16.*multiples of 8"):
        latent_mask(np.zeros((7, 12, 16), bool))
    with pytest.raises(ValueError, match=r"\[F, H, W\]"):
        latent_mask(np.zeros((7, 16), bool))


def test_synthetic_clip_masks_are_exact_and_shapes_touch():
    frames, m1, m2 = synthetic_clip(25, (64, 64), seed=1)
    assert frames.shape == (25, 64, 64, 3) and frames.dtype == np.uint8
    assert m1.shape == m2.shape == (25, 64, 64) and m1.dtype == bool
    assert not (m1 & m2).any()
    # masks are exactly the pixels drawn in each colour
    c1 = np.all(frames == frames[m1][0], axis=-1)
    c2 = np.all(frames == frames[m2][0], axis=-1)
    assert np.array_equal(c1, m1) and np.array_equal(c2, m2)
    # apart at the start, horizontally adjacent at the end
    adjacent = lambda f: bool((m1[f][:, :-1] & m2[f][:, 1:]).any())  # noqa: E731
    assert not adjacent(0) and adjacent(24)
    gap = [int(np.nonzero(m2[f].any(0))[0].min() - np.nonzero(m1[f].any(0))[0].max()) for f in range(25)]
    assert gap == sorted(gap, reverse=True) and gap[-1] == 1  # approaching monotonically, then touching
    # deterministic per seed, different across seeds
    assert np.array_equal(synthetic_clip(25, (64, 64), seed=1)[0], frames)
    assert not np.array_equal(synthetic_clip(25, (64, 64), seed=2)[1], m1)
