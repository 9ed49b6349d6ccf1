"""Tiny random-weight Mochi parts for the demo, tests and benchmarks (CPU-sized, no download).

Every part is the real diffusers / transformers class built from a small config; only the sizes
change. Layout facts the pipeline relies on are kept: 12 latent channels, patch 2, 8x spatial and
6x temporal VAE compression with a causal first frame.
"""

from __future__ import annotations

import torch

from .latents import LATENT_CHANNELS, PATCH_SIZE


def tiny_transformer_config(
    num_layers: int = 2, heads: int = 2, head_dim: int = 32, text_dim: int = 32, text_len: int = 16,
    text_hidden: int | None = None,
) -> dict:
    """text_dim: T5 feature width; text_hidden: width of the text stream in the blocks
    (Mochi: 1536, half the visual 3072; default here: equal to the visual width)."""
    return dict(
        patch_size=PATCH_SIZE,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=num_layers,
        pooled_projection_dim=text_hidden or heads * head_dim,
        in_channels=LATENT_CHANNELS,
        text_embed_dim=text_dim,
        time_embed_dim=32,
        max_sequence_length=text_len,
    )


def tiny_transformer(seed: int = 0, **kw):
    """Random `MochiTransformer3DModel`, float32, eval mode. Keyword args: see tiny_transformer_config."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(**tiny_transformer_config(**kw))
    # diffusers zero-initialises nothing we rely on, but the output projection of a fresh model
    # is random: fine for a demo, the LoRA has something to move.
    return model.eval()


def tiny_vae(seed: int = 0):
    """Random `AutoencoderKLMochi` with Mochi's compression (8x space, 6x time) and few channels."""
    from diffusers import AutoencoderKLMochi

    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        add_attention_block=(False, False, False, False, False),
    )
    return vae.eval()


TINY_VOCAB = [
    "<pad>", "</s>", "<unk>", "a", "an", "the", "is", "are", "with", "and", "in", "on", "of",
    "person", "people", "bear", "raccoon", "cat", "dog", "shape", "square", "circle", "red", "blue",
    "shaking", "hands", "hugging", "high-fiving", "touching", "approaching", "meadow", "room", ".",
]


def _vocab(words: list[str] | None) -> list[str]:
    """TINY_VOCAB, or T5's three special tokens followed by `words`."""
    return TINY_VOCAB if words is None else ["<pad>", "</s>", "<unk>"] + [w for w in words if w not in ("<pad>", "</s>", "<unk>")]


def tiny_tokenizer(max_length: int = 16, words: list[str] | None = None):
    """A word-level fast tokenizer over a small vocabulary (TINY_VOCAB, or `words`), with T5's
    special tokens and padding."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=max_length,
    )
    return fast


def tiny_text_encoder(seed: int = 0, d_model: int = 32, words: list[str] | None = None):
    """Random `T5EncoderModel` with the tiny vocabulary, or T5's specials + `words` (output width = d_model)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(_vocab(words)), d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()
