"""The frozen Mochi models, from local files only: transformer, VAE, T5 text encoder, tokenizer.

Nothing here downloads: every loader takes local paths and fails with the path and what was
expected when something is missing (docs/method.md "Base model", "ComfyUI's Mochi").

Transformer (diffusers `MochiTransformer3DModel`), either
- a diffusers folder (`transformer/` of genmo/mochi-1-preview);
- a diffusers single file with a local config folder;
- a genmo / ComfyUI single file (`mochi_preview_dit_*.safetensors` in ComfyUI's
  `models/diffusion_models/`): no config needed, the shapes give it;
- "tiny": the random test model of `tiny`.

VAE (diffusers `AutoencoderKLMochi`), either
- a diffusers folder: `config.json` + `diffusion_pytorch_model*.safetensors` (the `vae/` folder of
  `genmo/mochi-1-preview`), or the pipeline folder holding `vae/`;
- one `.safetensors` file with diffusers key names, plus `config_dir` holding its `config.json`
  (defaults to the file's own folder);
- one `.safetensors` file in the genmo / ComfyUI key layout, as ComfyUI users have
  `models/vae/mochi_vae.safetensors` (keys `encoder.layers.*` / `decoder.blocks.*`, also genmo's
  unprefixed `encoder.safetensors`, or a checkpoint holding it under `first_stage_model.` / `vae.`):
  converted in memory by `vae_keys`, the config derived from the tensors (the real file gives
  diffusers' default config), no `config_dir` needed. It must hold the encoder; a file without
  the decoder loads, and decoding with it raises an error saying so.

Text encoder (transformers `T5EncoderModel`, T5-XXL for Mochi), either
- a transformers folder (`config.json` + weights), e.g. `text_encoder/` of genmo/mochi-1-preview;
- one `.safetensors` file in Hugging Face T5 key names, as ComfyUI users have
  `models/text_encoders/t5xxl_fp16.safetensors`, plus a folder with T5-XXL's `config.json`
  (`config_dir`; defaults to the tokenizer folder, then the file's own folder).
The tokenizer is a local transformers tokenizer folder (`tokenizer/` of genmo/mochi-1-preview or
google/t5-v1_1-xxl).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import KeyLayoutError, ModelFileError, ModelFileNotFoundError
from ..statedict import count_indexed
from . import dit_keys
from .vae_keys import convert_genmo_vae, is_genmo_vae

# ---------------------------------------------------------------- files

def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelFileNotFoundError(f"{path}: not found; expected {what}")


def _config_folder(candidates: list[Path | None], sub: str, what: str, for_file: Path) -> Path:
    """First folder among candidates that has config.json (directly or in `sub/`)."""
    tried = []
    for c in candidates:
        if c is None:
            continue
        for d in (c, c / sub):
            tried.append(str(d))
            if (d / "config.json").is_file():
                return d
    raise ModelFileError(
        f"{for_file}: a single weights file needs the model's config.json ({what}); "
        f"none found in: {', '.join(tried) or '(no folder given)'}"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # truncated/corrupt header or data
        raise ModelFileError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(
    path: Path, keep: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """A .safetensors file read tensor by tensor into memory of its own (plain reads, no memory
    map: the file's pages stay in the OS page cache, outside this process), each passed through
    `keep(key, tensor) -> {key: tensor}` before the next is read, so a conversion (e.g. fp8
    quantisation) never holds the whole file in its source form. Format: 8-byte little-endian
    header length, a JSON header {key: {dtype, shape, data_offsets}}, then the data."""
    import json
    import math
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            out: dict[str, torch.Tensor] = {}
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                dtype = _ST_DTYPES[info["dtype"]]
                start, end = info["data_offsets"]
                t = torch.empty(info["shape"], dtype=dtype)
                nbytes = math.prod(info["shape"]) * t.element_size()
                if end - start != nbytes:
                    raise ValueError(f"{key}: {end - start} bytes for {info['dtype']} {info['shape']} ({nbytes} expected)")
                if nbytes:
                    f.seek(8 + n + start)
                    got = f.readinto(t.reshape(-1).view(torch.uint8).numpy())
                    if got != nbytes:
                        raise ValueError(f"{key}: file ends after {got} of its {nbytes} bytes")
                out.update(keep(key, t) if keep is not None else {key: t})
                del t
            return out
    except (OSError, ValueError, KeyError, struct.error) as e:  # truncated or corrupt header or data
        raise ModelFileError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- transformer

def config_from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """MochiTransformer3DModel config read off the weights' shapes."""
    n = count_indexed(sd, "transformer_blocks.", "diffusers Mochi weights")
    head_dim = sd["transformer_blocks.0.attn1.norm_q.weight"].shape[0]
    inner = sd["transformer_blocks.0.attn1.to_q.weight"].shape[0]
    return dict(
        num_layers=n,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        pooled_projection_dim=sd["transformer_blocks.0.attn1.add_q_proj.weight"].shape[1],
        in_channels=sd["patch_embed.proj.weight"].shape[1],
        patch_size=sd["patch_embed.proj.weight"].shape[2],
        text_embed_dim=sd["time_embed.caption_proj.weight"].shape[1],
        time_embed_dim=sd["time_embed.timestep_embedder.linear_1.weight"].shape[1],
    )


def load_genmo_file(
    path: str | Path, dtype: torch.dtype = torch.float32, linear_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """A genmo / ComfyUI Mochi DiT `.safetensors` -> diffusers MochiTransformer3DModel.

    Scaled fp8 files (ComfyUI's `mochi_preview_fp8_scaled.safetensors`) keep their fp8 Linear
    weights with their scales (as `fp8.FrozenLinear`); every other tensor is cast to `dtype`.
    `linear_dtype` fp8: a bf16/fp32 file's Linear weights are quantised (one scale per tensor) as
    each is read, so the file's full-precision weights are never all in memory at once.

    Memory: the file is read tensor by tensor into the process's own memory (`read_safetensors`);
    the SwiGLU weights whose row halves genmo stores the other way round are swapped in place;
    the model takes the tensors as they are (no copy): peak about the model's size."""
    from diffusers import MochiTransformer3DModel

    from . import fp8

    path = Path(path)
    quantise = linear_dtype is not None and fp8.is_fp8(linear_dtype)

    def keep(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor as the model will hold it, before the next is read."""
        if fp8.is_fp8(t.dtype) or not t.is_floating_point() or key.rsplit(".", 1)[-1] in fp8.SCALE_KEYS:
            return {key: t}  # fp8 weights, the marker and the scales: as stored (split_scales reads them)
        if quantise and t.ndim == 2 and key.endswith(".weight"):
            q, scale = fp8.quantize_fp8(t, linear_dtype)  # genmo's fused qkv: one scale for q, k, v
            return {key: q, key[: -len("weight")] + "scale_weight": scale}
        return {key: t.to(dtype)}

    raw = read_safetensors(path, keep)
    raw, scales, _ = fp8.split_scales(raw, str(path))  # fp8 marker and scale keys out of the way
    try:
        sd = dit_keys.genmo_to_diffusers(raw, in_place=True)  # our own tensors: swap halves in place
        module_scales = fp8.convert_scales(raw, scales, dit_keys.genmo_to_diffusers) if scales else {}
    except KeyLayoutError as e:
        raise ModelFileError(f"{path}: not a Mochi DiT in genmo/ComfyUI key layout: {e}") from e
    del raw
    config = config_from_diffusers_state_dict(sd)
    with torch.device("meta"):  # not accelerate's init_empty_weights: it makes each weight on the CPU first
        model = MochiTransformer3DModel(**config)
    expected = model.state_dict()
    for k, t in sd.items():
        if k in expected and expected[k].shape != t.shape:
            raise ModelFileError(f"{path}: {k} has shape {tuple(t.shape)}, a Mochi with config {config} expects {tuple(expected[k].shape)}")
    fp8.dequantize_outside_linears(sd, model, module_scales)
    for k, t in sd.items():
        if not fp8.is_fp8(t.dtype):
            sd[k] = t.to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    if any(fp8.is_fp8(t.dtype) for t in sd.values()):
        fp8.attach_scales(model, module_scales, str(path))
        fp8.freeze_linears(model)  # unscaled fp8 Linears (scale 1) and the rest: one Linear type
    return model.eval()


def _looks_genmo(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.split(".", 2)[-1].startswith("blocks.") or k.startswith("blocks.") or ".blocks." in k for k in f.keys())
    except Exception:
        return False


def load_transformer(source: str, config_dir: str = "", dtype: torch.dtype = torch.float32, seed: int = 0,
                     tiny: dict | None = None, linear_dtype: torch.dtype | None = None):
    """Frozen base model from `source` (see module docstring). `linear_dtype` fp8: a genmo/ComfyUI
    file's Linear weights quantised while loading (other sources: later, by `fp8.freeze_linears`)."""
    from diffusers import MochiTransformer3DModel

    if source == "tiny":
        from .tiny import tiny_transformer

        model = tiny_transformer(seed=seed, **(tiny or {}))
        return model if dtype == torch.float32 else model.to(dtype)
    path = Path(source)
    if path.is_dir():
        return MochiTransformer3DModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    if path.is_file():
        if path.suffix == ".safetensors" and _looks_genmo(path):
            return load_genmo_file(path, dtype, linear_dtype)
        if not config_dir or not Path(config_dir).is_dir():
            raise ModelFileNotFoundError(
                f"{path}: a diffusers single-file Mochi needs `transformer_config`, a local folder with the "
                f"transformer's config.json (got {config_dir!r}); nothing is downloaded"
            )
        return MochiTransformer3DModel.from_single_file(str(path), config=config_dir, local_files_only=True, torch_dtype=dtype)
    raise ModelFileNotFoundError(f"transformer {source!r}: no such file or folder (expected a diffusers folder or a .safetensors)")


# ---------------------------------------------------------------- VAE

class _AbsentDecoder(torch.nn.Module):
    """Stands in for the decoder of a VAE file that has none: fails with the file's name when used."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def forward(self, *args, **kwargs):
        raise ModelFileError(
            f"{self.source}: this VAE file has no decoder weights (only the encoder), so it cannot decode; "
            "use a Mochi VAE file with its decoder (keys decoder.blocks.*) or the diffusers vae/ folder"
        )


def _vae_from_genmo(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype):
    """AutoencoderKLMochi from genmo / ComfyUI-layout weights, converted in memory, loaded strictly."""
    from diffusers import AutoencoderKLMochi

    try:
        conv = convert_genmo_vae(sd)
    except KeyLayoutError as e:
        raise ModelFileError(f"{path}: genmo/ComfyUI-layout Mochi VAE that cannot be converted: {e}") from e
    if "encoder" not in conv.parts:
        raise ModelFileError(
            f"{path}: {conv.describe()}. Preparing a dataset encodes clips and needs the VAE encoder "
            "(keys encoder.layers.*): use a Mochi VAE file that includes it, or the vae/ folder of "
            "genmo/mochi-1-preview (diffusers format)"
        )
    with torch.device("meta"):  # the file supplies every weight: no memory or time for a random init
        vae = AutoencoderKLMochi(**conv.config)
    if "decoder" not in conv.parts:
        vae.decoder = _AbsentDecoder(str(path))  # no random decoder that would decode to noise
    expected = vae.state_dict()
    for k, t in expected.items():  # the config comes from the tensors; this catches e.g. pruned bottlenecks
        if k in conv.state_dict and conv.state_dict[k].shape != t.shape:
            raise ModelFileError(
                f"{path}: converted key {k!r} has shape {tuple(conv.state_dict[k].shape)}, "
                f"AutoencoderKLMochi({conv.config}) expects {tuple(t.shape)}"
            )
    weights = {k: v.to(dtype) for k, v in conv.state_dict.items()}
    try:
        vae.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:  # missing / unexpected keys: the converter and diffusers disagree
        raise ModelFileError(f"{path}: converted weights do not fit AutoencoderKLMochi: {e}") from e
    left = [n for n, p in vae.named_parameters() if p.is_meta] + [n for n, b in vae.named_buffers() if b.is_meta]
    if left:
        raise ModelFileError(f"{path}: VAE weights left unset after loading: {left[:3]}")
    return vae


def vae_from_genmo_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                              source: str = "state dict"):
    """AutoencoderKLMochi from genmo / ComfyUI-layout VAE weights held in memory (e.g. the weights
    of a VAE ComfyUI has loaded); `source` names them in errors."""
    return _vae_from_genmo(Path(source), dict(state_dict), dtype).eval()


def _from_folder(path: Path, sub: str, cls, name: str, expected: str, **kwargs):
    """`cls.from_pretrained` on a local folder holding config.json, directly or in `sub/`."""
    folder = path if (path / "config.json").is_file() else path / sub
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"{path}: no config.json here or in {sub}/; expected {expected} folder")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:
        raise ModelFileError(f"{folder}: cannot load as {name} ({type(e).__name__}: {e})") from e


def load_vae(
    path: str | os.PathLike,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Mochi VAE (`AutoencoderKLMochi`) from a diffusers folder or one .safetensors file.

    The file may use diffusers key names (config from `config_dir` or the file's folder) or the
    genmo / ComfyUI layout (converted; `config_dir` is not used). See the module docstring.
    """
    from diffusers import AutoencoderKLMochi

    path = Path(path)
    _require(path, "a Mochi VAE: a diffusers folder (config.json + weights) or a .safetensors file")
    if path.is_dir():
        vae = _from_folder(path, "vae", AutoencoderKLMochi, "AutoencoderKLMochi", "a diffusers AutoencoderKLMochi",
                           torch_dtype=dtype)
        return vae.to(device).eval()

    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path}: expected a .safetensors file or a diffusers folder, got {path.suffix!r}")
    sd = _load_safetensors(path)
    if is_genmo_vae(sd):
        return _vae_from_genmo(path, sd, dtype).to(device).eval()
    cfg_dir = _config_folder(
        [Path(config_dir) if config_dir else None, path.parent], "vae", "AutoencoderKLMochi config", path
    )
    vae = AutoencoderKLMochi.from_config(AutoencoderKLMochi.load_config(str(cfg_dir), local_files_only=True))
    expected = set(vae.state_dict())
    missing = sorted(expected - set(sd))
    if missing:
        kind = "no encoder weights" if any(k.startswith("encoder.") for k in missing) else "missing weights"
        raise ModelFileError(
            f"{path}: {kind} for the VAE of {cfg_dir / 'config.json'}: {len(missing)} keys missing, e.g. {missing[:3]}"
        )
    for k, t in vae.state_dict().items():
        if sd[k].shape != t.shape:
            raise ModelFileError(f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, the config expects {tuple(t.shape)}")
    vae.load_state_dict({k: sd[k] for k in expected})
    if dtype != torch.float32:  # from_config builds float32
        vae = vae.to(dtype)
    return vae.to(device).eval()


# ---------------------------------------------------------------- T5 and its tokenizer

def load_t5_tokenizer(tokenizer_dir: str | os.PathLike):
    """A local transformers tokenizer folder (T5's: spiece.model or tokenizer.json)."""
    from transformers import AutoTokenizer

    d = Path(tokenizer_dir)
    _require(d, "a tokenizer folder (tokenizer_config.json + spiece.model or tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise ModelFileError(f"{d}: cannot load a tokenizer from this folder ({type(e).__name__}: {e})") from e


def _t5_from_single_file(path: Path, cfg_dir: Path, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    sd = _load_safetensors(path)
    if any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in sd.values()) or "scaled_fp8" in sd:
        raise ModelFileError(f"{path}: fp8 text encoder weights are not supported here; use t5xxl_fp16.safetensors")
    config = T5Config.from_pretrained(str(cfg_dir), local_files_only=True)
    with torch.device("meta"):  # no memory for weights that the file replaces right away
        model = T5EncoderModel(config)
    expected = model.state_dict()
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]  # tied: either name carries it
    missing = sorted(k for k in expected if k not in sd and k != "encoder.embed_tokens.weight")
    if missing:
        raise ModelFileError(
            f"{path}: not a T5 encoder for {cfg_dir / 'config.json'}: {len(missing)} keys missing, e.g. {missing[:3]}"
        )
    for k, t in expected.items():
        if k in sd and sd[k].shape != t.shape:
            raise ModelFileError(f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, the config expects {tuple(t.shape)}")
    sd = {k: v.to(dtype) for k, v in sd.items() if k in expected}
    model.load_state_dict(sd, strict=False, assign=True)
    model.encoder.embed_tokens = model.shared  # keep the tie after assign replaced the parameter
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ModelFileError(f"{path}: weights left unset after loading: {left[:3]}")
    return model


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """-> (T5EncoderModel, tokenizer) from local files only (see the module docstring)."""
    from transformers import T5EncoderModel

    path = Path(path)
    _require(path, "a T5 encoder: a transformers folder or a .safetensors file (e.g. t5xxl_fp16.safetensors)")
    tokenizer = load_t5_tokenizer(tokenizer_dir)
    if path.is_dir():
        model = _from_folder(path, "text_encoder", T5EncoderModel, "T5EncoderModel", "a T5EncoderModel", dtype=dtype)
    elif path.suffix.lower() == ".safetensors":
        cfg_dir = _config_folder(
            [Path(config_dir) if config_dir else None, Path(tokenizer_dir), path.parent],
            "text_encoder", "T5 encoder config", path,
        )
        model = _t5_from_single_file(path, cfg_dir, dtype)
    else:
        raise ModelFileError(f"{path}: expected a .safetensors file or a transformers folder, got {path.suffix!r}")
    return model.to(device).eval(), tokenizer
