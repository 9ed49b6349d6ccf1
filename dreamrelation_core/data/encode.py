"""Local Mochi VAE / T5 loading, VAE encoding of clips, caption embedding, latent normalisation.

Nothing here downloads: every loader takes local paths and fails with the path and what was
expected when something is missing.

VAE (diffusers `AutoencoderKLMochi`), either
- a diffusers folder: `config.json` + `diffusion_pytorch_model*.safetensors` (the `vae/` folder of
  `genmo/mochi-1-preview`), or the pipeline folder holding `vae/`;
- one `.safetensors` file with diffusers key names, plus `config_dir` holding its `config.json`
  (defaults to the file's own folder);
- one `.safetensors` file in the genmo / ComfyUI key layout, as ComfyUI users have
  `models/vae/mochi_vae.safetensors` (keys `encoder.layers.*` / `decoder.blocks.*`, also genmo's
  unprefixed `encoder.safetensors`, or a checkpoint holding it under `first_stage_model.` / `vae.`):
  converted in memory by `mochi_vae_convert`, the config derived from the tensors (the real file
  gives diffusers' default config), no `config_dir` needed. It must hold the encoder; a file
  without the decoder loads, and decoding with it raises an error saying so.

Text encoder (transformers `T5EncoderModel`, T5-XXL for Mochi), either
- a transformers folder (`config.json` + weights), e.g. `text_encoder/` of genmo/mochi-1-preview;
- one `.safetensors` file in Hugging Face T5 key names, as ComfyUI users have
  `models/text_encoders/t5xxl_fp16.safetensors`, plus a folder with T5-XXL's `config.json`
  (`config_dir`; defaults to the tokenizer folder, then the file's own folder).
The tokenizer is a local transformers tokenizer folder (`tokenizer/` of genmo/mochi-1-preview or
google/t5-v1_1-xxl).

Latents: the VAE's raw mean/logvar are cached; the trainer samples z from them and normalises it
per channel exactly as ComfyUI's Mochi latent format does: (z - mean) / std, with diffusers'
`AutoencoderKLMochi` default statistics (ComfyUI uses the same numbers, scale factor 1).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import KeyLayoutError, ModelFileError, ModelFileNotFoundError
from ..mochi.vae_keys import convert_genmo_vae, is_genmo_vae
from .latent_masks import SPATIAL_COMPRESSION, check_frame_count

# diffusers AutoencoderKLMochi config defaults == comfy.latent_formats.Mochi
MOCHI_LATENTS_MEAN: tuple[float, ...] = (
    -0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
    0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
    -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285,
)
MOCHI_LATENTS_STD: tuple[float, ...] = (
    0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041,
)
LATENT_CHANNELS = 12


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if z.ndim not in (4, 5) or z.shape[-4] != LATENT_CHANNELS:
        raise ValueError(f"expected Mochi latents [B?, 12, T, h, w], got shape {tuple(z.shape)}")
    mean = torch.tensor(MOCHI_LATENTS_MEAN, dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)
    std = torch.tensor(MOCHI_LATENTS_STD, dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)
    return mean, std  # [12, 1, 1, 1]: broadcasts over an optional leading batch dim


def normalize_latents(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> ComfyUI's Mochi latent space: (z - mean) / std per channel."""
    mean, std = _stats(z)
    return (z - mean) / std


def denormalize_latents(z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Mochi latent space -> raw VAE latents (inverse of normalize_latents)."""
    mean, std = _stats(z)
    return z * std + mean


# ---------------------------------------------------------------- loading

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
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise ModelFileError(f"{path}: no config.json here or in vae/; expected a diffusers AutoencoderKLMochi folder")
        try:
            vae = AutoencoderKLMochi.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
        except Exception as e:
            raise ModelFileError(f"{folder}: cannot load as AutoencoderKLMochi ({type(e).__name__}: {e})") from e
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


def load_tokenizer(tokenizer_dir: str | os.PathLike):
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
    tokenizer = load_tokenizer(tokenizer_dir)
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "text_encoder"
        if not (folder / "config.json").is_file():
            raise ModelFileError(f"{path}: no config.json here or in text_encoder/; expected a T5EncoderModel folder")
        try:
            model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        except Exception as e:
            raise ModelFileError(f"{folder}: cannot load as T5EncoderModel ({type(e).__name__}: {e})") from e
    elif path.suffix.lower() == ".safetensors":
        cfg_dir = _config_folder(
            [Path(config_dir) if config_dir else None, Path(tokenizer_dir), path.parent],
            "text_encoder", "T5 encoder config", path,
        )
        model = _t5_from_single_file(path, cfg_dir, dtype)
    else:
        raise ModelFileError(f"{path}: expected a .safetensors file or a transformers folder, got {path.suffix!r}")
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------- encoding

def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [F, H, W, 3] -> (mean, logvar), each float32 [12, T, H/8, W/8] on the CPU (raw VAE space)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    check_frame_count(frames.shape[0])
    if frames.shape[1] % SPATIAL_COMPRESSION or frames.shape[2] % SPATIAL_COMPRESSION:
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]} (HxW); the VAE needs multiples of 8")
    device, dtype = _module_device_dtype(vae)
    x = torch.from_numpy(frames).to(device).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    x = x.to(dtype) / 127.5 - 1.0  # VAE input range [-1, 1]
    dist = vae.encode(x).latent_dist
    mean, logvar = dist.mean[0].float().cpu(), dist.logvar[0].float().cpu()  # [12, T, h, w]
    return mean.contiguous(), logvar.contiguous()


@torch.no_grad()
def encode_captions(
    text_encoder, tokenizer, captions: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y_feat float32 [N, L, D], y_mask bool [N, L]) with L = max_length, padded as Mochi does."""
    if isinstance(captions, str):
        captions = [captions]
    tok = tokenizer(
        list(captions), padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )
    full = tokenizer(list(captions), add_special_tokens=True)["input_ids"]
    for c, ids in zip(captions, full):
        if len(ids) > max_length:
            warnings.warn(f"caption truncated to {max_length} tokens (has {len(ids)}): {c[:80]!r}", stacklevel=2)
    device, _ = _module_device_dtype(text_encoder)
    ids = tok["input_ids"].to(device)  # [N, L]
    mask = tok["attention_mask"].to(device).bool()  # [N, L]
    feat = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [N, L, D]
    return feat.float().cpu(), mask.cpu()
