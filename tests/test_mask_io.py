"""Mask file layouts: reference colour PNGs and the compact npz, round trips and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamrelation_core.data import mask_files as mask_io


def _masks(frames: int = 12, overlap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    m1 = rng.random((frames, 10, 14)) > 0.6
    m2 = rng.random((frames, 10, 14)) > 0.6
    if not overlap:
        m2 &= ~m1
    return m1, m2


def test_png_round_trip_is_exact_and_sorted_numerically(tmp_path: Path) -> None:
    m1, m2 = _masks(12)
    folder = mask_io.save_reference_masks(tmp_path / "clip", m1, m2)
    names = [p.name for p in mask_io.frame_files(folder)]
    assert names[9:11] == ["frame9.png", "frame10.png"]  # not string order
    r1, r2 = mask_io.load_reference_masks(folder)
    assert np.array_equal(r1, m1) and np.array_equal(r2, m2)
    rgb = np.asarray(Image.open(folder / "frame0.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (10, 14, 3)
    assert tuple(rgb[m1[0]][0]) == mask_io.SUBJECT_COLOURS[0]


def test_png_overlap_goes_to_subject1_compact_keeps_it(tmp_path: Path) -> None:
    m1, m2 = _masks(3, overlap=True)
    assert (m1 & m2).any()
    r1, r2 = mask_io.load_masks(mask_io.save_reference_masks(tmp_path / "ref", m1, m2))
    assert np.array_equal(r1, m1) and np.array_equal(r2, m2 & ~m1)
    c1, c2 = mask_io.load_masks(mask_io.save_compact_masks(tmp_path / "c.masks.npz", m1, m2))
    assert np.array_equal(c1, m1) and np.array_equal(c2, m2)


def test_find_masks_prefers_compact(tmp_path: Path) -> None:
    (tmp_path / "v.mp4").write_bytes(b"")
    assert mask_io.find_masks(tmp_path / "v.mp4") is None
    m1, m2 = _masks(2)
    mask_io.save_reference_masks(tmp_path / "v", m1, m2)
    assert mask_io.find_masks(tmp_path / "v.mp4") == tmp_path / "v"
    mask_io.save_compact_masks(tmp_path / "v.masks.npz", m1, m2)
    assert mask_io.find_masks(tmp_path / "v.mp4") == tmp_path / "v.masks.npz"


def test_bad_mask_files_are_explained(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (255, 255, 255)
    Image.fromarray(rgb).save(folder / "frame0.png")
    with pytest.raises(mask_io.MaskFormatError, match=r"colours other than black.*\(255, 255, 255\)"):
        mask_io.load_reference_masks(folder)
    np.savez(tmp_path / "x.masks.npz", subject1=np.zeros((2, 3, 3), bool))
    with pytest.raises(mask_io.MaskFormatError, match=r"missing array\(s\) \['subject2'\]"):
        mask_io.load_compact_masks(tmp_path / "x.masks.npz")
    with pytest.raises(mask_io.MaskFormatError, match="same shape"):
        mask_io.save_compact_masks(tmp_path / "y.masks.npz", np.zeros((2, 3, 3)), np.zeros((3, 3, 3)))


def test_one_mask_rule_thresholds_numbers_at_half_and_refuses_the_rest(tmp_path: Path) -> None:
    from dreamrelation_core.data.latent_masks import latent_mask
    from dreamrelation_core.errors import MaskFormatError

    m1, m2 = _masks(7)
    f1 = np.where(m1, 0.9, 0.4).astype(np.float32)  # 0.4 is background: > 0.5 is the subject
    path = tmp_path / "soft.masks.npz"
    np.savez(path, subject1=f1, subject2=m2.astype(np.uint8))
    r1, r2 = mask_io.load_compact_masks(path)
    assert r1.dtype == bool and np.array_equal(r1, m1) and np.array_equal(r2, m2)
    assert np.array_equal(latent_mask(f1, (2, 2)).numpy(), latent_mask(m1, (2, 2)).numpy())  # same rule on the grid
    for bad, shown in ((np.nan, "nan"), (np.inf, "inf"), (-0.2, "-0.2"), (1.5, "1.5"), (255, "255")):
        arr = f1.copy() if not isinstance(bad, int) else m2.astype(np.int32)
        arr[2, 3, 4] = bad
        p = tmp_path / "bad.masks.npz"
        np.savez(p, subject1=m1, subject2=arr)
        with pytest.raises(MaskFormatError, match=rf"bad\.masks\.npz: mask array 'subject2' .* holds {shown}\S* at "
                                                   r"\[2, 3, 4\]"):
            mask_io.load_compact_masks(p)
        with pytest.raises(MaskFormatError, match=rf"holds {shown}"):
            latent_mask(arr, (2, 2))
    with pytest.raises(MaskFormatError, match="divide it by 255"):
        mask_io.as_bool_mask(m1.astype(np.uint8) * 255, "x.masks.npz", "subject1")
    with pytest.raises(MaskFormatError, match="holds <U1 values"):
        mask_io.as_bool_mask(np.array(["a"]), "x", "subject1")
    # saving refuses the same values (never turned into True by a cast)
    with pytest.raises(MaskFormatError, match="nan"):
        mask_io.save_masks(tmp_path / "s.masks.npz", np.where(m1, np.nan, 0.0), m2)
    assert not (tmp_path / "s.masks.npz").exists()
