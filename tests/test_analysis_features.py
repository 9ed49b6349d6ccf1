"""Q/K/V feature maps of the visual tokens on the tiny diffusers Mochi, with and without a LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreamrelation_core.analysis.features import feature_maps_with_lora, qkv_feature_maps, write_feature_report
from dreamrelation_core.mochi.tiny import tiny_transformer
from fixtures.loras import random_lora_set

T, H, W = 3, 8, 8  # latent frames and size: tokens (3, 4, 4) after patch 2


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 12, T, H, W, generator=g), torch.randn(1, 16, 32, generator=g),
            torch.ones(1, 16, dtype=torch.bool))


def _random_lora(num_layers: int, seed: int = 1):
    return random_lora_set(num_layers, 64, 64, rank=4, gain=0.2, seed=seed)


def test_maps_follow_token_order_time_height_width() -> None:
    # one block: q/k/v are token-wise functions of the input, so a change at one latent pixel
    # shows at exactly one token: (t, y // 2, x // 2)
    model = tiny_transformer(num_layers=1)
    z, y, m = _inputs()
    before = qkv_feature_maps(model, z, y, m, average_time=False)
    z2 = z.clone()
    z2[0, :, 1, 5, 2] += 3.0
    after = qkv_feature_maps(model, z2, y, m, average_time=False)
    for role in "qkv":
        assert before[role].shape == (T, H // 2, W // 2)
        changed = ((after[role] - before[role]).abs() > 1e-6).nonzero().tolist()
        assert changed == [[1, 2, 1]], role
    averaged = qkv_feature_maps(model, z, y, m)
    assert averaged["q"].shape == (H // 2, W // 2)
    assert torch.allclose(averaged["q"], before["q"].mean(0), atol=1e-6)


def test_maps_average_over_layers_and_hook_only_joint_attention() -> None:
    model = tiny_transformer(num_layers=2)
    z, y, m = _inputs()
    both = qkv_feature_maps(model, z, y, m, reduce="norm")
    l0 = qkv_feature_maps(model, z, y, m, reduce="norm", layers=[0])
    l1 = qkv_feature_maps(model, z, y, m, reduce="norm", layers=[1])
    for role in "qkv":
        assert torch.allclose(both[role], (l0[role] + l1[role]) / 2, atol=1e-5)
        assert float(both[role].min()) >= 0.0  # norms
    assert not any(mod._forward_hooks for mod in model.modules())  # hooks removed
    with pytest.raises(ValueError, match="no joint-attention"):
        qkv_feature_maps(model, z, y, m, layers=[7])


def test_relation_lora_changes_q_and_k_but_not_v(tmp_path: Path) -> None:
    model = tiny_transformer(num_layers=1)
    z, y, m = _inputs()
    maps = feature_maps_with_lora(model, _random_lora(1), z, y, m, sigma=0.3)
    assert set(maps) == {"base", "lora"}
    for role in "qk":  # relation adapters sit on to_q / to_k
        assert float((maps["lora"][role] - maps["base"][role]).abs().max()) > 1e-3
    # to_v carries only subject adapters, never loaded at inference; its block-0 input is unchanged
    assert torch.allclose(maps["lora"]["v"], maps["base"]["v"], atol=1e-6)
    again = qkv_feature_maps(model, z, y, m, sigma=0.3)  # adapters switched off afterwards
    assert torch.allclose(again["q"], maps["base"]["q"], atol=1e-6)
    paths = write_feature_report(maps, tmp_path)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    with safe_open(str(paths["maps"]), "pt") as f:
        assert set(f.keys()) == {f"{run}.{r}" for run in ("base", "lora") for r in "qkv"}
        assert torch.equal(f.get_tensor("lora.k"), maps["lora"]["k"])


def test_cli_feature_maps_from_a_prepared_clip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from dreamrelation_core.cli import main
    from dreamrelation_core.data.cache import CACHE_FORMAT
    from dreamrelation_core.lora.files import save_relation_only
    from fixtures.analysis_models import write_genmo

    base = write_genmo(tmp_path / "base.safetensors", tiny_transformer(num_layers=2).state_dict(), dtype=torch.float32)
    lora = save_relation_only(tmp_path / "rel.safetensors", _random_lora(2))
    g = torch.Generator().manual_seed(0)
    clip = {"mean": torch.randn(12, T, H, W, generator=g), "logvar": torch.full((12, T, H, W), -4.0),
            "y_feat": torch.randn(16, 32, generator=g), "y_mask": torch.ones(16, dtype=torch.bool),
            "mask1": torch.zeros(T, H, W), "mask2": torch.zeros(T, H, W)}
    save_file(clip, str(tmp_path / "clip.safetensors"), metadata={"format": CACHE_FORMAT, "name": "clip"})
    out = tmp_path / "out"
    assert main(["analyze-lora", str(lora), "--base", str(base), "--out", str(out), "--rank", "8",
                 "--clip", str(tmp_path / "clip.safetensors"), "--sigma", "0.4"]) == 0
    with safe_open(str(out / "qkv_features.safetensors"), "pt") as f:
        assert f.get_tensor("base.q").shape == (H // 2, W // 2)
        assert not torch.equal(f.get_tensor("base.q"), f.get_tensor("lora.q"))
    assert (out / "qkv_features.png").is_file() and (out / "lora_report.json").is_file()
