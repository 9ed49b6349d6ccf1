"""A full disk during any write the pack makes (checkpoint, LoRA, cache entry, mask file, export,
run files) is one DiskFullError naming the file, the bytes it needed and the free space; nothing is
half-written and an earlier version of the file stays intact. The disk fills up by injection
(fixtures/faults.py: the OS error a full disk gives, after part of the file was written), and on a
real 256 KiB tmpfs where this machine lets the test mount one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamrelation_core import fileio
from dreamrelation_core.data import mask_files as mask_io
from dreamrelation_core.data.cache import Encoders, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.errors import DiskFullError
from dreamrelation_core.lora import files as formats
from dreamrelation_core.lora.genmo import save_comfy_lora
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae
from dreamrelation_core.training.runs import write_history
from fixtures.faults import fill_disk
from fixtures.loras import random_lora_set

MSG = r"{name}: not written, the disk is full: the file needs about [\d.]+ (bytes|KiB|MiB), .* free there\. Nothing was half-written"


def _lora():
    return random_lora_set(2, 16, 8, rank=2, seed=1)


def _writes(tmp: Path):
    """(target, write) for every kind of file the pack writes."""
    m1 = np.zeros((7, 8, 8), bool)
    m1[:, :4] = True
    state = {"format": "dreamrelation.checkpoint", "step": 3, "lora": {"w": torch.randn(64, 64)}}
    return {
        "checkpoint": (tmp / "checkpoint_000003.pt", lambda p: fileio.save_torch(p, state)),
        "triplet": (tmp / "relation_triplet.safetensors", lambda p: formats.save_triplet(p, _lora())),
        "relation": (tmp / "relation_only.safetensors", lambda p: formats.save_relation_only(p, _lora())),
        "export": (tmp / "stock.safetensors", lambda p: save_comfy_lora(p, _lora())),
        "masks": (tmp / "clip.masks.npz", lambda p: mask_io.save_compact_masks(p, m1, ~m1)),
        "history": (tmp / "history.json", lambda p: write_history(p.parent, [{"step": 1, "total": 0.5}] * 50)),
    }


@pytest.mark.parametrize("kind", ["checkpoint", "triplet", "relation", "export", "masks", "history"])
def test_full_disk_is_one_clear_error_and_the_old_file_stays(tmp_path, monkeypatch, kind):
    target, write = _writes(tmp_path)[kind]
    write(target)
    before = target.read_bytes()
    opened = fill_disk(monkeypatch, limit=64)
    with pytest.raises(DiskFullError, match=MSG.format(name=target.name)) as e:
        write(target)
    assert opened and e.value.errno == 28  # ENOSPC, also an OSError for callers that catch those
    assert target.read_bytes() == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary file left


def test_full_disk_while_preparing_a_cache_entry(tmp_path, monkeypatch):
    data = write_synthetic_dataset(tmp_path / "data", num_videos=1, num_frames=7, size=(32, 32))
    fill_disk(monkeypatch, limit=0, when=lambda p: p.name.endswith(".safetensors.tmp") or ".safetensors." in p.name)
    with pytest.raises(DiskFullError, match=r"\.safetensors: not written, the disk is full"):
        prepare_dataset(data, tmp_path / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32),
                        max_text_len=16)
    assert not list((tmp_path / "cache").glob("*.safetensors")) and not list((tmp_path / "cache").glob(".*.tmp"))


def test_stale_temporary_files_are_ours_only(tmp_path):
    (tmp_path / ".checkpoint_000010.pt.k2j3h4g5.tmp").write_bytes(b"x" * 10)
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / ".hidden").write_text("mine")
    removed = fileio.remove_stale_temps(tmp_path)
    assert [(p.name, n) for p, n in removed] == [(".checkpoint_000010.pt.k2j3h4g5.tmp", 10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "notes.tmp"]


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs (root only); the reason it cannot be done, or None."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs root on Linux"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed here: {r.stderr.strip() or r.returncode}"


def test_real_small_tmpfs(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    reason = _mount_tmpfs(disk, "256k")
    if reason:
        pytest.skip(f"the injected full disk above covers this; {reason}")
    try:
        small = disk / "small.safetensors"
        formats.save_triplet(small, _lora())
        big = random_lora_set(4, 128, 64, rank=16, seed=2)  # about 1 MiB in fp32
        with pytest.raises(DiskFullError, match=MSG.format(name="relation_triplet.safetensors")):
            formats.save_triplet(disk / "relation_triplet.safetensors", big)
        small_masks = np.zeros((7, 8, 8), bool)
        small_masks[:, :3] = True
        mask_io.save_reference_masks(disk / "clip", small_masks, ~small_masks)
        filler = disk / "filler"
        # 16 KiB left: the tensors' bytes fit (the free-space check passes), the whole file does not
        filler.write_bytes(b"\0" * (fileio.free_bytes(disk) - 16384))
        with pytest.raises(DiskFullError, match=MSG.format(name="checkpoint_000001.pt")):
            fileio.save_torch(disk / "checkpoint_000001.pt", {"lora": {"w": torch.randn(64, 64)}})
        noise = np.random.default_rng(0).random((7, 128, 128)) > 0.5  # PNGs that do not compress
        with pytest.raises(DiskFullError, match=r"clip: not written, the disk is full"):
            mask_io.save_reference_masks(disk / "clip", noise, ~noise)
        m1, _ = mask_io.load_reference_masks(disk / "clip")  # the old frames, as they were
        assert np.array_equal(m1, small_masks)
        assert sorted(p.name for p in disk.iterdir()) == ["clip", "filler", "small.safetensors"]
        assert formats.load_lora_file(small)  # the earlier file is intact
    finally:
        subprocess.run(["umount", str(disk)], check=False)
