"""LoRA files: our triplet and relation-only export round-trip; reference import; bad files."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core.errors import TrainingError
from dreamrelation_core.generate import add_relation_lora
from dreamrelation_core.lora import files as formats
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.lora.files import LoraFormatError
from dreamrelation_core.mochi.tiny import tiny_transformer

D, DY, N = 64, 32, 3  # tiny visual width, text width, blocks


@pytest.fixture(scope="module")
def lora():
    model = triplet.add_triplet(tiny_transformer(num_layers=N, text_hidden=DY), rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in triplet.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))
    return triplet.to_lora_set(model)


def same(a, b, dtype=torch.float32):
    assert a.adapters == b.adapters or set(a.adapters) == set(b.adapters)
    for ad in a.adapters:
        assert a.scales[ad] == b.scales[ad]
        assert set(a.weights[ad]) == set(b.weights[ad])
        for p, (x, y) in a.weights[ad].items():
            assert torch.equal(x.to(dtype).float(), b.weights[ad][p][0]) and torch.equal(y.to(dtype).float(), b.weights[ad][p][1])


def test_triplet_round_trip(tmp_path, lora):
    path = formats.save_triplet(tmp_path / "t.safetensors", lora, step=7, config={"rank": 4})
    back = formats.load_lora_file(path)
    same(lora, back)
    assert back.metadata["format"] == formats.FORMAT_TRIPLET and back.metadata["step"] == "7"
    assert json.loads(back.metadata["config"]) == {"rank": 4}
    assert back.rank == {a: 4 for a in lora.adapters} and back.scales["relation"] == 0.5
    bf = formats.load_lora_file(formats.save_triplet(tmp_path / "b.safetensors", lora, dtype=torch.bfloat16))
    same(lora, bf, torch.bfloat16)


def test_relation_only_drops_subjects(tmp_path, lora):
    back = formats.load_lora_file(formats.save_relation_only(tmp_path / "r.safetensors", lora))
    assert set(back.adapters) == {"relation", "ffn"}
    same(lora.only(("relation", "ffn")), back)
    with pytest.raises(LoraFormatError, match="needs all four adapters"):
        formats.save_triplet(tmp_path / "x.safetensors", back)
    assert not (tmp_path / "x.safetensors").exists()


def reference_state(rank=4, out_rank=2, seed=0):
    """A reference checkpoint (docs/method.md "Reference checkpoint format"; bf16), tiny widths, N blocks."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    sd = {}
    for i in range(N):
        pre = f"blocks.{i}.attn."
        for mod, din in (("to_q_x", D), ("to_k_x", D), ("to_q_y", DY), ("to_k_y", DY)):
            sd[pre + f"{mod}.lora_A.relation"] = r(rank, din)
            sd[pre + f"{mod}.lora_B.relation"] = r(D, rank)
        for mod, din in (("to_v_x", D), ("to_v_y", DY)):
            for s in ("subject1", "subject2"):
                sd[pre + f"{mod}.lora_A.{s}"] = r(rank, din)
                sd[pre + f"{mod}.lora_B.{s}"] = r(D, rank)
        sd[pre + "proj_x.lora_A"] = r(out_rank, D)
        sd[pre + "proj_x.lora_B"] = r(D, out_rank)
        if i < N - 1:  # block 47 (here: the last) has no proj_y LoRA
            sd[pre + "proj_y.lora_A"] = r(out_rank, D)
            sd[pre + "proj_y.lora_B"] = r(DY, out_rank)
    kwargs = {"qkv_proj_lora_rank": rank, "qkv_proj_lora_alpha": 2 * rank, "out_proj_lora_rank": out_rank,
              "out_proj_lora_alpha": 3.0, "q_lora_names": ["relation"], "k_lora_names": ["relation"],
              "v_lora_names": ["subject1", "subject2"], "test_lora_names": ["relation"]}
    return sd, kwargs


def check_reference(lora, sd):
    assert lora.metadata["format"] == formats.FORMAT_REFERENCE
    assert lora.rank == {"relation": 4, "subject1": 4, "subject2": 4, "ffn": 2}
    assert lora.scales["relation"] == 2.0 and lora.scales["ffn"] == 1.5  # read from kwargs, not assumed
    a, b = lora.weights["relation"]["transformer_blocks.1.attn1.add_k_proj"]
    assert torch.equal(a, sd["blocks.1.attn.to_k_y.lora_A.relation"].float())
    assert torch.equal(b, sd["blocks.1.attn.to_k_y.lora_B.relation"].float())
    a, b = lora.weights["ffn"]["transformer_blocks.0.attn1.to_add_out"]
    assert torch.equal(b, sd["blocks.0.attn.proj_y.lora_B"].float())
    assert "transformer_blocks.2.attn1.to_add_out" not in lora.weights["ffn"]
    # the last block's text-query LoRA is dropped and reported
    assert f"transformer_blocks.{N - 1}.attn1.add_q_proj" not in lora.weights["relation"]
    report = json.loads(lora.metadata["report"])
    assert any("to_q_y" in d for d in report["dropped"]) and report["applied"]["subject1"] == 2 * N


def test_reference_pt_import(tmp_path):
    sd, kwargs = reference_state()
    path = tmp_path / "model_1800.lora.pt"
    torch.save({"state_dict": sd, "kwargs": kwargs}, path)
    lora = formats.load_lora_file(path)
    check_reference(lora, sd)
    # applied to the diffusers model, the relation delta is scale * B @ A of the file
    model = add_relation_lora(tiny_transformer(num_layers=N, text_hidden=DY), lora)
    layer = model.transformer_blocks[0].attn1.to_k
    x = torch.randn(2, D)
    delta = layer(x) - layer.base_layer(x)
    a, b = sd["blocks.0.attn.to_k_x.lora_A.relation"].float(), sd["blocks.0.attn.to_k_x.lora_B.relation"].float()
    assert torch.allclose(delta, 2.0 * x @ a.T @ b.T, atol=1e-4)
    # subjects dropped at inference: to_v carries no LoRA effect
    v = model.transformer_blocks[0].attn1.to_v
    assert torch.equal(v(x), v.base_layer(x))


def test_reference_safetensors_import(tmp_path):
    sd, kwargs = reference_state()
    path = tmp_path / "model_2000.lora.safetensors"
    save_file(sd, str(path), metadata={"kwargs": json.dumps(kwargs)})
    check_reference(formats.load_lora_file(path), sd)


def expect_error(path, *fragments):
    with pytest.raises(LoraFormatError) as e:
        formats.load_lora_file(path)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    return str(e.value)


def test_bad_files(tmp_path, lora):
    # not a LoRA: a base-model-like state dict
    p = tmp_path / "base.safetensors"
    save_file({"blocks.0.attn.qkv_x.weight": torch.zeros(9, 3)}, str(p))
    expect_error(p, "base.safetensors", "blocks.0.attn.qkv_x.weight", "(9, 3)")
    # another base model
    p = tmp_path / "other.safetensors"
    good = formats.save_triplet(tmp_path / "good.safetensors", lora)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(sd, str(p), metadata={**meta, "base_model": "hunyuan-video"})
    expect_error(p, "other.safetensors", "hunyuan-video")
    # rank mismatch between metadata and shapes
    p = tmp_path / "rank.safetensors"
    save_file(sd, str(p), metadata={**meta, "rank": json.dumps({a: 8 for a in json.loads(meta["rank"])})})
    expect_error(p, "rank.safetensors", "rank 4", "states rank 8")
    # missing key
    p = tmp_path / "missing.safetensors"
    key = "transformer_blocks.1.attn1.to_q.lora_B.relation.weight"
    save_file({k: v for k, v in sd.items() if k != key}, str(p), metadata=meta)
    expect_error(p, "missing.safetensors", key)
    # a block missing entirely for an adapter
    p = tmp_path / "block.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("transformer_blocks.1.attn1.to_out.0")}, str(p), metadata=meta)
    expect_error(p, "block.safetensors", "'ffn'", "transformer_blocks.1.attn1.to_out.0")
    # shape from another model width
    p = tmp_path / "width.safetensors"
    k = "transformer_blocks.2.attn1.to_q.lora_A.relation.weight"
    save_file({**sd, k: torch.zeros(4, 128)}, str(p), metadata=meta)
    expect_error(p, "width.safetensors", "to_q", "128")
    # truncated
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expect_error(p, "trunc.safetensors", "not a readable safetensors")
    # NaN / inf weights (written past our own writer, which refuses them)
    for bad in (float("nan"), float("inf")):
        p = tmp_path / "nonfinite.safetensors"
        save_file({**sd, k: torch.full_like(sd[k], bad)}, str(p), metadata=meta)
        expect_error(p, "nonfinite.safetensors", k.replace("lora_A", "lora_A/B"), "non-finite")


def test_reference_bad_files(tmp_path):
    sd, kwargs = reference_state()
    p = tmp_path / "noalpha.lora.pt"
    torch.save({"state_dict": sd, "kwargs": {k: v for k, v in kwargs.items() if k != "qkv_proj_lora_alpha"}}, p)
    expect_error(p, "noalpha.lora.pt", "qkv_proj_lora_alpha")
    p = tmp_path / "rank.lora.pt"
    torch.save({"state_dict": sd, "kwargs": {**kwargs, "qkv_proj_lora_rank": 16}}, p)
    expect_error(p, "rank.lora.pt", "rank 4", "states rank 16")
    p = tmp_path / "plain.lora.pt"
    torch.save(sd, p)
    expect_error(p, "plain.lora.pt", "'state_dict'")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.lora.pt"
    torch.save({"state_dict": {}, "kwargs": _Evil(marker)}, p)
    msg = expect_error(p, "evil.lora.pt", "code is never run", "posix.system")
    assert "weights_only" not in msg  # torch's advice to load it with weights_only=False is not passed on
    assert not marker.exists()


def test_code_running_pickles_are_refused_everywhere_without_running(tmp_path):
    """Training checkpoints and model weights too (LoRA files: the test above)."""
    from dreamrelation_core.errors import ModelFileError
    from dreamrelation_core.statedict import read_state_dict
    from dreamrelation_core.training.trainer import load_checkpoint

    marker = tmp_path / "pwned"
    p = tmp_path / "checkpoint_000010.pt"
    torch.save({"format": "dreamrelation.checkpoint", "step": 10, "config": _Evil(marker)}, p)
    with pytest.raises(TrainingError, match=r"checkpoint_000010\.pt: not a readable training checkpoint .*posix\.system"):
        load_checkpoint(p)
    with pytest.raises(ModelFileError, match=r"not a readable weights-only checkpoint for the SAM .*posix\.system") as e:
        read_state_dict(p, "SAM checkpoint")
    assert "weights_only" not in str(e.value) and not marker.exists()


def test_failed_write_leaves_no_file(tmp_path, lora, monkeypatch):
    from dreamrelation_core.errors import DiskFullError
    from fixtures.faults import fill_disk

    fill_disk(monkeypatch, limit=100)  # a disk that is full after 100 bytes of the file
    with pytest.raises(DiskFullError, match=r"t\.safetensors: not written, the disk is full"):
        formats.save_triplet(tmp_path / "t.safetensors", lora)
    assert list(tmp_path.iterdir()) == []


def test_describe(lora, tmp_path):
    text = formats.describe(formats.load_lora_file(formats.save_relation_only(tmp_path / "r.safetensors", lora)))
    assert "relation: " in text and "subject1" not in text and "rank 4" in text
