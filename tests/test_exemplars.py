"""Adding exemplars to a dataset folder (dreamrelation_core.data.exemplars), read back by the real dataset scan."""

from __future__ import annotations

import numpy as np
import pytest

from dreamrelation_core.data.dataset import describe_dataset, scan_dataset
from dreamrelation_core.data.exemplars import INDEX_FILE, add_exemplar
from dreamrelation_core.data.mask_files import load_masks
from dreamrelation_core.data.synthetic import synthetic_clip
from dreamrelation_core.data.video import read_video
from dreamrelation_core.errors import DatasetError, MaskExtractionError


def clip(frames: int = 7, seed: int = 0):
    return synthetic_clip(frames, (32, 48), seed=seed)


def test_added_exemplar_reads_back_exactly_and_validates(tmp_path):
    frames, m1, m2 = clip()
    out = add_exemplar(tmp_path / "rel", "", frames, m1, m2, "  a square   touches a disc ")
    assert out.added and out.name.startswith("clip_")
    entries = scan_dataset(tmp_path / "rel", full=True)
    assert [e.name for e in entries] == [out.name]
    e = entries[0]
    assert e.caption == "a square touches a disc"
    assert (e.video / "frame0000.png").is_file() and e.masks.name == f"{out.name}.masks.npz"
    np.testing.assert_array_equal(read_video(e.video), frames)  # lossless
    r1, r2 = load_masks(e.masks)
    np.testing.assert_array_equal(r1, m1)
    np.testing.assert_array_equal(r2, m2)
    describe_dataset(tmp_path / "rel", 7, (32, 48))  # what the Dataset node runs
    assert (tmp_path / "rel" / INDEX_FILE).is_file()


def test_same_exemplar_twice_is_not_duplicated(tmp_path):
    frames, m1, m2 = clip()
    first = add_exemplar(tmp_path, "shake", frames, m1, m2, "x")
    again = add_exemplar(tmp_path, "other_name", frames, m1, m2, "x")
    assert not again.added and again.name == "shake" and "already in the dataset" in again.report
    assert len(scan_dataset(tmp_path)) == 1
    # Another exemplar is added beside it; a name taken by other content is refused.
    f2, a2, b2 = clip(seed=3)
    assert add_exemplar(tmp_path, "", f2, a2, b2, "x").added
    assert len(scan_dataset(tmp_path)) == 2
    f3, a3, b3 = clip(seed=5)
    with pytest.raises(DatasetError, match="'shake' is taken"):
        add_exemplar(tmp_path, "shake", f3, a3, b3, "x")
    assert first.digest != add_exemplar(tmp_path, "", f3, a3, b3, "x").digest


def test_frame_count_must_be_6k_plus_1_and_names_the_valid_lengths(tmp_path):
    frames, m1, m2 = clip(13)
    with pytest.raises(DatasetError, match="10 frames.*nearest valid lengths are 7 and 13"):
        add_exemplar(tmp_path, "a", frames[:10], m1[:10], m2[:10], "x")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad, match", [
    ("count", r"subject1_mask: shape \(6, 32, 48\).*\(7, 32, 48\)"),
    ("size", r"subject2_mask: shape \(7, 16, 48\)"),
    ("caption", "caption is empty"),
    ("name", "plain name"),
])
def test_bad_inputs_are_refused_naming_the_field(tmp_path, bad, match):
    frames, m1, m2 = clip()
    kw = dict(name="ok", frames=frames, subject1=m1, subject2=m2, caption="x")
    if bad == "count":
        kw["subject1"] = m1[:6]
    elif bad == "size":
        kw["subject2"] = m2[:, :16]
    elif bad == "caption":
        kw["caption"] = " \n "
    else:
        kw["name"] = "../escape"
    with pytest.raises(DatasetError, match=match):
        add_exemplar(tmp_path, **kw)
    assert not any(tmp_path.iterdir())


def test_all_empty_mask_is_refused_and_nothing_written(tmp_path):
    frames, m1, m2 = clip()
    with pytest.raises(MaskExtractionError, match="subject 2's mask is empty on all 7 frames"):
        add_exemplar(tmp_path / "rel", "a", frames, m1, np.zeros_like(m2), "x")
    assert not list((tmp_path / "rel").glob("a*"))


def test_full_disk_while_writing_frames_leaves_the_dataset_as_it_was(tmp_path, monkeypatch):
    import errno

    from PIL import Image

    from dreamrelation_core.errors import DiskFullError

    frames, m1, m2 = clip()
    first = add_exemplar(tmp_path / "rel", "one", frames, m1, m2, "a square touches a disc")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "rel").rglob("*"))
    real, saved = Image.Image.save, []

    def save(self, fp, *args, **kwargs):  # the third frame hits a full disk, after part of it landed
        if len(saved) == 2:
            open(fp, "wb").write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        saved.append(fp)
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    frames2, n1, n2 = clip(seed=1)
    with pytest.raises(DiskFullError, match=r"two: not written, the disk is full: the file needs about .* free there"):
        add_exemplar(tmp_path / "rel", "two", frames2, n1, n2, "a square passes a disc")
    after = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "rel").rglob("*"))
    assert after == before  # no masks, caption, frames or partial folder of "two"
    assert [e.name for e in scan_dataset(tmp_path / "rel", full=True)] == [first.name]
