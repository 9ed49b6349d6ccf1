"""Wan's transformer in the core: latent rules, ComfyUI <-> diffusers keys, the loader, and parity
with ComfyUI's own Wan (tiny random models, CPU; docs/method.md "Wan 2.1 / 2.2")."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core import fp8
from dreamrelation_core.errors import DatasetError, KeyLayoutError, ModelFileError
from dreamrelation_core.wan import dit_keys, latents, loading, tiny
from fixtures import wan as fw

# ---------------------------------------------------------------------------------------------
# latent format and time convention


def test_frame_and_size_rules() -> None:
    assert [latents.latent_frame_count(f) for f in (5, 9, 49, 81)] == [2, 3, 13, 21]
    for bad in (1, 4, 6, 80, 82):
        with pytest.raises(ValueError, match="4k \\+ 1"):
            latents.check_frame_count(bad)
    with pytest.raises(ValueError, match="nearest valid lengths are 77 and 81"):
        latents.check_frame_count(80)
    latents.check_training_size((480, 832))  # Wan 2.1 VAE: multiples of 16
    latents.check_training_size((704, 1280), latent_channels=48)  # Wan 2.2 VAE: multiples of 32
    with pytest.raises(DatasetError, match="multiples of 32"):
        latents.check_training_size((480, 848), latent_channels=48)


@pytest.mark.parametrize("channels", [16, 48])
def test_normalisation_is_comfyuis_latent_format(comfyui, channels: int) -> None:
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21() if channels == 16 else comfy.latent_formats.Wan22()
    z = torch.randn(2, channels, 3, 4, 5)
    assert torch.allclose(latents.normalize_latents(z), fmt.process_in(z), atol=1e-6)
    assert torch.allclose(latents.denormalize_latents(fmt.process_in(z)), z, atol=1e-5)
    with pytest.raises(ValueError, match="16 or 48"):
        latents.normalize_latents(torch.randn(1, 12, 2, 2, 2))


def test_wan21_stats_are_diffusers_vae_defaults() -> None:
    from diffusers import AutoencoderKLWan

    cfg = AutoencoderKLWan(**tiny.TINY_VAE).config  # the statistics are config defaults
    assert tuple(cfg.latents_mean) == latents.WAN21_LATENTS_MEAN
    assert tuple(cfg.latents_std) == latents.WAN21_LATENTS_STD


# ---------------------------------------------------------------------------------------------
# keys, detection, configuration


@functools.cache
def _model(**kw):
    return tiny.tiny_transformer(seed=0, **kw)


def _i2v_model():
    """A tiny Wan 2.1 I2V (CLIP image tokens: img_emb and k_img / v_img in every block)."""
    from diffusers import WanTransformer3DModel

    cfg = tiny.tiny_transformer_config(in_channels=36)
    cfg.update(image_dim=64, added_kv_proj_dim=256)
    torch.manual_seed(1)
    return WanTransformer3DModel(**cfg).eval()


@pytest.mark.parametrize("kind", ["t2v", "ti2v", "i2v"])
def test_keys_round_trip_and_agree_with_diffusers_converter(kind: str) -> None:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = {"t2v": lambda: _model(), "ti2v": lambda: _model(latent_channels=48), "i2v": _i2v_model}[kind]()
    sd = model.state_dict()
    comfy = dit_keys.diffusers_to_comfy(sd, prefix="model.diffusion_model.")
    assert "model.diffusion_model.blocks.1.self_attn.q.weight" in comfy
    assert "model.diffusion_model.blocks.0.norm3.weight" in comfy  # cross-attention norm
    back = dit_keys.comfy_to_diffusers(comfy)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)  # renamed, never copied or reshaped
    theirs = convert_wan_transformer_to_diffusers(dict(comfy))
    assert set(theirs) == set(sd) and all(torch.equal(theirs[k], sd[k]) for k in sd)
    variant = dit_keys.detect_variant(comfy)
    assert variant.model_type == kind and variant.num_heads == 2 and variant.head_dim == 128
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):  # the config read off the shapes builds exactly these tensors
        rebuilt = WanTransformer3DModel(**dit_keys.diffusers_config(variant)).state_dict()
    assert {k: t.shape for k, t in rebuilt.items()} == {k: t.shape for k, t in sd.items()}
    assert variant == dit_keys.variant_from_diffusers_config(model.config)
    assert variant.latent_channels == (48 if kind == "ti2v" else 16)


def test_known_sizes_are_named() -> None:
    v = dit_keys.WanVariant(dim=1536, ffn_dim=8960, num_layers=30, num_heads=12, in_dim=16, out_dim=16)
    assert v.name == "Wan 2.1 T2V 1.3B"
    v5 = dit_keys.WanVariant(dim=3072, ffn_dim=14336, num_layers=30, num_heads=24, in_dim=48, out_dim=48,
                             model_type="ti2v")
    assert v5.name == "Wan 2.2 TI2V 5B" and v5.version == "2.2"


def test_key_errors_name_the_keys() -> None:
    comfy = dit_keys.diffusers_to_comfy(_model().state_dict())
    with pytest.raises(KeyLayoutError, match=r"vace_blocks\.0\.after_proj\.weight.*not supported"):
        dit_keys.comfy_to_diffusers({**comfy, "vace_blocks.0.after_proj.weight": torch.zeros(1)})
    missing = {k: v for k, v in comfy.items() if k != "blocks.1.cross_attn.k.weight"}
    with pytest.raises(KeyLayoutError, match=r"blocks\.1\.cross_attn\.k\.weight"):
        dit_keys.comfy_to_diffusers(missing)
    narrow = dict(comfy, **{"head.modulation": torch.zeros(1, 2, 96)})
    with pytest.raises(KeyLayoutError, match="multiple of 128"):
        dit_keys.detect_variant(narrow)


def test_file_detection(tmp_path) -> None:
    from fixtures.analysis_models import tiny_mochi_state, write_genmo

    wan = tmp_path / "wan.safetensors"
    save_file(fw.comfy_weights(_model()), str(wan))
    mochi = write_genmo(tmp_path / "mochi.safetensors", tiny_mochi_state())
    assert dit_keys.wan_layout(wan) == "comfy" and dit_keys.is_wan_file(wan)
    assert dit_keys.wan_layout(_model().state_dict()) == "diffusers"
    assert not dit_keys.is_wan_file(mochi)  # Mochi also has blocks.N. keys
    assert not dit_keys.is_wan_file(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------
# the loader


def _inputs(channels: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, 2, 4, 6, generator=g)  # [B, C, T, h, w]
    text = torch.randn(1, 512, tiny.TEXT_DIM, generator=g)
    text[:, 7:] = 0  # 7 real tokens, then zeros, as umT5 features reach the model
    return x, text


def _velocity(model, x, text, sigma: float) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    t = latents.diffusers_timestep(torch.tensor([sigma]))
    with torch.no_grad():
        return model(x.to(dtype), t, text.to(dtype), return_dict=False)[0].float()


def _quantised(sd: dict[str, torch.Tensor], everywhere: bool = False) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 layout: Linear weights (of the blocks, or `everywhere`) in fp8 e4m3fn
    with `scale_weight`, a marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if (everywhere or ".blocks." in k) and k.endswith(".weight") and v.ndim == 2:
            out[k], scale = fp8.quantize_fp8(v)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def test_loader_reads_comfy_diffusers_and_fp8_files(tmp_path) -> None:
    model = _model()
    x, text = _inputs()
    ref = _velocity(model, x, text, 0.6)
    comfy = fw.comfy_weights(model)
    files = {
        "fp32": {k: v.contiguous() for k, v in comfy.items()},
        "fp16": {k: v.half().contiguous() for k, v in comfy.items()},
        "fp8": _quantised(comfy),
        "fp8_everywhere": _quantised(comfy, everywhere=True),  # the time embedder too
        "diffusers": {k: v.contiguous() for k, v in model.state_dict().items()},
    }
    for name, sd in files.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    model.save_pretrained(tmp_path / "folder" / "transformer")

    exact = loading.load_transformer(str(tmp_path / "fp32.safetensors"))
    assert torch.equal(_velocity(exact, x, text, 0.6), ref)
    assert torch.equal(_velocity(loading.load_transformer(str(tmp_path / "diffusers.safetensors")), x, text, 0.6), ref)
    fp16 = _velocity(loading.load_transformer(str(tmp_path / "fp16.safetensors")), x, text, 0.6)
    assert 0 < (fp16 - ref).abs().max() < 0.01 * ref.abs().max()  # rounded to fp16 on disk, run in fp32
    assert torch.allclose(_velocity(loading.load_transformer(str(tmp_path / "folder")), x, text, 0.6), ref)

    scaled = loading.load_transformer(str(tmp_path / "fp8.safetensors"))
    q = scaled.blocks[1].attn2.to_k
    assert isinstance(q, fp8.FrozenLinear) and q.weight.dtype == torch.float8_e4m3fn and q.scale_weight is not None
    assert torch.allclose(q.dequantized(), model.blocks[1].attn2.to_k.weight, rtol=0.07, atol=1e-3)
    err = (_velocity(scaled, x, text, 0.6) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.03  # fp8 rounding, not a wrong scale (that would be O(1))

    everywhere = loading.load_transformer(str(tmp_path / "fp8_everywhere.safetensors"))
    assert everywhere.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32  # dequantised
    assert everywhere.condition_embedder.text_embedder.linear_1.weight.dtype == torch.float8_e4m3fn
    err = (_velocity(everywhere, x, text, 0.6) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.03

    half = loading.load_transformer(str(tmp_path / "fp32.safetensors"), dtype=torch.bfloat16)
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32  # as from_pretrained
    assert loading.variant_of(half) == dit_keys.detect_variant(comfy)


def test_loader_errors_name_file_and_key(tmp_path) -> None:
    bad = tmp_path / "not_wan.safetensors"
    save_file({"a.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ModelFileError, match=r"not_wan\.safetensors: not a Wan transformer"):
        loading.load_transformer(str(bad))
    comfy = fw.comfy_weights(_model())
    comfy["model.diffusion_model.blocks.0.ffn.2.weight"] = torch.zeros(256, 100)
    wrong = tmp_path / "wrong_shape.safetensors"
    save_file({k: v.contiguous() for k, v in comfy.items()}, str(wrong))
    with pytest.raises(ModelFileError, match=r"wrong_shape\.safetensors: blocks\.0\.ffn\.net\.2\.weight has shape \(256, 100\)"):
        loading.load_transformer(str(wrong))
    with pytest.raises(ModelFileError, match="no such file"):
        loading.load_transformer(str(tmp_path / "absent.safetensors"))


# ---------------------------------------------------------------------------------------------
# parity with ComfyUI's own Wan


@pytest.mark.comfyui
@pytest.mark.parametrize("channels", [16, 48])
def test_comfyui_wan_gives_the_same_prediction(comfyui, channels: int) -> None:
    """ComfyUI's stock loader builds its Wan from the tiny file's weights; its denoised estimate
    equals x − σ·v with v the diffusers model's output at timestep 1000·σ (docs/method.md)."""
    model = _model(latent_channels=channels)
    patcher = fw.comfy_wan(fw.comfy_weights(model))
    expected = {16: ("WAN21_T2V", "Wan21"), 48: ("WAN22_T2V", "Wan22")}[channels]
    assert (type(patcher.model.model_config).__name__, type(patcher.model.latent_format).__name__) == expected
    assert patcher.model.diffusion_model.num_heads == 2
    x, text = _inputs(channels)
    for sigma in (0.9, 0.3):
        v = _velocity(model, x, text, sigma)
        comfy = fw.comfy_denoised(patcher, x, sigma, text)
        scale = comfy.abs().max()
        assert (comfy - latents.denoised_from_velocity(x, sigma, v)).abs().max() < 1e-5 * scale
        # the other sign, or Mochi's time convention, is far off: the check can tell them apart
        assert (comfy - (x + sigma * v)).abs().max() > 0.1 * scale
        mochi_time = _velocity(model, x, text, 1.0 - sigma)
        assert (comfy - latents.denoised_from_velocity(x, sigma, mochi_time)).abs().max() > 0.01 * scale


@pytest.mark.comfyui
@pytest.mark.parametrize("size,heads,ffn,layers,channels", [
    ("1.3B", 12, 8960, 30, 16), ("14B", 40, 13824, 40, 16), ("5B", 24, 14336, 30, 48)])
def test_full_sizes_read_as_comfyui_reads_them(comfyui, size, heads, ffn, layers, channels) -> None:
    """The real models' shapes (on the meta device: no memory): our detection names them and agrees
    with ComfyUI's on every size it reads, and with the model class ComfyUI picks."""
    import comfy.model_detection
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**tiny.tiny_transformer_config(
            num_layers=layers, heads=heads, ffn_dim=ffn, latent_channels=channels))
    weights = dit_keys.diffusers_to_comfy(model.state_dict(), prefix="model.diffusion_model.")
    variant = dit_keys.detect_variant(weights)
    assert variant.name.endswith(size) and variant.version == ("2.2" if channels == 48 else "2.1")
    theirs = comfy.model_detection.detect_unet_config(weights, "model.diffusion_model.")
    ours = dict(dim=variant.dim, num_heads=variant.num_heads, ffn_dim=variant.ffn_dim, num_layers=variant.num_layers,
                in_dim=variant.in_dim, out_dim=variant.out_dim, model_type=variant.model_type.replace("ti2v", "t2v"))
    assert {k: theirs[k] for k in ours} == ours
    picked = comfy.model_detection.model_config_from_unet_config(theirs, weights)
    assert type(picked).__name__ == ("WAN22_T2V" if channels == 48 else "WAN21_T2V")
