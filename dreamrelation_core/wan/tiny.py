"""Tiny random-weight Wan parts for the demo, tests and benchmarks (CPU-sized, no download).

Every part is the real diffusers / transformers class built from a small config; only the sizes
change, and only where ComfyUI's own loaders read sizes from the file, so that the tiny files
also load through ComfyUI's stock `UNETLoader` (docs/method.md "Wan 2.1 / 2.2"):
- transformer: ComfyUI reads dim, FFN width, depth and channels from the shapes but fixes the
  head width (128), the time-embedding width (256) and the text width (4096, umT5-XXL), so the
  tiny transformer keeps those three and is small elsewhere (dim 256 = 2 heads, FFN 256, 2 blocks);
- VAE: diffusers' `AutoencoderKLWan` with Wan's compression (8x space, 4x time, causal first
  frame) and few channels (ComfyUI builds its Wan VAE only at full size from a file);
- umT5: transformers' `UMT5EncoderModel`, output width 4096 (what the transformer reads), one
  narrow layer, and a word-level SentencePiece vocabulary of a few dozen words (ComfyUI builds
  umT5 only at full size; its tokenizer is the SentencePiece model stored in the file).
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
