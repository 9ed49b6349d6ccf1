"""The full-layer sweep on tiny model files: Mochi (genmo, diffusers, fp8-scaled), Wan, HunyuanVideo."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core.analysis.sweep import analyze_qkv, write_qkv_report
from dreamrelation_core.analysis.weights import TensorRef, WeightFile, detect_layout
from dreamrelation_core.errors import DreamRelationError, ModelFileError, ModelFileNotFoundError
from fixtures.analysis_models import (
    tiny_mochi_state,
    write_genmo,
    write_genmo_fp8_scaled,
    write_tiny_hunyuan,
    write_tiny_wan,
)

RANK = 8  # tiny widths are 64: random baseline 8 / 64


@pytest.fixture(scope="module")
def mochi_sd() -> dict[str, torch.Tensor]:
    return tiny_mochi_state(num_layers=3)


@pytest.fixture(scope="module")
def genmo_file(tmp_path_factory, mochi_sd) -> Path:
    return write_genmo(tmp_path_factory.mktemp("genmo") / "mochi_tiny_bf16.safetensors", mochi_sd)


def _check_planted(summary: dict, branch: str) -> None:
    assert summary[branch]["q-k"] == pytest.approx(1.0, abs=0.02)  # bf16 rounding of K = Q O
    for pair in ("q-v", "k-v"):
        # random subspaces: 8 / 64 = 0.125 expected; well away from 1
        assert 0.03 < summary[branch][pair] < 0.3, (branch, pair, summary[branch][pair])


def test_genmo_file_sweep_writes_numbers_table_and_picture(genmo_file: Path, tmp_path: Path) -> None:
    analysis = analyze_qkv(genmo_file, rank=RANK)
    assert analysis.family.startswith("mochi (genmo")
    summary = analysis.summary()
    assert set(summary) == {"visual", "text"}
    _check_planted(summary, "visual")
    _check_planted(summary, "text")
    paths = write_qkv_report(analysis, tmp_path / "out")
    js = json.loads(paths["json"].read_text())
    assert js["phi"]["visual"]["q-k"] == pytest.approx(summary["visual"]["q-k"])
    vis = js["branches"]["visual"]
    assert vis["layers"] == 3 and vis["rank"] == RANK and vis["dim"] == 64
    assert vis["random_baseline"] == pytest.approx(RANK / 64)
    assert vis["sizes"] == [1, 2, 4, 8, 16, 32, 64]  # 128, 256, 512 exceed the tiny weights
    grid = torch.tensor(vis["grid"]["q-k"])
    assert grid.shape == (7, 7) and float(grid.min()) > 0.97
    # the layer-averaged grid at (rank, rank) is the reported phi
    assert float(torch.tensor(vis["grid"]["q-v"])[3, 3]) == pytest.approx(vis["phi"]["q-v"], rel=1e-5)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 6  # 3 blocks x (visual, text)
    vis_rows = [float(r["q-k"]) for r in rows if r["branch"] == "visual"]
    assert sum(vis_rows) / 3 == pytest.approx(summary["visual"]["q-k"], abs=1e-5)
    assert rows[0]["module"] == "blocks.0.attn.qkv_x"
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_last_mochi_block_text_query_is_left_out(genmo_file: Path, tmp_path: Path) -> None:
    analysis = analyze_qkv(genmo_file, rank=RANK)
    text = analysis.branches["text"]
    last = [lr for lr in text.layers if lr.layer == 2][0]
    assert last.phi["q-k"] is None and last.phi["q-v"] is None and last.phi["k-v"] is not None
    assert text.grid_count == {"q-k": 2, "q-v": 2, "k-v": 3}
    rows = list(csv.DictReader(write_qkv_report(analysis, tmp_path, plot=False)["csv"].open()))
    last_row = [r for r in rows if r["branch"] == "text" and r["layer"] == "2"][0]
    assert last_row["q-k"] == "" and last_row["k-v"] != ""


def test_diffusers_keys_and_fp8_scaled_give_the_same_numbers(genmo_file: Path, mochi_sd, tmp_path: Path) -> None:
    ref = analyze_qkv(genmo_file, rank=RANK).summary()
    diff_file = tmp_path / "diffusers.safetensors"
    save_file(mochi_sd, str(diff_file))
    got = analyze_qkv(diff_file, rank=RANK)
    assert got.family.startswith("mochi (diffusers")
    for b in ("visual", "text"):
        for p in ("q-k", "q-v", "k-v"):
            # fp32 diffusers file vs bf16 genmo file: same weights up to bf16 rounding
            assert got.summary()[b][p] == pytest.approx(ref[b][p], abs=0.02)
    fp8 = analyze_qkv(write_genmo_fp8_scaled(tmp_path / "fp8.safetensors", mochi_sd), rank=RANK).summary()
    _check_planted(fp8, "visual")
    for b in ("visual", "text"):
        for p in ("q-v", "k-v"):
            assert fp8[b][p] == pytest.approx(ref[b][p], abs=0.03)


def test_fp8_reader_applies_scale_weight(mochi_sd, tmp_path: Path) -> None:
    path = write_genmo_fp8_scaled(tmp_path / "fp8.safetensors", mochi_sd)
    wf = WeightFile(path)
    key = "model.diffusion_model.blocks.1.attn.qkv_x.weight"
    assert wf.entries[key].dtype == "F8_E4M3"
    k_rows = wf.read(TensorRef(key, (64, 128)))
    want = mochi_sd["transformer_blocks.1.attn1.to_k.weight"]
    assert k_rows.dtype == torch.float32
    # e4m3 keeps ~3 mantissa bits: relative error per entry below 1/16 of the tensor's range
    assert float((k_rows - want).norm() / want.norm()) < 0.05
    assert float(want.abs().max()) > 3.0  # so the unscaled fp8 payload (<= 448 / scale) would differ


def test_wan_layout_self_and_cross_attention(tmp_path: Path) -> None:
    path = write_tiny_wan(tmp_path / "wan2.1_t2v_tiny.safetensors", layers=3)
    layout = detect_layout(WeightFile(path))
    assert layout.family.startswith("wan")
    assert layout.branches == ["self", "cross"]
    analysis = analyze_qkv(path, rank=RANK)
    _check_planted(analysis.summary(), "self")
    _check_planted(analysis.summary(), "cross")
    assert [lr.name for lr in analysis.branches["self"].layers] == [f"blocks.{i}.self_attn" for i in range(3)]


def test_wan_i2v_image_keys_are_a_branch(tmp_path: Path) -> None:
    analysis = analyze_qkv(write_tiny_wan(tmp_path / "wan_i2v.safetensors", layers=2, i2v=True), rank=RANK)
    assert set(analysis.branches) == {"self", "cross", "cross_img"}
    _check_planted(analysis.summary(), "cross_img")


def test_hunyuan_layout_double_and_single_blocks(tmp_path: Path) -> None:
    path = write_tiny_hunyuan(tmp_path / "hunyuan_video_tiny.safetensors")
    analysis = analyze_qkv(path, rank=RANK)
    assert set(analysis.branches) == {"img", "txt", "single"}
    for b in ("img", "txt", "single"):
        # single blocks: q, k, v are the first 3 x H rows of linear1; taking MLP rows would break q-k = 1
        _check_planted(analysis.summary(), b)


def test_generic_diffusers_attention_is_found(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            sd[f"blocks.{i}.attn1.{n}.weight"] = torch.randn(32, 32, generator=g)
    sd["pooler.to_q.weight"] = torch.randn(32, 32, generator=g)  # no layer index: not an attention layer
    save_file(sd, str(tmp_path / "other.safetensors"))
    analysis = analyze_qkv(tmp_path / "other.safetensors", rank=4)
    assert list(analysis.branches) == ["blocks.*.attn1"]
    assert len(analysis.branches["blocks.*.attn1"].layers) == 2


def test_options_restrict_branches_layers_and_side(genmo_file: Path) -> None:
    a = analyze_qkv(genmo_file, rank=4, branches=["visual"], layers=[0, 2], sizes=(1, 4, 16), side="right")
    assert list(a.branches) == ["visual"]
    assert [lr.layer for lr in a.branches["visual"].layers] == [0, 2]
    assert a.branches["visual"].sizes == [1, 4, 16]
    # K = Q O rotates the input side: right singular vectors no longer agree
    assert a.summary()["visual"]["q-k"] < 0.5
    with pytest.raises(ValueError, match="no branch"):
        analyze_qkv(genmo_file, branches=["audio"])


def test_file_without_attention_weights_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "mochi_vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}, str(path))
    with pytest.raises(ModelFileError, match=r"mochi_vae\.safetensors: no attention Q/K/V weights") as e:
        analyze_qkv(path)
    assert isinstance(e.value, DreamRelationError)
    assert "encoder.conv_in.weight" in str(e.value)


def test_missing_and_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileNotFoundError, match=r"nothere\.safetensors: no such model file"):
        analyze_qkv(tmp_path / "nothere.safetensors")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFileError, match=r"broken\.safetensors: not a readable safetensors file"):
        analyze_qkv(bad)


def test_cli_writes_report_and_reports_errors(genmo_file: Path, tmp_path: Path, capsys) -> None:
    from dreamrelation_core.cli import main

    assert main(["analyze-qkv", str(genmo_file), "--out", str(tmp_path / "o"), "--rank", "8", "--sizes", "1,8,32"]) == 0
    js = json.loads((tmp_path / "o" / "qkv_similarity.json").read_text())
    assert js["branches"]["text"]["sizes"] == [1, 8, 32]
    assert (tmp_path / "o" / "qkv_similarity.png").is_file()
    assert "q-k 1.00" in capsys.readouterr().out
    assert main(["analyze-qkv", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 1
    assert "missing.safetensors: no such model file" in capsys.readouterr().err
