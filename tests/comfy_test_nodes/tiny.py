"""Tiny Mochi parts made of ComfyUI's own classes, for the test server only (never shipped).

ComfyUI builds its Mochi DiT, T5 and VAE only at full size (its loaders detect the model type
from the weights, then use fixed sizes). These helpers take the sizes from the weights instead
and otherwise follow ComfyUI's own loading code: model config -> model -> weights -> patcher
(DiT), `comfy.sd.CLIP` over the Mochi T5 classes with ComfyUI's config-override option (T5),
`comfy.sd.VAE` around the genmo `VideoVAE` (VAE).

Nothing here imports ComfyUI at module level: pytest imports `tiny_vae_kwargs` etc. too.
"""

from __future__ import annotations

import re

import torch

# ComfyUI's genmo VAE at a tiny size: Mochi's compression (8x space, 6x time), few channels.
TINY_VAE_ENCODER = dict(
    in_channels=15, base_channels=32, channel_multipliers=[1, 2, 3, 4], num_res_blocks=[1, 1, 1, 1, 1],
    latent_dim=12, temporal_reductions=[1, 2, 3], spatial_reductions=[2, 2, 2], prune_bottlenecks=[False] * 5,
    has_attentions=[False, True, True, True, True], affine=True, bias=True, input_is_conv_1x1=True,
    padding_mode="replicate",
)
TINY_VAE_DECODER = dict(
    out_channels=3, base_channels=32, channel_multipliers=[1, 2, 3, 4], temporal_expansions=[1, 2, 3],
    spatial_expansions=[2, 2, 2], num_res_blocks=[1, 1, 1, 1, 1], latent_dim=12, has_attention=[False] * 5,
    padding_mode="replicate", output_norm=False, nonlinearity="silu", output_nonlinearity="silu", causal=True,
)


class TinyModelError(ValueError):
    """A file handed to a tiny test loader does not hold what it should (names the file and key)."""


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _need(sd: dict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise TinyModelError(f"{what}: key {key!r} missing (keys start {sorted(sd)[:3]})")
    return sd[key]


# ---------------------------------------------------------------------------------------------
# DiT


def mochi_unet_config(sd: dict[str, torch.Tensor], what: str = "Mochi DiT") -> dict:
    """ComfyUI's own Mochi unet_config (from `model_detection.detect_unet_config`), with the
    sizes read off the weights instead of the full-size constants."""
    import comfy.model_detection

    cfg = comfy.model_detection.detect_unet_config(sd, "")
    if not cfg or cfg.get("image_model") != "mochi_preview":
        raise TinyModelError(f"{what}: ComfyUI does not detect a Mochi DiT in these weights")
    x = _need(sd, "x_embedder.proj.weight", what)
    y = _need(sd, "t5_yproj.weight", what)
    head_dim = _need(sd, "blocks.0.attn.q_norm_x.weight", what).shape[0]
    cfg.update(
        depth=_count(sd, r"^blocks\.(\d+)\."), patch_size=x.shape[2], in_channels=x.shape[1],
        hidden_size_x=x.shape[0], num_heads=x.shape[0] // head_dim, hidden_size_y=y.shape[0], t5_feat_dim=y.shape[1],
    )
    # mlp_ratio_x stays 4 (Mochi's): ComfyUI asserts hidden_size_x * mlp_ratio_x == 12288, so a
    # tiny one runs only under `python -O` -- the test server is started that way.
    if __debug__ and cfg["hidden_size_x"] * cfg["mlp_ratio_x"] != 12288:
        raise TinyModelError(f"{what}: a tiny ComfyUI Mochi needs the server started with python -O")
    return cfg


def load_tiny_mochi(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None, what: str = "Mochi DiT"):
    """A ModelPatcher holding ComfyUI's Mochi at the size of `sd`, as comfy.sd.load_diffusion_model_state_dict
    builds one (prefix stripped, ComfyUI's dtype choice, get_model, load_model_weights)."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    sd = stripped or sd
    model_config = comfy.model_detection.model_config_from_unet_config(mochi_unet_config(sd, what), sd)
    if model_config is None:
        raise TinyModelError(f"{what}: no ComfyUI model config matches")
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=supported,
                              weight_dtype=comfy.utils.weight_dtype(sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))
    model = model_config.get_model(sd, "").to(offload_device)
    expected = model.diffusion_model.state_dict()
    missing = sorted(set(expected) - set(sd))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or wrong:
        raise TinyModelError(f"{what}: weights do not fit the model read off them: missing {missing[:4]}, "
                             f"wrong shapes {wrong[:4]}")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# ---------------------------------------------------------------------------------------------
# T5


def t5_config(sd: dict[str, torch.Tensor], what: str = "T5") -> dict:
    """Overrides of ComfyUI's T5-XXL config (`t5xxl_model_config`) for the sizes of `sd`."""
    shared = _need(sd, "shared.weight", what)
    bias = _need(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)
    heads = bias.shape[1]
    return dict(
        vocab_size=shared.shape[0], d_model=shared.shape[1], num_layers=_count(sd, r"^encoder\.block\.(\d+)\."),
        num_heads=heads, d_kv=_need(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", what).shape[0] // heads,
        d_ff=_need(sd, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", what).shape[0],
        relative_attention_num_buckets=bias.shape[0],
    )


def load_tiny_mochi_clip(sd: dict[str, torch.Tensor], embedding_directory=None, model_options: dict | None = None,
                         what: str = "T5"):
    """`comfy.sd.CLIP` with ComfyUI's Mochi T5 classes and tokenizer (CLIPLoader type 'mochi'),
    the T5 sized by ComfyUI's own `t5xxl_model_config` option, weights loaded by `CLIP.load_sd`."""
    import comfy.sd
    import comfy.text_encoders.genmo
    import comfy.text_encoders.sd3_clip
    import comfy.utils

    class Target:
        params: dict = {}
        # dtype and scaled-fp8 layout detected from the weights, as CLIPLoader does for type 'mochi'
        clip = comfy.text_encoders.genmo.mochi_te(**comfy.text_encoders.sd3_clip.t5_xxl_detect(sd))
        tokenizer = comfy.text_encoders.genmo.MochiT5Tokenizer

    options = {**(model_options or {}), "t5xxl_model_config": t5_config(sd, what)}
    clip = comfy.sd.CLIP(Target, embedding_directory=embedding_directory,
                         parameters=comfy.utils.calculate_parameters(sd), model_options=options)
    missing, _unexpected = clip.load_sd(sd)
    if missing:
        raise TinyModelError(f"{what}: missing weights {list(missing)[:4]}")
    return clip


# ---------------------------------------------------------------------------------------------
# VAE


def tiny_video_vae(video_vae_class=None):
    """ComfyUI's genmo `VideoVAE` (its encode/decode) with a tiny Encoder/Decoder. VideoVAE()
    hard-codes the full size, so the instance is assembled from the same parts."""
    import comfy.ldm.genmo.vae.model as gm

    cls = video_vae_class or gm.VideoVAE
    vae = cls.__new__(cls)
    torch.nn.Module.__init__(vae)
    vae.encoder = gm.Encoder(**TINY_VAE_ENCODER)
    vae.decoder = gm.Decoder(**TINY_VAE_DECODER)
    return vae


def random_fill_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """ComfyUI's ops leave weights uninitialised: fill every tensor, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def load_tiny_mochi_vae(sd: dict[str, torch.Tensor], metadata=None, what: str = "VAE"):
    """`comfy.sd.VAE` (ComfyUI's Mochi VAE wrapper: ratios, dtypes, tiling, patcher) around the
    tiny VideoVAE: its genmo branch is taken from the weights' keys, as for the real file."""
    import comfy.ldm.genmo.vae.model as gm
    import comfy.sd

    full_size = gm.VideoVAE
    gm.VideoVAE = lambda: tiny_video_vae(full_size)  # only while comfy.sd.VAE takes its Mochi branch
    try:
        vae = comfy.sd.VAE(sd=sd, metadata=metadata)  # wrong shapes raise here; missing keys only warn
    finally:
        gm.VideoVAE = full_size
    if vae.first_stage_model is None or vae.latent_channels != 12:
        raise TinyModelError(f"{what}: ComfyUI did not take it for a Mochi VAE")
    missing = sorted(set(vae.first_stage_model.state_dict()) - set(sd))
    if missing:
        raise TinyModelError(f"{what}: not the tiny Mochi VAE, missing {missing[:4]}")
    return vae


# ---------------------------------------------------------------------------------------------
# Wan: the DiT loads through ComfyUI's stock loader at any size (it reads every size it needs
# from the shapes); umT5 and the Wan VAE are built only at full size, hence these two.


def is_wan_dit(sd: dict) -> bool:
    return any(k.endswith("head.modulation") for k in sd)


def is_wan_vae(sd: dict) -> bool:
    return "decoder.middle.0.residual.0.gamma" in sd  # ComfyUI's own test for a Wan VAE


def load_tiny_wan_clip(sd: dict[str, torch.Tensor], embedding_directory=None, model_options: dict | None = None,
                       what: str = "umT5"):
    """`comfy.sd.CLIP` with ComfyUI's Wan umT5 classes and tokenizer (CLIPLoader type 'wan'), the
    umT5 sized by ComfyUI's own `umt5xxl_model_config` option, the tokenizer the SentencePiece
    model the file carries (`spiece_model`, as in ComfyUI's umT5 files), weights by `CLIP.load_sd`."""
    import comfy.sd
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.wan
    import comfy.utils

    spiece = _need(sd, "spiece_model", what)
    weights = {k: v for k, v in sd.items() if k != "spiece_model"}

    class Target:
        params: dict = {}
        clip = comfy.text_encoders.wan.te(**comfy.text_encoders.sd3_clip.t5_xxl_detect(weights))
        tokenizer = comfy.text_encoders.wan.WanT5Tokenizer

    options = {**(model_options or {}), "umt5xxl_model_config": t5_config(weights, what)}
    clip = comfy.sd.CLIP(Target, embedding_directory=embedding_directory, tokenizer_data={"spiece_model": spiece},
                         parameters=comfy.utils.calculate_parameters(weights), model_options=options)
    missing, _unexpected = clip.load_sd(weights)
    if missing:
        raise TinyModelError(f"{what}: missing weights {list(missing)[:4]}")
    return clip


def wan_vae_config(sd: dict[str, torch.Tensor], what: str = "Wan VAE") -> dict:
    """ComfyUI `WanVAE` arguments (2.1 or 2.2 class) for the sizes of Wan VAE weights."""
    dim = _need(sd, "encoder.conv1.weight", what).shape[0]
    z_dim = _need(sd, "conv2.weight", what).shape[0]
    stages, temporal = [], []  # (residual blocks, width) per encoder stage; time halved after it
    if is_wan22_vae(sd):  # nested: encoder.downsamples.i.downsamples.j
        for i in range(_count(sd, r"^encoder\.downsamples\.(\d+)\.")):
            p = f"encoder.downsamples.{i}.downsamples."
            n = _count(sd, rf"^{re.escape(p)}(\d+)\.")
            res = [j for j in range(n) if f"{p}{j}.residual.6.weight" in sd]
            stages.append((len(res), _need(sd, f"{p}{res[-1]}.residual.6.weight", what).shape[0]))
            if len(res) < n:
                temporal.append(f"{p}{n - 1}.time_conv.weight" in sd)
    else:  # flat: the residual blocks of a stage, then its resample
        blocks, width = 0, dim
        for n in range(_count(sd, r"^encoder\.downsamples\.(\d+)\.")):
            p = f"encoder.downsamples.{n}."
            if f"{p}resample.1.weight" in sd:
                stages.append((blocks, width))
                temporal.append(f"{p}time_conv.weight" in sd)
                blocks = 0
            else:
                blocks += 1
                width = _need(sd, f"{p}residual.6.weight", what).shape[0]
        stages.append((blocks, width))
    config = dict(dim=dim, z_dim=z_dim, dim_mult=[w // dim for _, w in stages], num_res_blocks=stages[0][0],
                  attn_scales=[], temperal_downsample=temporal, dropout=0.0)
    if is_wan22_vae(sd):
        config["dec_dim"] = _need(sd, "decoder.conv1.weight", what).shape[0] // config["dim_mult"][-1]
    return config


def is_wan22_vae(sd: dict) -> bool:
    return "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd  # ComfyUI's own test


def load_tiny_wan_vae(sd: dict[str, torch.Tensor], metadata=None, what: str = "VAE"):
    """`comfy.sd.VAE` (ComfyUI's Wan 2.1 / 2.2 VAE branch: ratios, dtypes, process in/out, patcher)
    around ComfyUI's `WanVAE` class at the size of the weights (the branch fixes the full size)."""
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2
    import comfy.sd

    module = comfy.ldm.wan.vae2_2 if is_wan22_vae(sd) else comfy.ldm.wan.vae
    config, full_size = wan_vae_config(sd, what), module.WanVAE
    module.WanVAE = lambda **_full: full_size(**config)  # only while comfy.sd.VAE takes its Wan branch
    try:
        vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    finally:
        module.WanVAE = full_size
    if vae.first_stage_model is None or vae.latent_channels != config["z_dim"]:
        raise TinyModelError(f"{what}: ComfyUI did not take it for a Wan VAE")
    missing = sorted(set(vae.first_stage_model.state_dict()) - set(sd))
    if missing:
        raise TinyModelError(f"{what}: not a tiny Wan VAE, missing {missing[:4]}")
    return vae
