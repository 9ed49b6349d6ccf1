"""Tiny random-weight Wan parts for the demo, tests and benchmarks (CPU-sized, no download).

Every part is the real diffusers / transformers class built from a small config; only the sizes
change, and only where ComfyUI's own loaders read sizes from the file, so that the tiny files
also load through ComfyUI's stock `UNETLoader` (docs/method.md "Wan 2.1 / 2.2"):
- transformer: ComfyUI reads dim, FFN width, depth and channels from the shapes but fixes the
  head width (128), the time-embedding width (256) and the text width (4096, umT5-XXL), so the
  tiny transformer keeps those three and is small elsewhere (dim 256 = 2 heads, FFN 256, 2 blocks);
- VAE: diffusers' `AutoencoderKLWan` with the compression of Wan 2.1's VAE (8x space, 4x time,
  causal first frame) or Wan 2.2's (16x space), few channels (ComfyUI builds its Wan VAEs only
  at full size from a file);
- umT5: transformers' `UMT5EncoderModel`, output width 4096 (what the transformer reads), one
  narrow layer, and a unigram SentencePiece model of about 60 pieces trained on a few dozen words
  (ComfyUI builds umT5 only at full size; its tokenizer is the SentencePiece model stored in the
  file, so the tiny file carries the tiny one).
"""

from __future__ import annotations

import torch

from .dit_keys import HEAD_DIM
from .latents import PATCH_SIZE, WAN21_CHANNELS, WAN22_CHANNELS

TEXT_DIM = 4096  # umT5-XXL's width: what ComfyUI's Wan always builds its text embedding for
FREQ_DIM = 256  # sinusoidal time features: fixed in ComfyUI's Wan


def tiny_transformer_config(
    num_layers: int = 2, heads: int = 2, ffn_dim: int = 256, text_dim: int = TEXT_DIM,
    latent_channels: int = WAN21_CHANNELS, in_channels: int | None = None,
) -> dict:
    """`WanTransformer3DModel` arguments of a tiny T2V Wan (latent_channels 48: a tiny TI2V 5B).

    heads x 128 is the width, as ComfyUI infers it (heads = dim / 128). text_dim other than 4096
    gives a smaller model that ComfyUI's stock loader cannot build (fine for core-only tests)."""
    if latent_channels not in (WAN21_CHANNELS, WAN22_CHANNELS):
        raise ValueError(f"latent_channels must be 16 (Wan 2.1 VAE) or 48 (Wan 2.2 VAE), got {latent_channels}")
    return dict(
        patch_size=PATCH_SIZE, num_attention_heads=heads, attention_head_dim=HEAD_DIM,
        in_channels=in_channels or latent_channels, out_channels=latent_channels, text_dim=text_dim,
        freq_dim=FREQ_DIM, ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None,
    )


def tiny_transformer(seed: int = 0, **kw):
    """Random `WanTransformer3DModel`, float32, eval mode. Keyword args: see tiny_transformer_config.

    diffusers initialises the modulation tables randomly and the Linears with PyTorch's default:
    the output is O(1) and depends on every input (latents, time, text)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_transformer_config(**kw)).eval()


TINY_VAE = dict(  # AutoencoderKLWan: Wan 2.1's stages and compression, few channels
    base_dim=8, z_dim=WAN21_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
)
TINY_VAE22 = dict(  # the Wan 2.2 VAE: 2x2 pixel patches in, 48 channels, 16x space, its own decoder width
    TINY_VAE, z_dim=WAN22_CHANNELS, decoder_base_dim=16, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16,
)


def tiny_vae(seed: int = 0, latent_channels: int = WAN21_CHANNELS):
    """Random `AutoencoderKLWan` with the compression of the Wan 2.1 VAE (16 channels: 8x space,
    4x time) or of the Wan 2.2 VAE (48 channels: 16x space, 4x time)."""
    from diffusers import AutoencoderKLWan

    from .latents import latent_stats

    torch.manual_seed(seed)
    config = TINY_VAE if latent_channels == WAN21_CHANNELS else TINY_VAE22
    mean, std = latent_stats(latent_channels)
    return AutoencoderKLWan(**config, latents_mean=list(mean), latents_std=list(std)).eval()


TINY_VOCAB = [  # words of the demo's and the tests' captions
    "a", "an", "the", "is", "are", "with", "and", "in", "on", "of", "two", "person", "people", "bear", "raccoon",
    "cat", "dog", "shape", "square", "circle", "red", "blue", "shaking", "hands", "hugging", "high-fiving",
    "touching", "approaching", "meadow", "room", ".",
]


def tiny_spiece_model() -> bytes:
    """A unigram SentencePiece model (umT5's kind) trained on TINY_VOCAB, with umT5's special ids
    (pad 0, `</s>` 1, unk 2) and no normalisation rule: what ComfyUI's umT5 file would carry as
    `spiece_model`. About 60 pieces; deterministic."""
    import io

    import sentencepiece

    sentences = [" ".join(TINY_VOCAB[i:] + TINY_VOCAB[:i]) for i in range(len(TINY_VOCAB))]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="unigram", vocab_size=80,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity", num_threads=1,
        minloglevel=2, hard_vocab_limit=False, character_coverage=1.0,
    )
    return buf.getvalue()


def tiny_tokenizer():
    """The transformers tokenizer of `tiny_spiece_model()` (the same ids as SentencePiece itself)."""
    from .tokenizer import tokenizer_from_spiece

    return tokenizer_from_spiece(tiny_spiece_model(), "tiny SentencePiece model")


def tiny_text_encoder_config(vocab_size: int, d_model: int = TEXT_DIM) -> dict:
    """`UMT5Config` arguments: umT5's structure (gated GELU, a relative position bias in every
    layer), output width `d_model` (4096: what ComfyUI's Wan reads), one narrow layer."""
    return dict(
        vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )


def tiny_text_encoder(seed: int = 0, d_model: int = TEXT_DIM, vocab_size: int | None = None):
    """Random `UMT5EncoderModel` for the tiny vocabulary (output width d_model)."""
    from transformers import UMT5Config, UMT5EncoderModel

    if vocab_size is None:
        import sentencepiece

        vocab_size = sentencepiece.SentencePieceProcessor(model_proto=tiny_spiece_model()).get_piece_size()
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**tiny_text_encoder_config(vocab_size, d_model))).eval()


def umt5_file_state_dict(model, spiece: bytes | None = None) -> dict[str, torch.Tensor]:
    """A umT5 encoder's weights as ComfyUI's umT5 files hold them: Hugging Face T5 keys, the tied
    `encoder.embed_tokens` left out, the SentencePiece model as a uint8 `spiece_model` tensor."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if spiece is not None:
        sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return sd
