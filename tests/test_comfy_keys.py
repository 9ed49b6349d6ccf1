"""LoraSet <-> genmo/ComfyUI Mochi keys and base-weight conversion, without ComfyUI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dreamrelation_core.errors import KeyLayoutError
from dreamrelation_core.lora import genmo as comfy_keys
from dreamrelation_core.lora.files import LoraFormatError
from dreamrelation_core.lora.layout import INFERENCE_ADAPTERS, LoraSet, module_path, parse_module_path
from dreamrelation_core.mochi import dit_keys as mochi_convert
from fixtures.loras import random_lora_set

D, DY, R = 12, 8, 3  # visual width, text width, rank


def random_triplet(blocks: int = 2, alpha: float = 6.0, subject_gain: float = 1.0) -> LoraSet:
    """A random triplet at this file's tiny widths, rank R (alpha 6: scale 2)."""
    return random_lora_set(blocks, D, DY, rank=R, alpha=alpha, subject_gain=subject_gain)


def _fused_base(blocks: int) -> dict[str, torch.Tensor]:
    """Hand-built genmo weights: qkv_x = [W_q; W_k; W_v] etc."""
    w = {}
    for i in range(blocks):
        w[f"blocks.{i}.attn.qkv_x.weight"] = torch.randn(3 * D, D)
        w[f"blocks.{i}.attn.qkv_y.weight"] = torch.randn(3 * D, DY)
        w[f"blocks.{i}.attn.proj_x.weight"] = torch.randn(D, D)
        if i < blocks - 1:
            w[f"blocks.{i}.attn.proj_y.weight"] = torch.randn(DY, D)
    return w


def _apply(base: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Apply a genmo-key LoRA the way ComfyUI does: W + strength * alpha / rank * up @ down."""
    out = {k: v.clone() for k, v in base.items()}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            stem = k[: -len(".lora_A.weight")]
            down, up = sd[k].float(), sd[f"{stem}.lora_B.weight"].float()
            alpha = sd[f"{stem}.alpha"].item() / down.shape[0]
            out[f"{stem}.weight"] += strength * alpha * (up @ down)
    return out


def test_q_and_k_deltas_land_on_their_rows_only():
    ls = random_triplet(blocks=2)
    base = _fused_base(2)
    patched = _apply(base, comfy_keys.comfy_state_dict(ls))
    for i in range(2):
        for fused, (q, k, _v) in (("qkv_x", ("to_q", "to_k", "to_v")), ("qkv_y", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            key = f"blocks.{i}.attn.{fused}.weight"
            diff = patched[key] - base[key]
            for slot, sub in enumerate((q, k)):
                path = module_path(i, sub)
                expect = ls.delta("relation", path) if path in ls.weights["relation"] else torch.zeros(D, diff.shape[1])
                torch.testing.assert_close(diff[slot * D:(slot + 1) * D], expect, rtol=1e-5, atol=1e-5)
            assert torch.equal(diff[2 * D:], torch.zeros(D, diff.shape[1])), "V rows must stay untouched"
        torch.testing.assert_close(patched[f"blocks.{i}.attn.proj_x.weight"] - base[f"blocks.{i}.attn.proj_x.weight"],
                                   ls.delta("ffn", module_path(i, "to_out.0")), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched["blocks.0.attn.proj_y.weight"] - base["blocks.0.attn.proj_y.weight"],
                               ls.delta("ffn", module_path(0, "to_add_out")), rtol=1e-5, atol=1e-5)


def test_fused_rank_layout_and_alpha():
    ls = random_triplet(blocks=2, alpha=6.0)  # scale 2: must be folded into B, file alpha = rank
    sd = comfy_keys.comfy_state_dict(ls)
    assert sd["blocks.0.attn.qkv_x.lora_A.weight"].shape == (2 * R, D)
    assert sd["blocks.0.attn.qkv_x.lora_B.weight"].shape == (3 * D, 2 * R)
    assert sd["blocks.0.attn.qkv_x.alpha"].item() == 2 * R
    # last block: no text-query LoRA, so the fused text LoRA holds only K (rank r)
    assert sd["blocks.1.attn.qkv_y.lora_A.weight"].shape == (R, DY)
    assert "blocks.1.attn.proj_y.lora_A.weight" not in sd
    up = sd["blocks.0.attn.qkv_x.lora_B.weight"]
    assert torch.equal(up[:D, R:], torch.zeros(D, R)) and torch.equal(up[D:2 * D, :R], torch.zeros(D, R))


def dense_deltas(lora: LoraSet) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Row-offset form of relation + ffn: genmo weight key (`blocks.i.attn.qkv_x.weight`) -> list of
    (first row, dense delta) per sub-module; what the fused LoRA must add, written out plainly."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for adapter in INFERENCE_ADAPTERS:
        for path in lora.weights.get(adapter, {}):
            block, sub = parse_module_path(path)
            module, slot = comfy_keys.GENMO_MODULE[sub]
            delta = lora.delta(adapter, path)
            row = 0 if slot is None else slot * delta.shape[0]
            out.setdefault(f"{comfy_keys.genmo_name(block, module)}.weight", []).append((row, delta))
    return out


def test_row_offset_form_equals_fused_form():
    ls = random_triplet(blocks=2)
    base = _fused_base(2)
    fused = _apply(base, comfy_keys.comfy_state_dict(ls))
    rows = {k: v.clone() for k, v in base.items()}
    for key, parts in dense_deltas(ls).items():
        for row, delta in parts:
            rows[key][row:row + delta.shape[0]] += delta
    for k in base:
        torch.testing.assert_close(rows[k], fused[k], rtol=1e-5, atol=1e-5)


def test_subject_loras_never_mapped():
    big = random_triplet(blocks=2, subject_gain=1e6)
    small = random_triplet(blocks=2)
    small.weights["relation"], small.weights["ffn"] = big.weights["relation"], big.weights["ffn"]
    a, b = comfy_keys.comfy_state_dict(big), comfy_keys.comfy_state_dict(small)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max(t.abs().max().item() for t in a.values()) < 1e3


def test_genmo_roundtrip_gives_same_deltas_and_rank():
    ls = random_triplet(blocks=3, alpha=6.0)
    back = comfy_keys.genmo_to_lora_set(comfy_keys.comfy_state_dict(ls), source="x.safetensors")
    assert back.metadata["format"] == comfy_keys.FORMAT_GENMO
    assert set(back.adapters) == {"relation", "ffn"}
    assert back.rank == {"relation": R, "ffn": R}  # zero columns of the block-diagonal B dropped
    for adapter in ("relation", "ffn"):
        assert back.weights[adapter].keys() == ls.weights[adapter].keys()
        for p in ls.weights[adapter]:
            torch.testing.assert_close(back.delta(adapter, p), ls.delta(adapter, p), rtol=1e-5, atol=1e-5)
    assert comfy_keys.is_genmo_lora(comfy_keys.comfy_state_dict(ls).keys())


@pytest.mark.parametrize("spelling", ["comfy", "genmo_trainer", "kohya"])
def test_genmo_reader_accepts_stock_spellings_and_reports_v(spelling: str):
    down, up = torch.randn(4, D), torch.randn(3 * D, 4)
    names = {
        "comfy": ("diffusion_model.blocks.0.attn.qkv_x.lora_A.weight", "diffusion_model.blocks.0.attn.qkv_x.lora_B.weight", "diffusion_model.blocks.0.attn.qkv_x.alpha"),
        "genmo_trainer": ("blocks.0.attn.qkv_x.lora_A", "blocks.0.attn.qkv_x.lora_B", "blocks.0.attn.qkv_x.alpha"),
        "kohya": ("lora_unet_blocks_0_attn_qkv_x.lora_down.weight", "lora_unet_blocks_0_attn_qkv_x.lora_up.weight", "lora_unet_blocks_0_attn_qkv_x.alpha"),
    }[spelling]
    sd = {names[0]: down, names[1]: up, names[2]: torch.tensor(8.0)}
    assert comfy_keys.is_genmo_lora(sd)
    ls = comfy_keys.genmo_to_lora_set(sd, source="plain.safetensors")
    torch.testing.assert_close(ls.delta("relation", module_path(0, "to_q")), 2.0 * up[:D] @ down)
    torch.testing.assert_close(ls.delta("relation", module_path(0, "to_k")), 2.0 * up[D:2 * D] @ down)
    report = json.loads(ls.metadata["report"])
    assert report["dropped"] == ["blocks.0.attn.qkv_x to_v rows (V: not part of a relation LoRA)"]


def test_is_genmo_lora_rejects_other_layouts():
    assert not comfy_keys.is_genmo_lora(["transformer_blocks.0.attn1.to_q.lora_A.relation.weight"])
    assert not comfy_keys.is_genmo_lora(["blocks.0.attn.to_q_x.lora_A.relation"])
    assert not comfy_keys.is_genmo_lora([])


def test_check_against_model_names_key_and_shapes():
    ls = random_triplet(blocks=2)
    fused = comfy_keys.fused_loras(ls)
    good = {k: tuple(v.shape) for k, v in _fused_base(2).items()}
    comfy_keys.check_against_model(fused, good, "rel.safetensors")
    wrong = dict(good, **{"blocks.1.attn.qkv_y.weight": (3 * D, DY + 1)})
    with pytest.raises(LoraFormatError, match=r"rel\.safetensors: key blocks\.1\.attn\.qkv_y.*\[36, 8\].*\[36, 9\]"):
        comfy_keys.check_against_model(fused, wrong, "rel.safetensors")
    short = {k: v for k, v in good.items() if not k.startswith("blocks.1.")}
    with pytest.raises(LoraFormatError, match=r"rel\.safetensors: key blocks\.1\.attn\.\w+ targets .*the LoRA has 2 blocks, the model has 1 Mochi blocks"):
        comfy_keys.check_against_model(fused, short, "rel.safetensors")


@pytest.mark.parametrize(
    "sd, message",
    [
        ({"blocks.0.attn.qkv_x.lora_A.weight": torch.zeros(2, D)}, r"f\.st: blocks\.0\.attn\.qkv_x has no lora_B"),
        ({"blocks.0.attn.qkv_x.lora_B.weight": torch.zeros(3 * D, 2)}, r"f\.st: blocks\.0\.attn\.qkv_x has no lora_A"),
        ({"blocks.0.attn.qkv_x.lora_A.weight": torch.zeros(2, D), "blocks.0.attn.qkv_x.lora_B.weight": torch.zeros(3 * D, 3)},
         r"lora_A \(2, 12\) and lora_B \(36, 3\) are not a LoRA pair"),
        ({"blocks.0.attn.qkv_x.lora_A.weight": torch.zeros(2, D), "blocks.0.attn.qkv_x.lora_B.weight": torch.zeros(35, 2)},
         r"lora_B \(35, 2\) has 35 rows, not divisible"),
        ({"blocks.0.mlp_x.w1.lora_A.weight": torch.zeros(2, D)}, r"key 'blocks\.0\.mlp_x\.w1\.lora_A\.weight' \(2, 12\) is not a Mochi attention LoRA key"),
        ({"blocks.0.attn.qkv_x.lora_A.weight": torch.full((2, D), float("nan")), "blocks.0.attn.qkv_x.lora_B.weight": torch.ones(3 * D, 2)},
         r"non-finite"),
        ({"blocks.0.attn.qkv_x.lora_A.weight": torch.ones(2, D), "blocks.0.attn.qkv_x.lora_B.weight": torch.zeros(3 * D, 2)},
         r"no Q, K or output-projection LoRA weights"),
        ({"blocks.0.attn.qkv_x.lora_A.weight": torch.ones(2, D), "blocks.0.attn.qkv_x.lora_A": torch.ones(2, D)},
         r"duplicates the down weight"),
    ],
)
def test_genmo_reader_errors(sd, message):
    with pytest.raises(LoraFormatError, match=message):
        comfy_keys.genmo_to_lora_set(sd, source="f.st")


def test_fuse_errors_name_module_and_shapes():
    ls = random_triplet(blocks=1)
    a, b = ls.weights["relation"][module_path(0, "to_k")]
    ls.weights["relation"][module_path(0, "to_k")] = (a, torch.randn(D + 2, R))
    with pytest.raises(LoraFormatError, match=r"my\.lora: LoRAs fused into blocks\.0\.attn\.qkv_x disagree in width: .*to_k A \(3, 12\) B \(14, 3\)"):
        comfy_keys.fused_loras(ls, source="my.lora")
    ls.weights["relation"][module_path(0, "to_k")] = (a, torch.randn(D, R + 1))
    with pytest.raises(LoraFormatError, match=r"to_k \(relation\): A \(3, 12\) and B \(12, 4\) are not a LoRA pair"):
        comfy_keys.fused_loras(ls, source="my.lora")
    only_subjects = random_triplet(blocks=1).only(("subject1", "subject2"))
    with pytest.raises(LoraFormatError, match=r"subj\.safetensors: no relation / ffn LoRA weights to export"):
        comfy_keys.comfy_state_dict(only_subjects, source="subj.safetensors")


def test_save_comfy_lora_is_atomic_and_loadable(tmp_path):
    from safetensors.torch import load_file, safe_open

    ls = random_triplet(blocks=2)
    out = comfy_keys.save_comfy_lora(tmp_path / "rel.safetensors", ls, dtype=torch.bfloat16, source="in.safetensors")
    sd = load_file(out)
    assert sd["blocks.0.attn.qkv_x.lora_B.weight"].dtype == torch.bfloat16
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == comfy_keys.FORMAT_COMFY and json.loads(meta["dropped_adapters"]) == ["subject1", "subject2"]
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(LoraFormatError):
        comfy_keys.save_comfy_lora(bad, ls.only(("subject1",)), source="in")
    assert not bad.exists() and [p.name for p in tmp_path.iterdir()] == ["rel.safetensors"]


def test_reference_checkpoint_maps_to_fused_rows(tmp_path):
    """A reference `model_<step>.lora.pt` (docs/method.md "Reference checkpoint format") through formats -> our genmo keys."""
    from dreamrelation_core.lora import files as formats

    n, r = 2, 2
    sd = {}
    for i in range(n):
        for mod, fi, fo in (("to_q_x", D, D), ("to_k_x", D, D), ("to_q_y", DY, D), ("to_k_y", DY, D)):
            sd[f"blocks.{i}.attn.{mod}.lora_A.relation"] = torch.randn(r, fi).bfloat16()
            sd[f"blocks.{i}.attn.{mod}.lora_B.relation"] = torch.randn(fo, r).bfloat16()
        for mod, fi, fo in (("to_v_x", D, D), ("to_v_y", DY, D)):
            for s in ("subject1", "subject2"):
                sd[f"blocks.{i}.attn.{mod}.lora_A.{s}"] = torch.randn(r, fi).bfloat16()
                sd[f"blocks.{i}.attn.{mod}.lora_B.{s}"] = torch.randn(fo, r).bfloat16()
        sd[f"blocks.{i}.attn.proj_x.lora_A"] = torch.randn(r, D).bfloat16()
        sd[f"blocks.{i}.attn.proj_x.lora_B"] = torch.randn(D, r).bfloat16()
        if i < n - 1:
            sd[f"blocks.{i}.attn.proj_y.lora_A"] = torch.randn(r, D).bfloat16()
            sd[f"blocks.{i}.attn.proj_y.lora_B"] = torch.randn(DY, r).bfloat16()
    kwargs = dict(qkv_proj_lora_rank=r, qkv_proj_lora_alpha=4, out_proj_lora_rank=r, out_proj_lora_alpha=2,
                  q_lora_names=["relation"], k_lora_names=["relation"], v_lora_names=["subject1", "subject2"],
                  test_lora_names=["relation"], separate_qkv_x=True, separate_qkv_y=True)
    path = tmp_path / "model_2000.lora.pt"
    torch.save({"state_dict": sd, "kwargs": kwargs}, path)
    try:
        ls = formats.load_lora_file(path)
    except LoraFormatError as e:  # pragma: no cover - depends on the reference importer's rules
        pytest.fail(f"reference import failed: {e}")
    base = _fused_base(n)
    patched = _apply(base, comfy_keys.comfy_state_dict(ls, source=str(path)))
    qx = sd["blocks.0.attn.to_q_x.lora_B.relation"].float() @ sd["blocks.0.attn.to_q_x.lora_A.relation"].float()
    ky = sd["blocks.1.attn.to_k_y.lora_B.relation"].float() @ sd["blocks.1.attn.to_k_y.lora_A.relation"].float()
    px = sd["blocks.1.attn.proj_x.lora_B"].float() @ sd["blocks.1.attn.proj_x.lora_A"].float()
    d0 = patched["blocks.0.attn.qkv_x.weight"] - base["blocks.0.attn.qkv_x.weight"]
    d1 = patched["blocks.1.attn.qkv_y.weight"] - base["blocks.1.attn.qkv_y.weight"]
    torch.testing.assert_close(d0[:D], 2.0 * qx, rtol=1e-4, atol=1e-4)  # qkv scale 4 / 2
    torch.testing.assert_close(d1[D:2 * D], 2.0 * ky, rtol=1e-4, atol=1e-4)
    assert torch.equal(d0[2 * D:], torch.zeros(D, D)) and torch.equal(d1[2 * D:], torch.zeros(D, DY))
    torch.testing.assert_close(patched["blocks.1.attn.proj_x.weight"] - base["blocks.1.attn.proj_x.weight"], 1.0 * px,
                               rtol=1e-4, atol=1e-4)  # out scale 2 / 2


def test_export_cli(tmp_path):
    from safetensors.torch import load_file

    from dreamrelation_core.lora import files as formats

    ls = random_triplet(blocks=2)
    src = formats.save_triplet(tmp_path / "trip.safetensors", ls)
    out = tmp_path / "loras" / "rel_mochi.safetensors"
    proc = subprocess.run([sys.executable, "-m", "dreamrelation_core", "export-comfy", str(src), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    back = comfy_keys.genmo_to_lora_set(load_file(out), source=str(out))
    for p in ls.weights["relation"]:
        torch.testing.assert_close(back.delta("relation", p), ls.delta("relation", p), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# base weights


def test_base_conversion_roundtrip_and_layout():
    from dreamrelation_core.mochi.tiny import tiny_transformer

    model = tiny_transformer(num_layers=3)
    sd = model.state_dict()
    genmo = mochi_convert.diffusers_to_genmo(sd, prefix="diffusion_model.")
    assert "diffusion_model.blocks.2.attn.qkv_x.weight" in genmo and "diffusion_model.blocks.2.attn.proj_y.weight" not in genmo
    qkv = genmo["diffusion_model.blocks.1.attn.qkv_y.weight"]
    d = sd["transformer_blocks.1.attn1.add_q_proj.weight"].shape[0]
    assert torch.equal(qkv[d:2 * d], sd["transformer_blocks.1.attn1.add_k_proj.weight"])
    w1 = genmo["diffusion_model.blocks.0.mlp_x.w1.weight"]
    proj = sd["transformer_blocks.0.ff.net.0.proj.weight"]
    assert torch.equal(w1[: w1.shape[0] // 2], proj[proj.shape[0] // 2:])  # halves swapped
    back = mochi_convert.genmo_to_diffusers(genmo)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert len(genmo) == len(sd) - 3 * 3 * 2 + 3 * 2  # q, k, v of both streams fused per block


def test_base_conversion_errors():
    from dreamrelation_core.mochi.tiny import tiny_transformer

    sd = tiny_transformer(num_layers=2).state_dict()
    genmo = mochi_convert.diffusers_to_genmo(sd)
    with pytest.raises(KeyLayoutError, match=r"key 'blocks\.0\.attn\.qkv_y\.weight' missing"):
        mochi_convert.genmo_to_diffusers({k: v for k, v in genmo.items() if k != "blocks.0.attn.qkv_y.weight"})
    with pytest.raises(KeyLayoutError, match=r"unexpected key.*'blocks\.0\.extra'"):
        mochi_convert.genmo_to_diffusers({**genmo, "blocks.0.extra": torch.zeros(1)})
    with pytest.raises(KeyLayoutError, match=r"no keys for blocks\.1 \(between blocks\.0 and blocks\.2\)"):
        mochi_convert.genmo_to_diffusers({**{k: v for k, v in genmo.items() if not k.startswith("blocks.1.")},
                                          "blocks.2.attn.qkv_x.weight": torch.zeros(3, 1)})
    with pytest.raises(KeyLayoutError, match="no 'transformer_blocks.N.' keys"):
        mochi_convert.diffusers_to_genmo({"x": torch.zeros(1)})
