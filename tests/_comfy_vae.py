"""ComfyUI's own genmo VAE classes at a tiny size (for tests that need ComfyUI's VAE weights)."""

from __future__ import annotations

import torch


def comfy_tiny_vae(temporal: list[int]) -> torch.nn.Module:
    """ComfyUI's genmo Encoder + Decoder at a tiny size, random weights, held as VideoVAE holds them."""
    import comfy.ldm.genmo.vae.model as gm

    torch.manual_seed(0)
    spatial = [2, 2, 2]
    vae = torch.nn.Module()  # VideoVAE() hard-codes the full size; same attribute names -> same keys
    vae.encoder = gm.Encoder(
        in_channels=15, base_channels=32, channel_multipliers=[1, 2, 3, 4], num_res_blocks=[1, 1, 1, 1, 1],
        latent_dim=12, temporal_reductions=temporal, spatial_reductions=spatial,
        prune_bottlenecks=[False] * 5, has_attentions=[False, True, True, True, True],
        affine=True, bias=True, input_is_conv_1x1=True, padding_mode="replicate",
    )
    vae.decoder = gm.Decoder(
        out_channels=3, base_channels=32, channel_multipliers=[1, 2, 3, 4], temporal_expansions=temporal,
        spatial_expansions=spatial, num_res_blocks=[1, 1, 1, 1, 1], latent_dim=12, has_attention=[False] * 5,
        padding_mode="replicate", output_norm=False, nonlinearity="silu", output_nonlinearity="silu", causal=True,
    )
    # ComfyUI's ops skip weight init (tensors are left empty): fill every tensor, scaled so
    # activations stay O(1) through the stack and differences are meaningful.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # GroupNorm scales
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return vae.eval()
