"""Mochi VAE: genmo / ComfyUI keys -> diffusers, checked against ComfyUI's own VAE classes.

Measured facts these tests pin (tiny random models, float32, CPU):
- converted weights give exactly ComfyUI's encoder outputs once ComfyUI's VAE attention is made
  causal as in genmo's reference (`is_causal=True`) and diffusers; ComfyUI's
  `comfy.ldm.genmo.vae.model.Attention` calls `optimized_attention` without a mask, so stock
  ComfyUI encodes with non-causal temporal attention and its latents differ (by ~1 here);
- the decoders agree exactly where no temporal upsampling drops frames; with Mochi's temporal
  factors, genmo drops the t-1 leading frames after each up block, diffusers once at the end,
  so the first output frames differ and the later ones (out of reach of the causal convs) agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dreamrelation_core.data.encode import encode_frames
from dreamrelation_core.errors import ModelFileError
from dreamrelation_core.mochi import tiny
from dreamrelation_core.mochi.loading import load_vae
from dreamrelation_core.mochi.vae_keys import (
    KeyLayoutError,
    convert_genmo_vae,
    diffusers_vae_config,
    diffusers_vae_to_genmo,
)
from fixtures.comfy_vae import comfy_tiny_vae as _comfy_tiny_vae

TOL = 1e-5  # float32, same ops: measured 0.0 for every comparison below


def _save(sd: dict[str, torch.Tensor], path) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _diffusers(config: dict, state_dict: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKLMochi

    vae = AutoencoderKLMochi(**config).eval()
    vae.load_state_dict(state_dict, strict=True)
    return vae


# ---------------------------------------------------------------- against ComfyUI's classes

def _causal_attention(q, k, v, heads, skip_reshape=True, **kwargs):
    """genmo's reference VAE attention (is_causal=True), in optimized_attention's calling convention."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


@pytest.mark.comfyui
def test_comfyui_encoder_equals_converted_diffusers(comfyui, tmp_path, monkeypatch):
    import comfy.ldm.genmo.vae.model as gm

    comfy_vae = _comfy_tiny_vae([1, 2, 3])
    path = tmp_path / "mochi_vae.safetensors"
    _save(comfy_vae.state_dict(), path)  # genmo key layout, as ComfyUI's models/vae file
    vae = load_vae(path)
    assert vae.config.encoder_block_out_channels == (32, 64, 96, 128)
    assert tuple(vae.config.add_attention_block) == (False, True, True, True, True)

    frames = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    mean, logvar = encode_frames(vae, frames)  # what `prepare` caches
    assert mean.shape == (12, 2, 4, 4)
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        stock = comfy_vae.encoder(x)
        monkeypatch.setattr(gm, "optimized_attention", _causal_attention)
        causal = comfy_vae.encoder(x)
    torch.testing.assert_close(mean, causal.mean[0], atol=TOL, rtol=0)
    torch.testing.assert_close(logvar, causal.logvar[0], atol=TOL, rtol=0)
    # Stock ComfyUI attends over all latent frames (no causal mask): a different encoder. If this
    # fails, ComfyUI made its VAE attention causal: update the docstring and the README.
    assert (stock.mean[0] - mean).abs().max() > 1e-2


@pytest.mark.comfyui
def test_comfyui_decoder_equals_converted_diffusers(comfyui, tmp_path):
    # Without temporal upsampling both decoders run the same ops on the same frames: equal.
    comfy_vae = _comfy_tiny_vae([1, 1, 1])
    vae = _diffusers(*(lambda c: (c.config, c.state_dict))(convert_genmo_vae(comfy_vae.state_dict())))
    z = torch.randn(1, 12, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, comfy_vae.decoder(z), atol=TOL, rtol=0)

    # Mochi's factors (1, 2, 3): frame dropping differs (module docstring); 4 latents -> 19 frames.
    comfy_vae = _comfy_tiny_vae([1, 2, 3])
    path = tmp_path / "mochi_vae.safetensors"
    _save(comfy_vae.state_dict(), path)
    vae = load_vae(path)
    z = torch.randn(1, 12, 4, 4, 4)
    with torch.no_grad():
        ours, theirs = vae.decode(z).sample, comfy_vae.decoder(z)
    assert ours.shape == theirs.shape == (1, 3, 19, 32, 32)
    torch.testing.assert_close(ours[:, :, -4:], theirs[:, :, -4:], atol=TOL, rtol=0)
    assert (ours[:, :, 0] - theirs[:, :, 0]).abs().max() > 1e-2


@pytest.mark.comfyui
def test_real_size_comfyui_vae_converts_to_the_default_diffusers_vae(comfyui):
    from comfy.ldm.genmo.vae.model import VideoVAE
    from diffusers import AutoencoderKLMochi

    with torch.device("meta"):  # full size, no memory
        genmo = VideoVAE().state_dict()
        ref = AutoencoderKLMochi()
    conv = convert_genmo_vae(genmo)
    assert conv.parts == ("encoder", "decoder")
    defaults = {k: v for k, v in ref.config.items() if k in conv.config}
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in conv.config.items()} == {
        k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in defaults.items()
    }
    want = ref.state_dict()
    assert set(conv.state_dict) == set(want)
    assert all(conv.state_dict[k].shape == t.shape for k, t in want.items())
    assert set(diffusers_vae_to_genmo(conv.state_dict)) == set(genmo)


# ---------------------------------------------------------------- without ComfyUI

def _odd_vae():
    """A config far from Mochi's: 3 stages, empty stages, mixed attention, odd expansions."""
    from diffusers import AutoencoderKLMochi

    torch.manual_seed(1)
    return AutoencoderKLMochi(
        encoder_block_out_channels=(32, 64, 96), decoder_block_out_channels=(64, 96, 32),
        layers_per_block=(2, 0, 1, 0), temporal_expansions=(2, 1), spatial_expansions=(1, 2),
        add_attention_block=(True, False, True, False), latent_channels=4,
    ).eval()


@pytest.mark.parametrize("make", [lambda: tiny.tiny_vae(seed=5), _odd_vae], ids=["tiny", "odd"])
def test_round_trip_and_config(make):
    vae = make()
    sd = vae.state_dict()
    genmo = diffusers_vae_to_genmo(sd)
    assert all(k.startswith(("encoder.layers.", "encoder.output_", "decoder.blocks.", "decoder.output_")) for k in genmo)
    conv = convert_genmo_vae(genmo)
    assert conv.parts == ("encoder", "decoder")
    assert set(conv.state_dict) == set(sd)
    assert all(torch.equal(conv.state_dict[k], t) for k, t in sd.items())
    for k, v in conv.config.items():
        want = vae.config[k]
        assert (tuple(v) if isinstance(v, (list, tuple)) else v) == (tuple(want) if isinstance(want, (list, tuple)) else want), k
    again = _diffusers(conv.config, conv.state_dict)
    x = torch.rand(1, 3, 7, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean, atol=0, rtol=0)


@pytest.fixture(scope="module")
def genmo_sd() -> dict[str, torch.Tensor]:
    return diffusers_vae_to_genmo(tiny.tiny_vae(seed=6).state_dict())


def test_prefixes_and_single_parts(genmo_sd):
    enc = {k[len("encoder."):]: v for k, v in genmo_sd.items() if k.startswith("encoder.")}
    dec = {k[len("decoder."):]: v for k, v in genmo_sd.items() if k.startswith("decoder.")}
    c = convert_genmo_vae(enc)  # genmo's own encoder.safetensors: no part prefix
    assert c.parts == ("encoder",) and all(k.startswith("encoder.") for k in c.state_dict)
    assert "no decoder" in c.describe()
    c = convert_genmo_vae(dec)
    assert c.parts == ("decoder",) and c.config["temporal_expansions"] == (1, 2, 3)
    with pytest.raises(KeyLayoutError, match="cannot tell which 'output_proj'"):
        convert_genmo_vae({**enc, **{k: v for k, v in dec.items() if k.startswith("blocks.")}})
    # an all-in-one ComfyUI checkpoint: the VAE under first_stage_model., other models beside it
    ckpt = {"first_stage_model." + k: v for k, v in genmo_sd.items()}
    ckpt["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(2)
    c = convert_genmo_vae(ckpt)
    assert (c.parts, c.prefix, c.ignored) == (("encoder", "decoder"), "first_stage_model.", 1)
    assert set(c.state_dict) == set(convert_genmo_vae(genmo_sd).state_dict)
    assert convert_genmo_vae({"vae." + k: v for k, v in genmo_sd.items()}).prefix == "vae."
    # input_is_conv_1x1=False stores the input projection as a 1x1x1 Conv3d: same map
    conv3d = dict(genmo_sd)
    conv3d["encoder.layers.0.weight"] = genmo_sd["encoder.layers.0.weight"][..., None, None, None]
    assert torch.equal(convert_genmo_vae(conv3d).state_dict["encoder.proj_in.weight"], genmo_sd["encoder.layers.0.weight"])


def test_conversion_errors_name_the_keys(genmo_sd):
    def fails(sd, match):
        with pytest.raises(KeyLayoutError, match=match):
            convert_genmo_vae(sd)

    fails({"model.diffusion_model.blocks.0.attn.qkv_x.weight": torch.zeros(3, 1)}, "not a genmo Mochi VAE")
    fails({k: v for k, v in genmo_sd.items() if k != "encoder.layers.2.layers.0.bias"},
          r"key 'encoder\.layers\.2\.layers\.0\.bias' missing")
    fails({**genmo_sd, "encoder.layers.1.stack.9.weight": torch.zeros(1)},
          r"1 unexpected key\(s\), e\.g\. \['encoder\.layers\.1\.stack\.9\.weight'\]")
    fails({k: v for k, v in genmo_sd.items() if not k.startswith("decoder.blocks.2.")},
          r"no keys for decoder\.blocks\.2 ")
    fails({**genmo_sd, "decoder.blocks.1.blocks.0.attn_block.norm.weight": torch.zeros(32)},
          "diffusers' AutoencoderKLMochi decoder has none")
    odd = diffusers_vae_to_genmo(_odd_vae().state_dict())
    odd_qkv = next(k for k in odd if k.endswith("attn.qkv.weight"))
    fails({**odd, odd_qkv: odd[odd_qkv][:-1]}, rf"{odd_qkv} has shape \(95, 32\)")
    # the encoder of one model with the decoder of another: diffusers cannot hold both
    mixed = {k: v for k, v in genmo_sd.items() if k.startswith("encoder.")}
    mixed.update({k: v for k, v in diffusers_vae_to_genmo(tiny.tiny_vae().state_dict()).items() if k.startswith("decoder.")})
    mixed.update({k.replace("decoder.blocks.4.0.", "decoder.blocks.4.1."): v for k, v in mixed.items() if k.startswith("decoder.blocks.4.0.")})
    fails(mixed, r"encoder has \(1, 1, 1, 1, 1\) ResBlocks per stage, the decoder \(2, 1, 1, 1, 1\)")
    dec_only = {k: v for k, v in odd.items() if k.startswith("decoder.")}
    fails(dec_only, "temporal and spatial expansions cannot be told apart")
    with pytest.raises(KeyLayoutError, match=r"key 'encoder\.proj_in\.weight' missing"):
        diffusers_vae_config({k: v for k, v in tiny.tiny_vae().state_dict().items() if k != "encoder.proj_in.weight"})
    with pytest.raises(KeyLayoutError, match=r"1 unexpected key\(s\), e\.g\. \['encoder\.extra'\]"):
        diffusers_vae_to_genmo({**tiny.tiny_vae().state_dict(), "encoder.extra": torch.zeros(1)})


def test_load_vae_genmo_files(genmo_sd, tmp_path):
    ref = tiny.tiny_vae(seed=6)
    frames = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    want = encode_frames(ref, frames)

    _save(genmo_sd, tmp_path / "mochi_vae.safetensors")
    vae = load_vae(tmp_path / "mochi_vae.safetensors")  # no config needed
    for got, w in zip(encode_frames(vae, frames), want):
        torch.testing.assert_close(got, w, atol=0, rtol=0)
    z = torch.randn(1, 12, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, ref.decode(z).sample, atol=0, rtol=0)

    half = load_vae(tmp_path / "mochi_vae.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}

    ckpt = {"first_stage_model." + k: v for k, v in genmo_sd.items()}
    ckpt["model.diffusion_model.pos_frequencies"] = torch.zeros(2)
    _save(ckpt, tmp_path / "all_in_one.safetensors")
    torch.testing.assert_close(encode_frames(load_vae(tmp_path / "all_in_one.safetensors"), frames)[0], want[0], atol=0, rtol=0)

    # genmo's separate encoder.safetensors (no prefix): encodes; decoding says why it cannot
    _save({k[len("encoder."):]: v for k, v in genmo_sd.items() if k.startswith("encoder.")}, tmp_path / "encoder.safetensors")
    enc = load_vae(tmp_path / "encoder.safetensors")
    torch.testing.assert_close(encode_frames(enc, frames)[0], want[0], atol=0, rtol=0)
    with pytest.raises(ModelFileError, match=r"encoder\.safetensors: this VAE file has no decoder weights"):
        enc.decode(z)

    _save({k: v for k, v in genmo_sd.items() if k.startswith("decoder.")}, tmp_path / "decoder_only.safetensors")
    with pytest.raises(ModelFileError, match=r"decoder_only\.safetensors: .*decoder found \(no encoder\).*needs the VAE encoder"):
        load_vae(tmp_path / "decoder_only.safetensors")

    broken = {k: v for k, v in genmo_sd.items() if k != "encoder.output_norm.bias"}
    _save(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ModelFileError, match=r"broken\.safetensors: .*key 'encoder\.output_norm\.bias' missing"):
        load_vae(tmp_path / "broken.safetensors")

    pruned = dict(genmo_sd)  # genmo's prune_bottleneck halves conv1's output: diffusers has no such block
    pruned["encoder.layers.1.stack.2.weight"] = genmo_sd["encoder.layers.1.stack.2.weight"][:16]
    _save(pruned, tmp_path / "pruned.safetensors")
    with pytest.raises(ModelFileError, match=r"pruned\.safetensors: converted key 'encoder\.block_in\.resnets\.0\.conv1\.conv\.weight' has shape \(16, 32, 3, 3, 3\)"):
        load_vae(tmp_path / "pruned.safetensors")
