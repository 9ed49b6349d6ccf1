"""Base model loading: a genmo / ComfyUI single file becomes the same diffusers model."""

import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo
from dreamrelation_core.mochi.loading import load_transformer
from dreamrelation_core.mochi.tiny import tiny_transformer


def test_comfy_file_loads_without_config(tmp_path):
    ref = tiny_transformer(num_layers=3, text_hidden=32, seed=4)
    sd = diffusers_to_genmo(ref.state_dict(), prefix="model.diffusion_model.")
    path = tmp_path / "mochi_preview_dit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_transformer(str(path))
    assert len(model.transformer_blocks) == 3 and model.config.pooled_projection_dim == 32
    x, y = torch.randn(1, 12, 2, 8, 8), torch.randn(1, 16, 32)
    kw = dict(timestep=torch.tensor([300.0]), encoder_attention_mask=torch.ones(1, 16, dtype=torch.bool), return_dict=False)
    with torch.no_grad():
        assert torch.equal(model(x, y, **kw)[0], ref(x, y, **kw)[0])


def test_bad_base_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_transformer(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "broken.safetensors"
    sd = diffusers_to_genmo(tiny_transformer(num_layers=2).state_dict())
    del sd["blocks.1.attn.qkv_x.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bad))
    with pytest.raises(ValueError, match=r"broken.safetensors.*blocks.1.attn.qkv_x.weight"):
        load_transformer(str(bad))
    other = tmp_path / "diffusers_single.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_transformer(num_layers=2).state_dict().items()}, str(other))
    with pytest.raises(FileNotFoundError, match="transformer_config"):
        load_transformer(str(other))
