"""A relation LoRA's picture: per-block norms and subspace similarity to the base Q/K/V."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dreamrelation_core.analysis.lora_report import analyze_lora, write_lora_report
from dreamrelation_core.errors import KeyLayoutError, LoraFormatError
from dreamrelation_core.lora.files import save_triplet
from dreamrelation_core.lora.layout import LoraSet, module_path
from dreamrelation_core.mochi.tiny import tiny_transformer
from fixtures.analysis_models import tiny_mochi_state, write_genmo, write_tiny_wan
from fixtures.loras import random_lora_set

R, RANK, ALPHA = 4, 8, 8.0  # LoRA rank, base subspace size, scale 2


def _top_left(w: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svd(w.float())[0][:, :k]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor], LoraSet]:
    """Base file (planted Mochi) and a triplet whose relation dW on to_q / add_q_proj writes inside
    the base q's top-R subspace, subject1 on to_v writes randomly, ffn stays untrained (B = 0)."""
    d = tmp_path_factory.mktemp("lora")
    sd = tiny_mochi_state(num_layers=3)
    base = write_genmo(d / "mochi_tiny.safetensors", sd, dtype=torch.float32)
    lora = random_lora_set(3, 64, 64, rank=R, alpha=ALPHA, seed=5)
    g = torch.Generator().manual_seed(5)
    for adapter, mods in lora.weights.items():
        for path, (a, b) in list(mods.items()):
            sub = path.split(".attn1.")[1]
            a = torch.randn(a.shape, generator=g)
            if adapter == "relation" and sub in ("to_q", "add_q_proj"):
                b = _top_left(sd[path + ".weight"], R) @ torch.randn(R, R, generator=g)
            elif adapter == "ffn":
                b = torch.zeros_like(b)
            else:
                b = torch.randn(b.shape, generator=g)
            mods[path] = (a, b)
    return base, save_triplet(d / "triplet.safetensors", lora), sd, lora


def test_norms_and_similarity_per_module(setup) -> None:
    base, lora_file, sd, lora = setup
    report = analyze_lora(lora_file, base, rank=RANK)
    rows = {(r.adapter, r.block, r.module): r for r in report.modules}
    assert len(rows) == sum(len(m) for m in lora.weights.values())
    q1 = rows[("relation", 1, "to_q")]
    path = module_path(1, "to_q")
    dense = lora.delta("relation", path)
    assert q1.norm == pytest.approx(float(dense.norm()), rel=1e-4)
    assert q1.base_norm == pytest.approx(float(sd[path + ".weight"].norm()), rel=1e-4)
    assert q1.rel_norm == pytest.approx(q1.norm / q1.base_norm)
    # planted: inside the top-R subspace of W_q, and of W_k (K = Q O has the same left vectors)
    assert q1.phi_q == pytest.approx(1.0, abs=1e-3)
    assert q1.phi_k == pytest.approx(1.0, abs=1e-3)
    assert q1.phi_self == pytest.approx(1.0, abs=1e-3)
    assert q1.phi_v < 0.6  # the independent V's top-8 subspace: random overlap (expected 8 / 64 * 8 / 4 = 0.25)
    text_q = rows[("relation", 0, "add_q_proj")]
    assert text_q.branch == "text" and text_q.phi_q == pytest.approx(1.0, abs=1e-3)
    v = rows[("subject1", 2, "to_v")]
    assert v.phi_q is not None and v.phi_v < 0.7 and v.norm > 0
    # the untrained ffn adapter: zero norm, no direction to compare
    f = rows[("ffn", 0, "to_out.0")]
    assert f.norm == 0.0 and f.phi_self is None and f.phi_q is None


def test_summary_and_files(setup, tmp_path: Path) -> None:
    base, lora_file, _, _ = setup
    report = analyze_lora(lora_file, base, rank=RANK)
    summary = report.summary()
    assert set(summary) == {"relation", "subject1", "subject2", "ffn"}
    # half of the relation modules (q) are planted at 1: the mean over q and k modules is well above random
    assert summary["relation"]["mean_phi"]["q"] > 0.5
    assert summary["ffn"]["mean_norm"] == 0.0
    paths = write_lora_report(report, tmp_path)
    js = json.loads(paths["json"].read_text())
    assert js["adapters"]["relation"]["modules"] == 3 * 4 - 1  # the last block's add_q_proj is not trained
    assert js["random_baseline"] == pytest.approx(RANK / 64)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(report.modules)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_lora_and_base_that_do_not_match(setup, tmp_path: Path) -> None:
    _, lora_file, _, _ = setup
    wan = write_tiny_wan(tmp_path / "wan.safetensors")
    with pytest.raises(KeyLayoutError, match=r"wan\.safetensors: no base weight for block 0"):
        analyze_lora(lora_file, wan)
    wide = write_genmo(tmp_path / "wide.safetensors", tiny_transformer(num_layers=3, head_dim=48).state_dict())
    with pytest.raises(LoraFormatError, match="do not match"):
        analyze_lora(lora_file, wide)


def test_cli_analyze_lora(setup, tmp_path: Path) -> None:
    from dreamrelation_core.cli import main

    base, lora_file, _, _ = setup
    assert main(["analyze-lora", str(lora_file), "--base", str(base), "--out", str(tmp_path), "--rank", "8"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"lora_report.json", "lora_report.csv", "lora_report.png"}
