"""The frozen Wan models, from local files only: transformer, VAE, umT5 text encoder, tokenizer.

Nothing here downloads: every loader takes local paths and fails with the path and what was
expected when something is missing (docs/method.md "Wan 2.1 / 2.2").

Transformer (diffusers `WanTransformer3DModel`), either
- a ComfyUI single file (`wan2.1_t2v_1.3B_fp16.safetensors`, `wan2.1_t2v_14B_fp8_scaled.safetensors`,
  `wan2.2_ti2v_5B_fp16.safetensors`, `wan2.2_t2v_{high,low}_noise_14B_fp8_scaled.safetensors` in
  ComfyUI's `models/diffusion_models/`; original Wan keys, prefix optional): no config needed, the
  shapes give it (`dit_keys.detect_variant`). bf16 / fp16 / fp32 files are cast to `dtype`; scaled
  fp8 files keep their fp8 Linear weights with their per-tensor scales (`fp8.FrozenLinear`), except
  the time embedder's, which are dequantised (`KEEP_PRECISION`);
- a single file in diffusers' key names (config from its shapes too);
- a diffusers folder (`transformer/` of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or the pipeline folder);
- "tiny": the random test model of `tiny`.
As `from_pretrained` does, the modules diffusers keeps in float32 (time embedder, modulation
tables, norms) stay float32 when `dtype` is bf16 / fp16.

VAE (diffusers `AutoencoderKLWan`): ComfyUI's `wan_2.1_vae.safetensors` or `wan2.2_vae.safetensors`
(original Wan keys, converted by `vae_keys`), a file in diffusers' keys, or a diffusers folder (`vae/`).

Text encoder (transformers `UMT5EncoderModel`): ComfyUI's `umt5_xxl_fp16.safetensors` /
`umt5_xxl_fp8_e4m3fn_scaled.safetensors` (Hugging Face T5 key names; fp8 weights are dequantised
with their scales, the encoder runs once per caption at prepare time), or a transformers folder.
Tokenizer: a local transformers tokenizer folder (`tokenizer/` of a Wan diffusers pipeline or
google/umt5-xxl), or else the SentencePiece model ComfyUI's umT5 files carry (`spiece_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import fp8
from ..errors import KeyLayoutError, ModelFileError, ModelFileNotFoundError
from . import dit_keys
from .tokenizer import tokenizer_from_spiece

# ---------------------------------------------------------------- files


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelFileNotFoundError(f"{path}: not found; expected {what}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # truncated/corrupt header or data
        raise ModelFileError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e


def _keep_fp32(key: str, names: list[str] | None) -> bool:
    """diffusers' rule for `_keep_in_fp32_modules`: a module name among the key's path parts."""
    return bool(names) and any(n in key.split(".") for n in names)


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype, keep_fp32: list[str] | None) -> dict[str, torch.Tensor]:
    """Every non-fp8 tensor to `dtype`, except the modules diffusers keeps in float32."""
    out = {}
    for k, t in sd.items():
        if fp8.is_fp8(t.dtype):
            out[k] = t
        elif dtype in (torch.float16, torch.bfloat16) and _keep_fp32(k, keep_fp32):
            out[k] = t.float()
        else:
            out[k] = t.to(dtype)
    return out


# ---------------------------------------------------------------- transformer

# diffusers' Wan casts the sinusoidal time features to the time embedder's parameter dtype, so
# its Linears cannot stay in fp8 (ComfyUI's scaled files may store them so): they are dequantised.
KEEP_PRECISION = ("condition_embedder.time_embedder",)


def _transformer_from_diffusers_sd(
    path: Path, sd: dict[str, torch.Tensor], module_scales: dict[str, torch.Tensor],
    variant: dit_keys.WanVariant, dtype: torch.dtype,
):
    """WanTransformer3DModel of `variant` holding `sd` (diffusers keys), fp8 Linears kept scaled."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = dit_keys.diffusers_config(variant)
    with init_empty_weights():
        model = WanTransformer3DModel(**config)
    expected = model.state_dict()
    for k, t in sd.items():
        if k in expected and expected[k].shape != t.shape:
            raise ModelFileError(
                f"{path}: {k} has shape {tuple(t.shape)}, a {variant.name} with config {config} expects "
                f"{tuple(expected[k].shape)}"
            )
    fp8.dequantize_outside_linears(sd, model, module_scales)
    sd = _cast(sd, dtype, getattr(model, "_keep_in_fp32_modules", None))
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # missing / unexpected keys: the file and the config disagree
        raise ModelFileError(f"{path}: weights do not fit WanTransformer3DModel({config}): {e}") from e
    # buffers (the RoPE tables) are not in the file: init_empty_weights left them real, keep them
    if any(fp8.is_fp8(t.dtype) for t in sd.values()):
        fp8.attach_scales(model, module_scales, str(path))
        # unscaled fp8 Linears (scale 1) and the rest: one Linear type; the time embedder dequantised
        fp8.freeze_linears(model, keep=KEEP_PRECISION)
    return model.eval()


def load_comfy_file(path: str | Path, dtype: torch.dtype = torch.float32):
    """A ComfyUI / original Wan DiT `.safetensors` -> diffusers WanTransformer3DModel (see the
    module docstring: bf16 / fp16 / fp32 cast to `dtype`, scaled fp8 kept fp8 with its scales)."""
    path = Path(path)
    raw = _load_safetensors(path)
    raw, scales, _ = fp8.split_scales(raw, str(path))  # fp8 marker and scale keys out of the way
    try:
        variant = dit_keys.detect_variant(raw, str(path))
        sd = dit_keys.comfy_to_diffusers(raw)
        module_scales = fp8.convert_scales(raw, scales, dit_keys.comfy_to_diffusers) if scales else {}
    except KeyLayoutError as e:
        raise ModelFileError(f"{path}: not a Wan transformer in ComfyUI's key layout: {e}") from e
    del raw
    return _transformer_from_diffusers_sd(path, sd, module_scales, variant, dtype)


def load_diffusers_file(path: str | Path, dtype: torch.dtype = torch.float32):
    """A single `.safetensors` in diffusers' WanTransformer3DModel key names, config from its shapes."""
    path = Path(path)
    raw = _load_safetensors(path)
    raw, scales, _ = fp8.split_scales(raw, str(path))
    try:
        comfy = dit_keys.diffusers_to_comfy(raw)
        variant = dit_keys.detect_variant(comfy, str(path))
    except KeyLayoutError as e:
        raise ModelFileError(f"{path}: not a Wan transformer in diffusers' key layout: {e}") from e
    module_scales = {k[: -len(".weight")]: s for k, s in scales.items()}
    return _transformer_from_diffusers_sd(path, raw, module_scales, variant, dtype)


def load_transformer(source: str, config_dir: str = "", dtype: torch.dtype = torch.float32, seed: int = 0,
                     tiny: dict | None = None):
    """Frozen Wan transformer from `source` (see the module docstring). `config_dir` is accepted for
    the same call as Mochi's loader; Wan single files need none (their shapes give the config)."""
    from diffusers import WanTransformer3DModel

    if source == "tiny":
        from .tiny import tiny_transformer

        model = tiny_transformer(seed=seed, **(tiny or {}))
        return model if dtype == torch.float32 else model.to(dtype)
    path = Path(source)
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "transformer"
        if not (folder / "config.json").is_file():
            raise ModelFileError(f"{path}: no config.json here or in transformer/; expected a diffusers "
                                 "WanTransformer3DModel folder")
        try:
            return WanTransformer3DModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype).eval()
        except Exception as e:
            raise ModelFileError(f"{folder}: cannot load as WanTransformer3DModel ({type(e).__name__}: {e})") from e
    if path.is_file():
        layout = dit_keys.wan_layout(path)
        if layout == "comfy":
            return load_comfy_file(path, dtype)
        if layout == "diffusers":
            return load_diffusers_file(path, dtype)
        raise ModelFileError(
            f"{path}: not a Wan transformer (no '{dit_keys.MARKER}' key in ComfyUI's layout, nor diffusers' "
            "WanTransformer3DModel keys); expected e.g. wan2.1_t2v_1.3B_fp16.safetensors"
        )
    raise ModelFileNotFoundError(f"transformer {source!r}: no such file or folder (expected a Wan .safetensors "
                                 "or a diffusers folder)")


def variant_of(model) -> dit_keys.WanVariant:
    """The WanVariant (sizes, kind, latent channels) of a loaded WanTransformer3DModel."""
    return dit_keys.variant_from_diffusers_config(model.config)


# ---------------------------------------------------------------- VAE


def _vae_from_comfy(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype):
    """AutoencoderKLWan from Wan 2.1- or 2.2-layout (ComfyUI) weights, converted in memory, loaded strictly."""
    from diffusers import AutoencoderKLWan

    from . import vae_keys

    try:
        conv = vae_keys.comfy_to_diffusers(sd)  # unknown keys first: they explain a failing config best
        config = vae_keys.config_from_comfy(sd)
    except KeyLayoutError as e:
        raise ModelFileError(f"{path}: a Wan VAE in ComfyUI's layout that cannot be converted: {e}") from e
    with torch.device("meta"):  # the file supplies every weight: no memory or time for a random init
        vae = AutoencoderKLWan(**config)
    expected = vae.state_dict()
    for k, t in expected.items():
        if k in conv and conv[k].shape != t.shape:
            raise ModelFileError(f"{path}: converted key {k!r} has shape {tuple(conv[k].shape)}, "
                                 f"AutoencoderKLWan({config}) expects {tuple(t.shape)}")
    try:
        vae.load_state_dict({k: v.to(dtype) for k, v in conv.items()}, strict=True, assign=True)
    except RuntimeError as e:  # missing / unexpected keys: the converter and diffusers disagree
        raise ModelFileError(f"{path}: converted weights do not fit AutoencoderKLWan: {e}") from e
    return vae


def vae_from_comfy_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                              source: str = "state dict"):
    """AutoencoderKLWan from Wan 2.1 / 2.2 VAE weights in ComfyUI's layout held in memory (e.g. the
    `first_stage_model` of a VAE ComfyUI has loaded); `source` names them in errors."""
    from . import vae_keys

    sd = dict(state_dict)
    if not vae_keys.is_comfy_wan_vae(sd):
        raise ModelFileError(f"{source}: not a Wan VAE in ComfyUI's layout (no decoder.middle.0.residual.0.gamma)")
    return _vae_from_comfy(Path(source), sd, dtype).eval()


def load_vae(path: str | Path, config_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu"):
    """Wan VAE (`AutoencoderKLWan`) from a diffusers folder or one .safetensors file.

    A file in ComfyUI's layout (`wan_2.1_vae.safetensors`, `wan2.2_vae.safetensors`) is converted,
    its config read from the tensors; a file in diffusers' keys needs `config_dir` (or its own
    folder) with config.json. The latent channels (16 or 48) tell the two VAEs apart afterwards."""
    from diffusers import AutoencoderKLWan

    from . import vae_keys

    path = Path(path)
    _require(path, "a Wan VAE: wan_2.1_vae.safetensors / wan2.2_vae.safetensors or a diffusers folder")
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise ModelFileError(f"{path}: no config.json here or in vae/; expected a diffusers AutoencoderKLWan folder")
        try:
            vae = AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
        except Exception as e:
            raise ModelFileError(f"{folder}: cannot load as AutoencoderKLWan ({type(e).__name__}: {e})") from e
        return vae.to(device).eval()
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path}: expected a .safetensors file or a diffusers folder, got {path.suffix!r}")
    sd = _load_safetensors(path)
    if vae_keys.is_comfy_wan_vae(sd):
        return _vae_from_comfy(path, sd, dtype).to(device).eval()
    cfg = Path(config_dir) if config_dir else path.parent
    folder = cfg if (cfg / "config.json").is_file() else cfg / "vae"
    if not (folder / "config.json").is_file():
        raise ModelFileError(
            f"{path}: not a Wan VAE in ComfyUI's layout (no decoder.middle.0.residual.0.gamma), and no "
            f"config.json for a diffusers-key file in {cfg} or {cfg / 'vae'}"
        )
    vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(str(folder), local_files_only=True))
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ModelFileError(f"{path}: {len(missing)} weights of the VAE in {folder / 'config.json'} missing, "
                             f"e.g. {missing[:3]}")
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            raise ModelFileError(f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, the config expects {tuple(t.shape)}")
    vae.load_state_dict({k: sd[k] for k in expected})
    return vae.to(dtype).to(device).eval()


# ---------------------------------------------------------------- umT5 and its tokenizer

SPIECE_KEY = "spiece_model"  # ComfyUI's umT5 files carry their SentencePiece model under this key


def load_umt5_tokenizer(tokenizer_dir: str | Path):
    """A local transformers tokenizer folder (umT5's: tokenizer.json, or spiece.model with protobuf)."""
    from transformers import AutoTokenizer

    d = Path(tokenizer_dir)
    _require(d, "a tokenizer folder (tokenizer_config.json + tokenizer.json), e.g. tokenizer/ of a Wan diffusers pipeline")
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise ModelFileError(f"{d}: cannot load a tokenizer from this folder ({type(e).__name__}: {e})") from e


def umt5_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "umT5 weights") -> dict:
    """`UMT5Config` arguments read off Hugging Face T5-key umT5 encoder weights."""
    from ..statedict import count_indexed

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ModelFileError(f"{source}: key {key!r} missing; expected a umT5 encoder in Hugging Face T5 key names "
                                 "(e.g. umt5_xxl_fp16.safetensors)")
        return tuple(sd[key].shape)

    emb = "shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight"
    vocab, d_model = shape(emb)
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    return dict(
        vocab_size=vocab, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
        d_kv=shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
        num_layers=count_indexed(sd, "encoder.block.", source), feed_forward_proj="gated-gelu",
        relative_attention_max_distance=128, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False,
    )


def umt5_from_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, source: str = "umT5 weights"):
    """UMT5EncoderModel from a ComfyUI umT5 state dict (fp8 scaled weights dequantised; the
    `spiece_model` tensor, if any, is ignored here)."""
    from transformers import UMT5Config, UMT5EncoderModel

    sd = {k: v for k, v in sd.items() if k != SPIECE_KEY}
    weights, scales, _ = fp8.split_scales(sd, source)
    sd = {}
    for k, t in weights.items():
        if fp8.is_fp8(t.dtype):  # run once per caption at prepare time: plain weights are simpler
            t = t.float() * scales[k] if k in scales else t.float()
        sd[k] = t
    config = UMT5Config(**umt5_config_from_state_dict(sd, source))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    if "shared.weight" not in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{source}: not a umT5 encoder of config {config.to_diff_dict()}: "
                             f"missing {missing[:3]}, unexpected {extra[:3]}")
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            raise ModelFileError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def load_text_encoder(path: str | Path, tokenizer_dir: str | Path | None = None, config_dir: str | Path | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """-> (UMT5EncoderModel, tokenizer) from local files only (see the module docstring).

    `config_dir` (a folder with config.json) is used for a transformers folder only: a single
    file's config is read from its shapes. Without `tokenizer_dir`, a single file must carry
    ComfyUI's `spiece_model`."""
    from transformers import UMT5EncoderModel

    path = Path(path)
    _require(path, "a umT5 encoder: umt5_xxl_fp16.safetensors (or _fp8_e4m3fn_scaled) or a transformers folder")
    spiece = None
    if path.is_dir():
        folder = Path(config_dir) if config_dir else path
        folder = folder if (folder / "config.json").is_file() else path / "text_encoder"
        if not (folder / "config.json").is_file():
            raise ModelFileError(f"{path}: no config.json here or in text_encoder/; expected a UMT5EncoderModel folder")
        try:
            model = UMT5EncoderModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype).eval()
        except Exception as e:
            raise ModelFileError(f"{folder}: cannot load as UMT5EncoderModel ({type(e).__name__}: {e})") from e
    elif path.suffix.lower() == ".safetensors":
        sd = _load_safetensors(path)
        spiece = sd.get(SPIECE_KEY)
        model = umt5_from_state_dict(sd, dtype, str(path))
    else:
        raise ModelFileError(f"{path}: expected a .safetensors file or a transformers folder, got {path.suffix!r}")
    if tokenizer_dir:
        tokenizer = load_umt5_tokenizer(tokenizer_dir)
    elif spiece is not None:
        tokenizer = tokenizer_from_spiece(spiece, f"{path}: {SPIECE_KEY}")
    else:
        raise ModelFileError(
            f"{path}: no tokenizer: give a tokenizer folder (tokenizer/ of a Wan diffusers pipeline, or google/umt5-xxl), "
            f"or use ComfyUI's umT5 file, which carries its SentencePiece model ({SPIECE_KEY!r})"
        )
    return model.to(device), tokenizer
