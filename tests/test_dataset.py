"""Dataset scan/validation, prepare with tiny VAE/T5, cache round trip, errors leave no files."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dreamrelation_core.cli.prepare import add_cli
from dreamrelation_core.data import mask_files as mask_io
from dreamrelation_core.data.cache import MANIFEST, Encoders, load_prepared, prepare_dataset
from dreamrelation_core.data.dataset import scan_dataset
from dreamrelation_core.data.encode import encode_captions, encode_frames
from dreamrelation_core.data.latent_masks import latent_mask
from dreamrelation_core.data.synthetic import CAPTION, synthetic_clip, write_synthetic_dataset, write_video
from dreamrelation_core.data.video import fit_clip
from dreamrelation_core.errors import DatasetError
from dreamrelation_core.mochi import tiny
from dreamrelation_core.mochi.latents import normalize_latents
from dreamrelation_core.training.trainer import branch_mask

F, SIZE, TEXT_LEN = 13, (32, 32), 16


@pytest.fixture(scope="module")
def models():
    return tiny.tiny_vae(seed=1), tiny.tiny_text_encoder(seed=2), tiny.tiny_tokenizer(TEXT_LEN)


@pytest.fixture()
def data(tmp_path):
    """Two synthetic clips (PNG frame folders + compact masks), 13 frames, 32x48 (cropped to 32x32)."""
    return write_synthetic_dataset(tmp_path / "data", num_videos=2, num_frames=F, size=(32, 48), seed=5)


def _prepare(data, cache, models, **kw):
    vae, te, tok = models
    return prepare_dataset(data, cache, Encoders.from_models(vae, te, tok), kw.pop("num_frames", F), kw.pop("size", SIZE), TEXT_LEN, **kw)


def _files(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_scan_accepts_all_three_layouts(tmp_path):
    d = tmp_path / "rel"
    frames, m1, m2 = synthetic_clip(F, (32, 48), seed=0)
    d.mkdir()
    # 1) gif + compact masks, 2) mp4 + reference masks beside it, 3) frame folder + reference masks inside
    write_video(d / "a", frames, "gif")
    mask_io.save_compact_masks(d / "a.masks.npz", m1, m2)
    write_video(d / "b", frames, "mp4")
    mask_io.save_reference_masks(d / "b", m1, m2)
    write_video(d / "c", frames, "png")
    mask_io.save_reference_masks(d / "c" / "masks", m1, m2)
    for n in "abc":
        (d / f"{n}.txt").write_text(f"  A person is\n shaking hands with a person.  {n}\n")
    entries = scan_dataset(d, full=True)
    assert [e.name for e in entries] == ["a", "b", "c"]
    assert [e.video.name for e in entries] == ["a.gif", "b.mp4", "c"]
    assert [e.masks.name for e in entries] == ["a.masks.npz", "b", "masks"]
    assert entries[1].caption == "A person is shaking hands with a person. b"
    assert all((e.num_frames, e.height, e.width) == (F, 32, 48) for e in entries)


def test_prepare_writes_cache_that_round_trips(data, models, tmp_path):
    vae, te, tok = models
    cache = tmp_path / "cache"
    seen = []
    paths = _prepare(data, cache, models, progress=lambda i, n, name: seen.append((i, n, name)))
    assert [p.name for p in paths] == ["clip0.safetensors", "clip1.safetensors"]
    assert seen == [(1, 2, "clip0"), (2, 2, "clip1")]
    manifest = json.loads((cache / MANIFEST).read_text())
    assert [c["file"] for c in manifest["clips"]] == ["clip0.safetensors", "clip1.safetensors"]
    assert manifest["num_frames"] == F and manifest["size"] == list(SIZE)

    clips = load_prepared(cache)
    c = clips[1]
    # recompute clip1 by hand: fit (centre crop 48 -> 32 columns), encode, latent masks
    frames, m1, m2 = synthetic_clip(F, (32, 48), seed=6)
    fitted, (f1, f2) = fit_clip(frames, (m1, m2), F, SIZE)
    assert np.array_equal(fitted, frames[:, :, 8:40])  # pure crop, no resampling needed
    mean, logvar = encode_frames(vae, fitted)
    y, ym = encode_captions(te, tok, [CAPTION], TEXT_LEN)
    assert c.name == "clip1" and c.caption == CAPTION
    torch.testing.assert_close(c.mean, mean)
    torch.testing.assert_close(c.logvar, logvar)
    torch.testing.assert_close(c.y_feat, y[0])
    assert c.y_mask.dtype == torch.bool and torch.equal(c.y_mask, ym[0])
    torch.testing.assert_close(c.mask1, latent_mask(f1))
    torch.testing.assert_close(c.mask2, latent_mask(f2))
    assert c.mask1.shape == (3, 4, 4) and c.mask1.sum() > 0 and c.mask2.sum() > 0
    # the trainer's per-branch masks of this clip: relation = mask1 + mask2 (2 where they overlap)
    torch.testing.assert_close(branch_mask([c], "relation"), (c.mask1 + c.mask2)[None])
    torch.testing.assert_close(branch_mask([c], "subject2"), c.mask2[None])
    assert c.meta["num_frames"] == str(F) and c.meta["size"] == "32x32" and c.meta["source"].endswith("clip1")

    # sampled latents: z = mean + exp(logvar / 2) * eps, then ComfyUI's Mochi normalisation
    z = c.sample_latents(torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, normalize_latents(mean + torch.exp(logvar / 2) * eps))
    assert z.shape == (12, 3, 4, 4) and z.dtype == torch.float32


def test_prepare_skips_up_to_date_and_redoes_changed(data, models, tmp_path):
    cache = tmp_path / "cache"
    _prepare(data, cache, models)
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    _prepare(data, cache, models)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == stamp
    (data / "clip1.txt").write_text("A bear is hugging a raccoon.")
    _prepare(data, cache, models)
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert after["clip0.safetensors"] == stamp["clip0.safetensors"]
    assert after["clip1.safetensors"] != stamp["clip1.safetensors"]
    assert load_prepared(cache)[1].caption == "A bear is hugging a raccoon."
    # another size is another cache content
    _prepare(data, cache, models, size=(16, 16))
    assert load_prepared(cache)[0].mask1.shape == (3, 2, 2)


def _break_missing_caption(d):
    (d / "clip1.txt").unlink()
    return DatasetError, r"clip1: no caption file clip1\.txt"


def _break_missing_masks(d):
    (d / "clip0.masks.npz").unlink()
    return DatasetError, r"clip0: no masks \(clip0\.masks\.npz or clip0/masks/frame\{i\}\.png\)"


def _break_mask_frames(d):
    m1, m2 = mask_io.load_compact_masks(d / "clip0.masks.npz")
    mask_io.save_compact_masks(d / "clip0.masks.npz", m1[:-1], m2[:-1])
    return DatasetError, r"clip0\.masks\.npz does not match .*clip0: 12 mask frames vs 13 video frames"


def _break_mask_size(d):
    m1, m2 = mask_io.load_compact_masks(d / "clip1.masks.npz")
    mask_io.save_compact_masks(d / "clip1.masks.npz", m1[:, :, :40], m2[:, :, :40])
    return DatasetError, r"clip1\.masks\.npz does not match .*masks 40x32 vs video 48x32"


def _break_colours(d):
    m1, m2 = mask_io.load_compact_masks(d / "clip1.masks.npz")
    (d / "clip1.masks.npz").unlink()
    mask_io.save_reference_masks(d / "clip1" / "masks", m1, m2)
    png = d / "clip1" / "masks" / "frame11.png"
    rgb = np.asarray(Image.open(png).convert("RGB")).copy()
    rgb[0, 0] = (255, 255, 255)
    Image.fromarray(rgb).save(png)
    return mask_io.MaskFormatError, r"frame11\.png: 1 pixels have colours other .*found \(255, 255, 255\)"


def _break_too_short(d):
    shutil.rmtree(d / "clip0")
    frames, m1, m2 = synthetic_clip(7, (32, 48))
    write_video(d / "clip0", frames, "png")
    mask_io.save_compact_masks(d / "clip0.masks.npz", m1, m2)
    return DatasetError, r"clip0: has 7 frames, training needs 13"


def _break_no_video(d):
    for p in list(d.iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (d / "notes.txt").write_text("hello")
    return DatasetError, r"no usable video"


def _break_duplicate(d):
    write_video(d / "clip0", synthetic_clip(F, (32, 48))[0], "gif")
    return DatasetError, r"several videos named 'clip0': clip0, clip0\.gif"


def _break_orphan_masks(d):
    m1, m2 = mask_io.load_compact_masks(d / "clip0.masks.npz")
    mask_io.save_reference_masks(d / "clip7", m1, m2)
    return DatasetError, r"clip7: looks like a reference mask folder, but there is no video"


def _break_corrupt_video(d):
    (d / "clip2.mp4").write_bytes(b"\x00" * 100)
    (d / "clip2.txt").write_text(CAPTION)
    m1, m2 = mask_io.load_compact_masks(d / "clip0.masks.npz")
    mask_io.save_compact_masks(d / "clip2.masks.npz", m1, m2)
    return DatasetError, r"clip2\.mp4: cannot open as a video"


@pytest.mark.parametrize("breaker", [
    _break_missing_caption, _break_missing_masks, _break_mask_frames, _break_mask_size, _break_colours,
    _break_too_short, _break_no_video, _break_duplicate, _break_orphan_masks, _break_corrupt_video,
])
def test_bad_inputs_raise_and_write_nothing(data, models, tmp_path, breaker):
    err, pattern = breaker(data)
    cache = tmp_path / "cache"
    with pytest.raises(err, match=pattern):
        _prepare(data, cache, models)
    assert _files(cache) == []


def test_bad_settings(data, models, tmp_path):
    with pytest.raises(ValueError, match="nearest valid lengths are 7 and 13"):
        _prepare(data, tmp_path / "c", models, num_frames=12)
    with pytest.raises(DatasetError, match="multiples of 16"):
        _prepare(data, tmp_path / "c", models, size=(24, 32))
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "nope")
    assert _files(tmp_path / "c") == []


def test_load_prepared_errors(data, models, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="no prepared cache here"):
        load_prepared(cache)
    _prepare(data, cache, models)
    good = (cache / "clip0.safetensors").read_bytes()
    (cache / "clip0.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match=r"clip0\.safetensors: corrupt prepared clip"):
        load_prepared(cache)
    (cache / "clip0.safetensors").unlink()
    with pytest.raises(DatasetError, match=r"clip0\.safetensors: prepared clip missing"):
        load_prepared(cache)
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(12, 3, 4, 4)}, cache / "clip0.safetensors", metadata={"format": "x"})
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['logvar'"):
        load_prepared(cache)
    # a broken file is rebuilt by the next prepare instead of being trusted
    _prepare(data, cache, models)
    assert len(load_prepared(cache)) == 2


def test_prepare_command_line(data, tmp_path):
    vae, te, tok = tiny.tiny_vae(), tiny.tiny_text_encoder(), tiny.tiny_tokenizer(TEXT_LEN)
    vae.save_pretrained(tmp_path / "vae")
    te.save_pretrained(tmp_path / "te")
    tok.save_pretrained(tmp_path / "tok")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args([
        "prepare", str(data), "--vae", str(tmp_path / "vae"), "--text-encoder", str(tmp_path / "te"),
        "--tokenizer", str(tmp_path / "tok"), "--frames", "13", "--size", "32x32", "--max-text-len", "16",
    ])
    assert args.size == (32, 32)
    assert args.func(args) == 0
    clips = load_prepared(data / ".dreamrelation_cache")
    assert [c.name for c in clips] == ["clip0", "clip1"] and clips[0].y_feat.shape == (16, 32)
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", str(data), "--vae", "v", "--text-encoder", "t", "--tokenizer", "k", "--size", "480"])


def test_describe_dataset_and_folder_stamp(data):
    from dreamrelation_core.data.dataset import describe_dataset, folder_stamp

    spec = describe_dataset(data, F, SIZE)
    assert [e.name for e in spec.entries] == ["clip0", "clip1"] and spec.size == SIZE
    assert "2 video(s)" in spec.report() and CAPTION in spec.report()
    before = folder_stamp(data)
    (data / ".dreamrelation_cache").mkdir()
    (data / ".dreamrelation_cache" / "x").write_text("cache files do not count")
    assert folder_stamp(data) == before
    (data / "clip0.txt").write_text("A cat is hugging a dog.")
    assert folder_stamp(data) != before
    with pytest.raises(DatasetError, match="has 13 frames, training needs 19"):
        describe_dataset(data, 19, SIZE)


def test_dataset_node_in_the_pack(pack, data, monkeypatch):
    from fixtures.comfy_nodes import fingerprint, node_classes, run_node

    cls = node_classes(pack)["DreamRelationDataset"]
    assert cls.GET_SCHEMA().display_name == "DreamRelation Dataset"
    inputs = cls.INPUT_TYPES()["required"]
    # odd steps: every Mochi 6k + 1 and every Wan 4k + 1 length is reachable
    assert inputs["frames"][1]["default"] == 61 and inputs["frames"][1]["step"] == 2
    spec, report = run_node(cls, folder=f" {data} ", frames=F, height=32, width=32).outputs
    assert len(spec.entries) == 2 and report.startswith(str(data))
    # ComfyUI runs the node again when the folder's content changes, and only then
    args = dict(folder=str(data), frames=F, height=32, width=32)
    before = fingerprint(monkeypatch, cls, **args)
    assert fingerprint(monkeypatch, cls, **args) == before
    (data / "clip0.txt").write_text("A cat is hugging a dog.")
    changed = fingerprint(monkeypatch, cls, **args)
    assert changed != before
    assert fingerprint(monkeypatch, cls, **{**args, "frames": 19}) != changed  # the clip size counts too
    (data / "clip1.txt").unlink()
    assert fingerprint(monkeypatch, cls, **args) != changed
    with pytest.raises(DatasetError, match="no caption file clip1.txt"):
        run_node(cls, **args)
