"""Every LoRA file the pack writes, the pack reads back to the same weight deltas: our triplet,
relation-only, the ComfyUI export (`export-comfy`: rank from the shapes, alpha from `.alpha`), and
a reference checkpoint through `import-reference`. Exports refuse values their dtype cannot hold.
(The Relation LoRA Loader reading the ComfyUI export: tests/test_comfy_mochi.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreamrelation_core.cli import main
from dreamrelation_core.cli.export import export_comfy
from dreamrelation_core.lora import files as formats
from dreamrelation_core.lora import genmo
from dreamrelation_core.lora.files import LoraFormatError
from fixtures.loras import random_lora_set

D, DY, N, R = 16, 8, 3, 3


@pytest.fixture(scope="module")
def lora():
    return random_lora_set(N, D, DY, rank=R, alpha=6.0, seed=5)  # scale 2


def assert_same_deltas(a, b, adapters, atol=1e-6):
    for adapter in adapters:
        assert set(a.weights[adapter]) == set(b.weights[adapter]), adapter
        for p in a.weights[adapter]:
            torch.testing.assert_close(b.delta(adapter, p), a.delta(adapter, p), rtol=1e-5, atol=atol)


def test_triplet_and_relation_only_read_back(tmp_path, lora):
    t = formats.load_lora_file(formats.save_triplet(tmp_path / "t.safetensors", lora))
    assert_same_deltas(lora, t, ("relation", "subject1", "subject2", "ffn"))
    r = formats.load_lora_file(formats.save_relation_only(tmp_path / "r.safetensors", lora))
    assert set(r.adapters) == {"relation", "ffn"}
    assert_same_deltas(lora, r, ("relation", "ffn"))


def test_comfy_export_reads_back_everywhere(tmp_path, lora):
    src = formats.save_triplet(tmp_path / "t.safetensors", lora)
    out = export_comfy(src, tmp_path / "stock.safetensors")
    back = formats.load_lora_file(out)  # what the loader node, analyze-lora and export-relation read
    assert back.metadata["format"] == genmo.FORMAT_GENMO and back.metadata["written_as"] == genmo.FORMAT_COMFY
    assert back.rank == {"relation": R, "ffn": R}  # from the shapes (zero columns of the fused B dropped)
    assert_same_deltas(lora, back, ("relation", "ffn"))
    # .alpha is honoured: a file whose alpha halves the scale gives half the delta
    sd = load_file(out)
    half = {k: (v / 2 if k.endswith(".alpha") else v) for k, v in sd.items()}
    halved = genmo.genmo_to_lora_set(half, source="half")
    p = next(iter(lora.weights["relation"]))
    torch.testing.assert_close(halved.delta("relation", p), lora.delta("relation", p) / 2, rtol=1e-5, atol=1e-6)
    # export-relation of the export, then the export of that: still the same deltas
    assert main(["export-relation", str(out), str(tmp_path / "rel.safetensors")]) == 0
    assert_same_deltas(lora, formats.load_lora_file(tmp_path / "rel.safetensors"), ("relation", "ffn"))
    again = export_comfy(tmp_path / "rel.safetensors", tmp_path / "stock2.safetensors")
    assert_same_deltas(lora, formats.load_lora_file(again), ("relation", "ffn"))


def reference_state(rank: int = 2, out_rank: int = 3) -> tuple[dict[str, torch.Tensor], dict]:
    """A reference checkpoint's state dict and kwargs (docs/method.md "Reference checkpoint format")."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    sd = {}
    for i in range(N):
        pre = f"blocks.{i}.attn."
        for mod, din in (("to_q_x", D), ("to_k_x", D), ("to_q_y", DY), ("to_k_y", DY)):
            sd[f"{pre}{mod}.lora_A.relation"], sd[f"{pre}{mod}.lora_B.relation"] = r(rank, din), r(D, rank)
        for mod, din in (("to_v_x", D), ("to_v_y", DY)):
            for s in ("subject1", "subject2"):
                sd[f"{pre}{mod}.lora_A.{s}"], sd[f"{pre}{mod}.lora_B.{s}"] = r(rank, din), r(D, rank)
        sd[pre + "proj_x.lora_A"], sd[pre + "proj_x.lora_B"] = r(out_rank, D), r(D, out_rank)
        if i < N - 1:
            sd[pre + "proj_y.lora_A"], sd[pre + "proj_y.lora_B"] = r(out_rank, D), r(DY, out_rank)
    kwargs = {"qkv_proj_lora_rank": rank, "qkv_proj_lora_alpha": 2.0 * rank, "out_proj_lora_rank": out_rank,
              "out_proj_lora_alpha": 1.5}
    return sd, kwargs


def test_reference_checkpoint_through_import_reference(tmp_path):
    sd, kwargs = reference_state()
    ref = tmp_path / "model_1800.lora.pt"
    torch.save({"state_dict": sd, "kwargs": kwargs}, ref)
    direct = formats.load_lora_file(ref)
    assert main(["import-reference", str(ref), str(tmp_path / "ours.safetensors")]) == 0
    ours = formats.load_lora_file(tmp_path / "ours.safetensors")
    assert ours.metadata["format"] == formats.FORMAT_TRIPLET and ours.metadata["step"] == "1800"
    assert_same_deltas(direct, ours, direct.adapters)
    stock = formats.load_lora_file(export_comfy(ref, tmp_path / "stock.safetensors"))
    assert_same_deltas(direct, stock, ("relation", "ffn"), atol=1e-4)


def test_export_refuses_values_beyond_the_dtype_naming_the_tensor(tmp_path, lora):
    big = lora.only(lora.adapters)
    p = next(iter(big.weights["relation"]))
    a, b = big.weights["relation"][p]
    big.weights["relation"] = {**big.weights["relation"], p: (a, b * 1e5)}  # scale 2: |B| far past 65504
    src = formats.save_triplet(tmp_path / "big.safetensors", big)  # fp32 holds it
    with pytest.raises(LoraFormatError, match=r"stock16\.safetensors.*blocks\.\d\.attn\.qkv_x\.lora_B\.weight.*"
                                              r"beyond the range of fp16 \(largest 65504\)") as e:
        export_comfy(src, tmp_path / "stock16.safetensors", dtype="fp16")
    assert "Export in fp32" in str(e.value)
    assert not (tmp_path / "stock16.safetensors").exists()
    with pytest.raises(LoraFormatError, match=rf"big16\.safetensors: {p}\.lora_B\.relation\.weight.*fp16"):
        formats.save_triplet(tmp_path / "big16.safetensors", big, dtype=torch.float16)
    assert formats.load_lora_file(export_comfy(src, tmp_path / "stock_bf16.safetensors", dtype="bf16"))  # bf16: fits
    nan = lora.only(lora.adapters)
    nan.weights["ffn"] = {k: (a, torch.full_like(b, float("nan"))) for k, (a, b) in nan.weights["ffn"].items()}
    with pytest.raises(LoraFormatError, match="non-finite"):
        formats.save_relation_only(tmp_path / "nan.safetensors", nan)
    assert not (tmp_path / "nan.safetensors").exists()
