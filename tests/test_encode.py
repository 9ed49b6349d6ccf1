"""Local model loading (folders and single files), VAE encoding, caption embedding, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core.data.encode import encode_captions, encode_frames
from dreamrelation_core.data.synthetic import synthetic_clip
from dreamrelation_core.errors import ModelFileError
from dreamrelation_core.mochi import tiny
from dreamrelation_core.mochi.latents import (
    MOCHI_LATENTS_MEAN,
    MOCHI_LATENTS_STD,
    denormalize_latents,
    normalize_latents,
)
from dreamrelation_core.mochi.loading import load_text_encoder, load_vae

CAPTIONS = ["A person is shaking hands with a person.", "a cat"]


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    vae = tiny.tiny_vae(seed=3)
    vae.save_pretrained(d / "folder")
    vae.save_pretrained(d / "pipeline" / "vae")  # a diffusers pipeline folder holding vae/
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, d / "vae.safetensors")
    return vae, d


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    te, tok = tiny.tiny_text_encoder(seed=4), tiny.tiny_tokenizer()
    te.save_pretrained(d / "folder")
    tok.save_pretrained(d / "tokenizer")
    # ComfyUI's t5xxl_fp16.safetensors holds `shared.weight`, not the tied `encoder.embed_tokens.weight`.
    sd = {k: v.contiguous() for k, v in te.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, d / "t5.safetensors")
    return te, tok, d


def test_latent_statistics_are_diffusers_defaults_and_normalisation_inverts():
    cfg = tiny.tiny_vae().config
    assert tuple(cfg.latents_mean) == MOCHI_LATENTS_MEAN and tuple(cfg.latents_std) == MOCHI_LATENTS_STD
    z = torch.randn(2, 12, 3, 4, 4)
    n = normalize_latents(z)
    assert n.shape == z.shape
    assert n[1, 7, 2, 3, 1] == pytest.approx((z[1, 7, 2, 3, 1].item() - MOCHI_LATENTS_MEAN[7]) / MOCHI_LATENTS_STD[7], rel=1e-5)
    torch.testing.assert_close(denormalize_latents(n), z)
    torch.testing.assert_close(normalize_latents(z[0]), n[0])  # unbatched [12, T, h, w]
    with pytest.raises(ValueError, match=r"\[B\?, 12, T, h, w\].*\(16, 3, 4, 4\)"):
        normalize_latents(torch.zeros(16, 3, 4, 4))


def test_statistics_match_comfyui_mochi_latent_format(comfyui):
    import comfy.latent_formats as lf

    fmt = lf.Mochi()
    z = torch.randn(1, 12, 2, 4, 4)
    torch.testing.assert_close(fmt.process_in(z), normalize_latents(z))


def test_vae_folder_and_single_file_encode_like_the_model(vae_files):
    vae, d = vae_files
    frames = synthetic_clip(13, (32, 32), seed=0)[0]
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # [1, 3, F, H, W]
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
    for loaded in (load_vae(d / "folder"), load_vae(d / "vae.safetensors", config_dir=d / "folder")):
        mean, logvar = encode_frames(loaded, frames)
        assert mean.shape == logvar.shape == (12, 3, 4, 4) and mean.dtype == torch.float32
        torch.testing.assert_close(mean, ref.mean[0])
        torch.testing.assert_close(logvar, ref.logvar[0])
    torch.testing.assert_close(encode_frames(load_vae(d / "pipeline"), frames)[0], ref.mean[0])


def test_encode_frames_rejects_bad_clips(vae_files):
    vae, _ = vae_files
    with pytest.raises(ValueError, match="nearest valid lengths are 7 and 13"):
        encode_frames(vae, np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_frames(vae, np.zeros((7, 30, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_frames(vae, np.zeros((7, 32, 32, 3), np.float32))


def test_vae_loading_errors(vae_files, tmp_path):
    vae, d = vae_files
    with pytest.raises(ModelFileError, match=r"nothere\.safetensors: not found; expected a Mochi VAE"):
        load_vae(tmp_path / "nothere.safetensors")
    with pytest.raises(ModelFileError, match="needs the model's config.json"):
        load_vae(d / "vae.safetensors", config_dir=tmp_path)  # neither tmp_path nor the file's folder has one
    sd = vae.state_dict()
    genmo = tmp_path / "mochi_vae.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(2), "decoder.blocks.0.0.weight": torch.zeros(2)}, genmo)
    # genmo-layout files are converted (tests/test_mochi_vae_convert.py); a broken one says why not
    with pytest.raises(ModelFileError, match=r"mochi_vae\.safetensors: genmo/ComfyUI-layout Mochi VAE that cannot be converted"):
        load_vae(genmo, config_dir=d / "folder")
    dec_only = tmp_path / "dec.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("encoder.")}, dec_only)
    with pytest.raises(ModelFileError, match="no encoder weights"):
        load_vae(dec_only, config_dir=d / "folder")
    wrong = dict(sd)
    k = next(k for k in sd if k.endswith("weight") and sd[k].ndim > 1)
    wrong[k] = torch.zeros(3, 3)
    save_file({a: b.contiguous() for a, b in wrong.items()}, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelFileError, match=rf"key '{k}' has shape \(3, 3\)"):
        load_vae(tmp_path / "wrong.safetensors", config_dir=d / "folder")
    (tmp_path / "trunc.safetensors").write_bytes((d / "vae.safetensors").read_bytes()[:200])
    with pytest.raises(ModelFileError, match=r"trunc\.safetensors: not a readable \.safetensors"):
        load_vae(tmp_path / "trunc.safetensors", config_dir=d / "folder")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ModelFileError, match="no config.json here or in vae/"):
        load_vae(tmp_path / "emptydir")


def test_text_encoder_folder_and_single_file(t5_files):
    te, tok, d = t5_files
    with torch.no_grad():
        ids = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
        ref = te(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    m1, tok1 = load_text_encoder(d / "folder", d / "tokenizer")
    # config from the tokenizer folder is absent here, so the config folder is given explicitly
    m2, _ = load_text_encoder(d / "t5.safetensors", d / "tokenizer", config_dir=d / "folder")
    assert m2.encoder.embed_tokens.weight is m2.shared.weight  # tie kept after loading
    for m in (m1, m2):
        feat, mask = encode_captions(m, tok1, CAPTIONS, max_length=16)
        assert feat.shape == (2, 16, 32) and feat.dtype == torch.float32 and mask.dtype == torch.bool
        assert mask.sum(1).tolist() == [10, 3]  # 9 words + "." ... + </s>; "a cat" + </s>
        assert not mask[1, 3:].any()
        torch.testing.assert_close(feat, ref)


def test_caption_truncation_warns(t5_files):
    te, tok, _ = t5_files
    with pytest.warns(UserWarning, match="truncated to 4 tokens"):
        feat, mask = encode_captions(te, tok, CAPTIONS[:1], max_length=4)
    assert feat.shape == (1, 4, 32) and mask.all()


def test_text_encoder_loading_errors(t5_files, tmp_path):
    te, _, d = t5_files
    with pytest.raises(ModelFileError, match=r"t5xxl_fp16\.safetensors: not found"):
        load_text_encoder(tmp_path / "t5xxl_fp16.safetensors", d / "tokenizer")
    with pytest.raises(ModelFileError, match=r"notok: not found; expected a tokenizer folder"):
        load_text_encoder(d / "t5.safetensors", tmp_path / "notok")
    with pytest.raises(ModelFileError, match="needs the model's config.json"):
        load_text_encoder(d / "t5.safetensors", d / "tokenizer")  # no config anywhere near
    partial = {k: v.contiguous() for k, v in te.state_dict().items() if "block.0.layer.1" not in k and "embed_tokens" not in k}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ModelFileError, match=r"not a T5 encoder.*keys missing, e\.g\. \['encoder\.block\.0\.layer\.1"):
        load_text_encoder(tmp_path / "partial.safetensors", d / "tokenizer", config_dir=d / "folder")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in partial.items()}
    save_file(fp8, tmp_path / "t5xxl_fp8.safetensors")
    with pytest.raises(ModelFileError, match="fp8"):
        load_text_encoder(tmp_path / "t5xxl_fp8.safetensors", d / "tokenizer", config_dir=d / "folder")
