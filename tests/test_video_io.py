"""Video reading (files and frame folders), probing, and fit_clip with masks following frames."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamrelation_core.data.synthetic import synthetic_clip, write_video
from dreamrelation_core.data.video import (
    VideoError,
    crop_box,
    fit_clip,
    frame_folder_files,
    probe_video,
    read_video,
)
from dreamrelation_core.errors import DatasetError


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(25, (64, 96), seed=0)


def _write_frames(folder, names_values, size=(8, 8)):
    folder.mkdir()
    for name, v in names_values:
        Image.fromarray(np.full(size + (3,), v, np.uint8)).save(folder / name)


def test_frame_folder_is_sorted_numerically(tmp_path):
    names = [(f"frame{i}.png", i * 10) for i in range(12)]  # frame10 would sort before frame2 as strings
    _write_frames(tmp_path / "v", names[::-1])
    v = read_video(tmp_path / "v")
    assert v.shape == (12, 8, 8, 3) and v.dtype == np.uint8
    assert v[:, 0, 0, 0].tolist() == [i * 10 for i in range(12)]
    assert [p.name for p in frame_folder_files(tmp_path / "v")][:3] == ["frame0.png", "frame1.png", "frame2.png"]
    info = probe_video(tmp_path / "v")
    assert (info.num_frames, info.height, info.width) == (12, 8, 8)
    assert read_video(tmp_path / "v", max_frames=5).shape[0] == 5


def test_frame_folder_errors(tmp_path):
    _write_frames(tmp_path / "nonum", [("a.png", 0), ("b.png", 1)])
    with pytest.raises(VideoError, match=r"a\.png|b\.png"):
        read_video(tmp_path / "nonum")
    _write_frames(tmp_path / "dup", [("f1.png", 0), ("g1.jpg", 1)])
    with pytest.raises(VideoError, match="same frame number 1"):
        read_video(tmp_path / "dup")
    _write_frames(tmp_path / "size", [("f0.png", 0)])
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(tmp_path / "size" / "f1.png")
    with pytest.raises(VideoError, match=r"f1\.png.*16x8"):
        read_video(tmp_path / "size")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no .* frame images"):
        read_video(tmp_path / "empty")


def test_png_and_gif_round_trip_exactly(tmp_path, clip):
    frames = clip[0]
    for fmt in ("png", "gif"):
        p = write_video(tmp_path / f"v_{fmt}", frames, fmt)
        back = read_video(p)
        # Pillow merges the still final frames of the GIF into one long frame: they come back.
        assert back.shape == frames.shape, fmt
        assert np.array_equal(back, frames), fmt
        assert probe_video(p).num_frames == 25
    assert probe_video(tmp_path / "v_gif.gif").fps == pytest.approx(1000 / 120)  # GIF stores centiseconds


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_stream_videos_read_with_count_fps_and_content(tmp_path, clip, fmt):
    import imageio.v3 as iio

    frames = clip[0]
    p = tmp_path / f"v.{fmt}"
    codec = "libx264" if fmt == "mp4" else "libvpx-vp9"
    iio.imwrite(p, frames, extension=f".{fmt}", fps=10, codec=codec, macro_block_size=1)
    back = read_video(p)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames).mean() < 8  # lossy, but the same picture
    info = probe_video(p)
    assert (info.num_frames, info.height, info.width) == (25, 64, 96)
    assert info.fps == pytest.approx(10)
    assert read_video(p, max_frames=7).shape[0] == 7


def test_bad_video_files(tmp_path):
    with pytest.raises(VideoError, match="no such video"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError, match=r"bad\.mp4"):
        read_video(tmp_path / "bad.mp4")
    (tmp_path / "x.avi").write_bytes(b"")
    with pytest.raises(VideoError, match=r"unsupported video type '\.avi'"):
        read_video(tmp_path / "x.avi")


def test_crop_box_centres_on_the_target_aspect():
    assert crop_box(480, 1000, (480, 848)) == (0, 76, 480, 848)
    assert crop_box(1000, 848, (480, 848)) == (260, 0, 480, 848)
    assert crop_box(64, 64, (64, 64)) == (0, 0, 64, 64)


def test_crop_and_resize_follow_frames():
    frames = np.zeros((9, 64, 128, 3), np.uint8)
    m1 = np.zeros((9, 64, 128), bool)
    m2 = np.zeros((9, 64, 128), bool)
    frames[:, 10:20, 40:50] = 255  # inside the centre crop (columns 32..95)
    m1[:, 10:20, 40:50] = True
    frames[:, 30:40, 90:96, 1] = 200  # right edge of the crop
    m2[:, 30:40, 90:96] = True
    m2[:, :, 0:32] = True  # cropped away entirely
    out, (o1, o2) = fit_clip(frames, (m1, m2), 7, (32, 32))
    assert out.shape == (7, 32, 32, 3) and o1.shape == o2.shape == (7, 32, 32)
    assert o1.dtype == bool and out.dtype == np.uint8
    # block at crop columns 8..17, rows 10..19 -> halved: rows 5..9, columns 4..8
    assert np.array_equal(o1[0], out[0, :, :, 0] == 255)
    assert np.argwhere(o1[0]).min(0).tolist() == [5, 4] and np.argwhere(o1[0]).max(0).tolist() == [9, 8]
    assert o2[3].any() and np.array_equal(o2[3], out[3, :, :, 1] == 200)  # non-empty: equal empties prove nothing
    assert o2[:, :, :29].sum() == 0  # the cropped-away left band is gone from the mask too


def test_fit_clip_upscales_and_validates():
    frames = np.random.default_rng(0).integers(0, 256, (13, 24, 24, 3), dtype=np.uint8)
    out, none = fit_clip(frames, None, 13, (48, 48))
    assert none is None and out.shape == (13, 48, 48, 3)
    with pytest.raises(VideoError, match=r"clip\.mp4: has 13 frames, training needs 19"):
        fit_clip(frames, None, 19, (48, 48), source="clip.mp4")
    with pytest.raises(ValueError, match="nearest valid lengths are 7 and 13"):
        fit_clip(frames, None, 12, (48, 48))
    with pytest.raises(DatasetError, match=r"training size 50x48 \(HxW\): both must be positive multiples of 16"):
        fit_clip(frames, None, 13, (50, 48))
    with pytest.raises(DatasetError, match="multiples of 16"):  # the VAE alone would take 40, the patches not
        fit_clip(frames, None, 13, (40, 48))
    bad = np.zeros((13, 24, 20), bool)
    with pytest.raises(VideoError, match=r"subject 2 masks have shape \(13, 24, 20\)"):
        fit_clip(frames, (np.zeros((13, 24, 24), bool), bad), 13, (48, 48))
