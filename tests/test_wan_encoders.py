"""Wan's VAE and umT5 in the core against ComfyUI's own classes (tiny random models, CPU):
key conversion, loading from ComfyUI's file layouts, and equal outputs (docs/method.md "Wan 2.1 / 2.2")."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dreamrelation_core import fp8
from dreamrelation_core.errors import KeyLayoutError, ModelFileError
from dreamrelation_core.wan import latents, loading, tiny, vae_keys
from fixtures import wan as fw

pytestmark = pytest.mark.comfyui


# ---------------------------------------------------------------------------------------------
# VAE


@pytest.fixture(scope="module")
def comfy_vae(comfyui):
    return fw.comfy_tiny_vae(seed=0)


@pytest.fixture(scope="module")
def comfy_vae22(comfyui):
    return fw.comfy_tiny_vae(seed=1, latent_channels=48)


def _save(path, sd) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("res_blocks,mult", [(1, [1, 2, 4, 4]), (2, [1, 2, 4, 4]), (2, [1, 2, 2])])
def test_vae_keys_round_trip_any_size(comfyui, res_blocks: int, mult: list[int]) -> None:
    import comfy.ldm.wan.vae
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    temporal = [False, True, True][: len(mult) - 1]
    comfy = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=mult, num_res_blocks=res_blocks, attn_scales=[],
                                     temperal_downsample=temporal, dropout=0.0)
    sd = {k: torch.randn(v.shape) for k, v in comfy.state_dict().items()}
    config = vae_keys.config_from_comfy(sd)
    assert (config["dim_mult"], config["num_res_blocks"], config["temperal_downsample"]) == (mult, res_blocks, temporal)
    conv = vae_keys.comfy_to_diffusers(sd)
    with torch.device("meta"):
        expected = AutoencoderKLWan(**config).state_dict()
    assert {k: t.shape for k, t in conv.items()} == {k: t.shape for k, t in expected.items()}
    back = vae_keys.diffusers_to_comfy(conv)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    if res_blocks == 2:  # diffusers' one-way converter assumes Wan's two residual blocks per stage
        theirs = convert_wan_vae_to_diffusers(dict(sd))
        assert set(theirs) == set(conv) and all(torch.equal(theirs[k], conv[k]) for k in conv)


@pytest.mark.parametrize("channels", [16, 48])
def test_vae_from_comfy_file_encodes_and_decodes_like_comfyui(comfy_vae, comfy_vae22, channels: int, tmp_path) -> None:
    comfy = comfy_vae if channels == 16 else comfy_vae22
    path = _save(tmp_path / "wan_vae_tiny.safetensors", comfy.state_dict())
    vae = loading.load_vae(path)
    space = latents.spatial_compression(channels)  # 8 (2.1 VAE) or 16 (2.2 VAE)
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(1, 3, 5, 32, 64, generator=g) * 2 - 1  # [B, 3, F = 4k + 1, H, W] in [-1, 1]
    with torch.no_grad():
        z_comfy = comfy.encode(frames)
        z_core = vae.encode(frames).latent_dist.mode()
        assert z_core.shape == (1, channels, latents.latent_frame_count(5), 32 // space, 64 // space)
        assert (z_core - z_comfy).abs().max() < 1e-5 * z_comfy.abs().max()
        x_comfy = comfy.decode(z_comfy)
        x_core = vae.decode(z_comfy).sample
    assert x_core.shape == frames.shape
    # diffusers clamps its output to [-1, 1]; ComfyUI clamps later, in its VAE wrapper
    assert (x_core - x_comfy.clamp(-1, 1)).abs().max() < 1e-5
    assert tuple(vae.config.latents_mean) == latents.latent_stats(channels)[0]


def test_wan22_vae_keys_round_trip(comfy_vae22) -> None:
    from diffusers import AutoencoderKLWan

    sd = comfy_vae22.state_dict()
    config = vae_keys.config_from_comfy(sd)
    assert (config["z_dim"], config["is_residual"], config["patch_size"], config["decoder_base_dim"]) == (48, True, 2, 16)
    conv = vae_keys.comfy_to_diffusers(sd)
    assert "decoder.up_blocks.0.upsampler.time_conv.weight" in conv
    with torch.device("meta"):
        expected = AutoencoderKLWan(**config).state_dict()
    assert {k: t.shape for k, t in conv.items()} == {k: t.shape for k, t in expected.items()}
    back = vae_keys.diffusers_to_comfy(conv)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


def test_vae_errors(comfy_vae, tmp_path) -> None:
    sd = comfy_vae.state_dict()
    with pytest.raises(KeyLayoutError, match=r"outside the Wan 2\.1 VAE layout.*encoder\.extra\.weight"):
        vae_keys.comfy_to_diffusers({**sd, "encoder.extra.weight": torch.zeros(1)})
    mixed = _save(tmp_path / "wan2.2_vae.safetensors", {**sd, vae_keys.WAN22_MARKER: torch.zeros(1)})
    with pytest.raises(ModelFileError, match=r"wan2\.2_vae\.safetensors: .*outside the Wan 2\.2 VAE layout"):
        loading.load_vae(mixed)  # 2.1 keys under the 2.2 marker: named, not half-loaded
    stray = _save(tmp_path / "other.safetensors", {"a.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match=r"other\.safetensors: not a Wan VAE in ComfyUI's layout"):
        loading.load_vae(stray)


# ---------------------------------------------------------------------------------------------
# umT5 and its tokenizer


@pytest.fixture(scope="module")
def umt5_file(tmp_path_factory) -> tuple[str, dict]:
    encoder = tiny.tiny_text_encoder(seed=0)
    sd = tiny.umt5_file_state_dict(encoder, tiny.tiny_spiece_model())
    path = tmp_path_factory.mktemp("te") / "umt5_tiny.safetensors"
    return _save(path, sd), sd


PROMPTS = ["a person shaking hands with a bear .", "Two people hugging in the meadow.", "a zebra is RED!"]


def test_tokenizer_is_sentencepiece() -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=tiny.tiny_spiece_model(), add_eos=True)
    tok = tiny.tiny_tokenizer()
    for p in PROMPTS:  # unknown words and capitals included
        assert tok(p)["input_ids"] == sp.encode(p)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)


def test_tokenizer_keeps_the_models_normaliser() -> None:
    """umT5's SentencePiece model normalises text (NFKC): the tokenizer reads that rule from the
    model's bytes (no protobuf package) and tokenises full-width or composed characters alike."""
    import io

    import sentencepiece
    from transformers import T5Tokenizer

    from dreamrelation_core.wan.tokenizer import tokenizer_from_spiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(tiny.TINY_VOCAB[i:] + tiny.TINY_VOCAB[:i]) for i in range(len(tiny.TINY_VOCAB))]),
        model_writer=buf, model_type="unigram", vocab_size=80, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2, hard_vocab_limit=False, character_coverage=1.0,
    )
    model = buf.getvalue()
    sp = sentencepiece.SentencePieceProcessor(model_proto=model, add_eos=True)
    tok = tokenizer_from_spiece(model)
    wide = "ａ ｂｅａｒ ｉｓ ｓｈａｋｉｎｇ ｈａｎｄｓ"  # full-width: NFKC makes it "a bear is shaking hands"
    for p in (wide, "Ⅰ ﬁsh ① café", "a   bear\tis  hugging"):
        assert tok(p)["input_ids"] == sp.encode(p)
    assert sp.encode(wide) == sp.encode("a bear is shaking hands")
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    unnormalised = T5Tokenizer(vocab=pieces, extra_ids=0)  # what a converter without the rule would give
    assert unnormalised(wide)["input_ids"] != sp.encode(wide)


def _core_features(encoder, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer([prompt], padding="max_length", max_length=latents.TEXT_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        feat = encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    return feat * ids["attention_mask"][..., None]  # padding rows are zeros, as the transformer sees them


def test_umt5_from_comfy_file_gives_comfyuis_text_features(comfyui, umt5_file) -> None:
    path, sd = umt5_file
    encoder, tokenizer = loading.load_text_encoder(path)  # tokenizer from the file's spiece_model
    clip = fw.comfy_tiny_umt5(sd)
    for prompt in PROMPTS:
        comfy = fw.comfy_text_features(clip, prompt)
        core = _core_features(encoder, tokenizer, prompt)
        assert comfy.shape == core.shape == (1, latents.TEXT_LEN, tiny.TEXT_DIM)
        n = int((core.abs().sum(-1) > 0).sum())
        assert 3 <= n < 20 and comfy[0, n:].abs().max() == 0  # real tokens, then zero rows
        assert (comfy - core).abs().max() < 1e-5 * core.abs().max()


def test_umt5_fp8_scaled_file_and_errors(umt5_file, tmp_path) -> None:
    path, sd = umt5_file
    scaled = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if ".block." in k and v.ndim == 2 and "relative_attention_bias" not in k:
            scaled[k], s = fp8.quantize_fp8(v)
            scaled[k[: -len("weight")] + "scale_weight"] = s.reshape(1)
        else:
            scaled[k] = v
    ref, tokenizer = loading.load_text_encoder(path)
    model, _ = loading.load_text_encoder(_save(tmp_path / "umt5_fp8_scaled.safetensors", scaled))
    a, b = (_core_features(m, tokenizer, PROMPTS[0]) for m in (ref, model))
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()  # fp8 rounding only: the scales were applied

    no_spiece = _save(tmp_path / "umt5_no_tokenizer.safetensors", {k: v for k, v in sd.items() if k != "spiece_model"})
    with pytest.raises(ModelFileError, match=r"umt5_no_tokenizer\.safetensors: no tokenizer"):
        loading.load_text_encoder(no_spiece)
    broken = {k: v for k, v in sd.items() if "layer.1.DenseReluDense.wo" not in k}
    with pytest.raises(ModelFileError, match=r"DenseReluDense\.wo\.weight"):
        loading.load_text_encoder(_save(tmp_path / "umt5_broken.safetensors", broken))


# ---------------------------------------------------------------------------------------------
# the test server's tiny loaders (ComfyUI builds umT5 and the Wan VAE only at full size)


def test_test_server_loaders_take_the_tiny_files(comfyui, comfy_vae, comfy_vae22, umt5_file) -> None:
    """tests/comfy_test_nodes loads the tiny Wan files through ComfyUI's own wrappers (`comfy.sd.CLIP`
    type wan, `comfy.sd.VAE`'s Wan branch), and they agree with the core's models; the core turns the
    VAE ComfyUI has loaded back into its own (what the Prepare node does)."""
    from comfy_test_nodes.tiny import load_tiny_wan_clip, load_tiny_wan_vae

    path, sd = umt5_file
    clip = load_tiny_wan_clip(dict(sd))
    encoder, tokenizer = loading.load_text_encoder(path)
    core = _core_features(encoder, tokenizer, PROMPTS[1])
    assert (fw.comfy_text_features(clip, PROMPTS[1]) - core).abs().max() < 1e-5 * core.abs().max()

    with pytest.raises(ModelFileError, match="ComfyUI's VAE: not a Wan VAE"):
        loading.vae_from_comfy_state_dict({"a.weight": torch.zeros(1)}, source="ComfyUI's VAE")
    for comfy in (comfy_vae, comfy_vae22):
        vae = load_tiny_wan_vae(comfy.state_dict())
        channels = comfy.z_dim
        space = latents.spatial_compression(channels)
        assert (vae.latent_channels, vae.downscale_index_formula) == (channels, (4, space, space))
        g = torch.Generator().manual_seed(2)
        images = torch.rand(5, 32, 64, 3, generator=g)  # ComfyUI IMAGE: [F, H, W, 3] in [0, 1]
        z = vae.encode(images)  # raw latents; the model's latent format normalises them
        core_vae = loading.vae_from_comfy_state_dict(vae.first_stage_model.state_dict(), source="ComfyUI's VAE")
        with torch.no_grad():
            want = core_vae.encode(images.movedim(-1, 0)[None] * 2 - 1).latent_dist.mode()
        assert z.shape == want.shape == (1, channels, 2, 32 // space, 64 // space)
        assert (z - want).abs().max() < 1e-5 * want.abs().max()


def test_folders_and_diffusers_key_files(comfy_vae, umt5_file, tmp_path) -> None:
    """The other layouts a user may have: diffusers / transformers folders (a Wan pipeline's vae/,
    text_encoder/, tokenizer/) and a VAE file in diffusers' keys beside its config."""
    path, _ = umt5_file
    encoder, tokenizer = loading.load_text_encoder(path)
    pipeline = tmp_path / "Wan2.1-T2V-Diffusers"
    encoder.save_pretrained(pipeline / "text_encoder")
    tokenizer.save_pretrained(pipeline / "tokenizer")
    vae = loading.load_vae(_save(tmp_path / "wan_vae.safetensors", comfy_vae.state_dict()))
    vae.save_pretrained(pipeline / "vae")

    enc2, tok2 = loading.load_text_encoder(pipeline, tokenizer_dir=pipeline / "tokenizer")
    assert tok2(PROMPTS[1])["input_ids"] == tokenizer(PROMPTS[1])["input_ids"]
    assert torch.equal(_core_features(enc2, tok2, PROMPTS[1]), _core_features(encoder, tokenizer, PROMPTS[1]))

    frames = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        want = vae.encode(frames).latent_dist.mode()
        assert torch.equal(loading.load_vae(pipeline).encode(frames).latent_dist.mode(), want)
        single = _save(pipeline / "vae" / "weights_only.safetensors", vae.state_dict())
        assert torch.equal(loading.load_vae(single).encode(frames).latent_dist.mode(), want)  # config beside it
    with pytest.raises(ModelFileError, match="no config.json"):
        loading.load_vae(_save(tmp_path / "lonely.safetensors", vae.state_dict()))
