"""CLIP features of video frames and text, offline, with the CLIP model the user has; CLIP-T and
temporal consistency.

Models accepted (never downloaded: `local_files_only=True`):
- a local Hugging Face folder: a full CLIP (`CLIPModel`, config `model_type: clip`) with its
  processor files, or an image tower alone (`CLIPVisionModelWithProjection`, `clip_vision_model`,
  e.g. an IP-Adapter `image_encoder/` folder);
- a single `.safetensors` / `.bin` / `.pt` file such as ComfyUI's `models/clip_vision/*.safetensors`,
  in Hugging Face key names (`vision_model.*`, `visual_projection.weight`, optionally
  `text_model.*`, `text_projection.weight`) or open_clip key names (`visual.*`,
  `transformer.resblocks.*`, `text_projection`). Its architecture is read from the tensor
  shapes; the attention head count (not visible in shapes) and the activation follow the published
  CLIP models: width/64 heads except the 1280- and 1664-wide image towers (ViT-H, ViT-bigG: 16),
  `quick_gelu` up to width 1024 (OpenAI's B and L) and `gelu` above (LAION's H and bigG). Both can
  be overridden.

ComfyUI's clip_vision files hold the image tower only: they give temporal consistency and
appearance leakage, but CLIP-T needs the text tower as well (a full CLIP folder or file), and a
file needs a tokenizer folder (`vocab.json` + `merges.txt`, the same BPE for OpenAI and open_clip
models).

Frames are prepared by transformers' `CLIPImageProcessor`, exactly as CLIP expects: shortest side
resized to the model's input size (bicubic), centre crop to a square, CLIP mean/std.

Metrics (cosine similarities of the projected, L2-normalised embeddings, each in [-1, 1]):
- CLIP-T: mean over frames of cos(text, frame). Papers often print it multiplied by 100.
- temporal consistency: mean over t of cos(frame_t, frame_t+1).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import statedict
from ..errors import EvaluationError, KeyLayoutError, ModelFileError, ModelFileNotFoundError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
_TEXT_TOWER_HINT = (
    "CLIP-T needs CLIP's text tower as well: use a full CLIP model, e.g. a local Hugging Face CLIP folder "
    "(openai/clip-vit-large-patch14 saved with save_pretrained) or a .safetensors holding text_model.* keys"
)


# ---------------------------------------------------------------- the encoder


@dataclass
class ClipEncoder:
    """A CLIP image tower (+ optional text tower) ready to embed frames and prompts."""

    vision: torch.nn.Module  # transformers CLIPVisionTransformer (pooler_output = CLS after post-LN)
    visual_projection: torch.nn.Module
    image_processor: object  # transformers CLIPImageProcessor
    text: torch.nn.Module | None = None  # CLIPTextTransformer
    text_projection: torch.nn.Module | None = None
    tokenizer: object | None = None
    source: str = "CLIP"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ClipEncoder:
        """Move both towers (in place) and return self."""
        device, dtype = torch.device(device), dtype or self.dtype
        for m in (self.vision, self.visual_projection, self.text, self.text_projection):
            if m is not None:
                m.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.visual_projection.weight.shape[0])

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [F, H, W, 3] -> [F, 3, S, S] normalised as the CLIP processor does."""
        frames = _check_frames(frames, self.source)
        out = self.image_processor(images=list(frames), return_tensors="pt")
        return out["pixel_values"]

    @torch.no_grad()
    def image_features(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] -> unit-length image embeddings, float32 [F, D] on the CPU."""
        frames = _check_frames(frames, self.source)
        feats = []
        for i in range(0, len(frames), batch_size):
            px = self.pixel_values(frames[i : i + batch_size]).to(self.device, self.dtype)
            pooled = self.vision(pixel_values=px).pooler_output
            feats.append(self.visual_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> unit-length text embeddings, float32 [N, D] on the CPU."""
        if self.text is None:
            raise ModelFileError(f"{self.source}: holds CLIP's image tower only (no text_model.* weights). {_TEXT_TOWER_HINT}")
        if self.tokenizer is None:
            raise ModelFileError(
                f"{self.source}: has a text tower but no tokenizer: pass a tokenizer folder with "
                f"{' and '.join(TOKENIZER_FILES)} (the CLIP BPE, e.g. ComfyUI's comfy/sd1_tokenizer)"
            )
        max_len = int(self.text.embeddings.position_embedding.weight.shape[0])
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = self.text(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(self.text_projection(out.pooler_output).float().cpu(), dim=-1)


def _check_frames(frames: np.ndarray, source: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise EvaluationError(f"{source}: expected frames uint8 [F, H, W, 3] with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise EvaluationError(f"{source}: expected uint8 frames (0..255), got {frames.dtype}")
    return frames


# ---------------------------------------------------------------- metrics on features


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def clip_t_score(frame_features: torch.Tensor, text_feature: torch.Tensor) -> float:
    """Mean over frames of cos(frame, text). frame_features [F, D], text_feature [D] or [1, D]."""
    f = _unit(frame_features)
    t = _unit(text_feature.reshape(-1))
    if f.ndim != 2 or f.shape[1] != t.shape[0]:
        raise EvaluationError(f"CLIP-T: frame features {tuple(frame_features.shape)} and text feature "
                             f"{tuple(text_feature.shape)} do not share one embedding size")
    return float((f @ t).mean())


def temporal_consistency_score(frame_features: torch.Tensor) -> float:
    """Mean over t of cos(frame_t, frame_t+1). Needs at least 2 frames."""
    f = _unit(frame_features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvaluationError(f"temporal consistency needs features [F >= 2, D], got {tuple(frame_features.shape)}")
    return float((f[:-1] * f[1:]).sum(-1).mean())


def clip_t(encoder: ClipEncoder, frames: np.ndarray, prompt: str) -> float:
    """CLIP-T of one clip: text-frame cosine similarity averaged over all frames."""
    return clip_t_score(encoder.image_features(frames), encoder.text_features([prompt])[0])


def temporal_consistency(encoder: ClipEncoder, frames: np.ndarray) -> float:
    """Temporal consistency of one clip: CLIP cosine similarity of consecutive frames, averaged."""
    return temporal_consistency_score(encoder.image_features(frames))


# ---------------------------------------------------------------- loading


def load_clip(
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_heads: int | None = None,
    hidden_act: str | None = None,
) -> ClipEncoder:
    """A local CLIP folder or weights file -> ClipEncoder (see the module docstring).

    tokenizer_dir: for a single file with a text tower, a folder with the CLIP BPE tokenizer.
    num_heads / hidden_act: override what a single file's shapes cannot tell (image and text tower).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileNotFoundError(f"{p}: CLIP model not found (expected a Hugging Face CLIP folder or a "
                                     f"{'/'.join(WEIGHT_SUFFIXES)} file such as ComfyUI's models/clip_vision/*.safetensors)")
    if p.is_dir():
        enc = _load_folder(p, tokenizer_dir)
    else:
        enc = _load_file(p, tokenizer_dir, num_heads, hidden_act)
    return enc.to(device, dtype)


def _load_folder(folder: Path, tokenizer_dir) -> ClipEncoder:
    from transformers import AutoConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    if not (folder / "config.json").is_file():
        files = [f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
        if len(files) == 1:  # a folder holding one weights file
            return _load_file(files[0], tokenizer_dir or _tokenizer_dir_beside(files[0]), None, None)
        raise ModelFileError(f"{folder}: no config.json; expected a Hugging Face CLIP folder (save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelFileError(f"{folder}/config.json: cannot read the model config ({type(e).__name__}: {e})") from e
    kind = getattr(config, "model_type", "")
    try:
        if kind == "clip":
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
        elif kind == "clip_vision_model":
            model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
        else:
            raise ModelFileError(f"{folder}: model_type {kind!r}; expected a CLIP model ('clip' or 'clip_vision_model')")
    except ModelFileError:
        raise
    except Exception as e:
        raise ModelFileError(f"{folder}: cannot load the CLIP weights ({type(e).__name__}: {e})") from e
    vcfg = config.vision_config if kind == "clip" else config
    if (folder / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    else:  # image encoders saved without their processor: CLIP's standard preprocessing
        image_processor = _default_image_processor(vcfg.image_size)
    tokenizer = None
    if kind == "clip":
        tokenizer = _load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else folder, required=tokenizer_dir is not None)
    return ClipEncoder(
        vision=model.vision_model,
        visual_projection=model.visual_projection,
        image_processor=image_processor,
        text=getattr(model, "text_model", None),
        text_projection=getattr(model, "text_projection", None),
        tokenizer=tokenizer,
        source=str(folder),
    )


def _default_image_processor(size: int):
    from transformers import CLIPImageProcessor

    # CLIPImageProcessor's defaults are CLIP's: bicubic shortest-side resize, centre crop, OpenAI mean/std.
    return CLIPImageProcessor(size={"shortest_edge": int(size)}, crop_size={"height": int(size), "width": int(size)})


def _tokenizer_dir_beside(path: Path) -> Path | None:
    for cand in (path.parent, path.parent / "tokenizer"):
        if all((cand / f).is_file() for f in TOKENIZER_FILES):
            return cand
    return None


def _load_tokenizer(folder: Path | None, required: bool):
    if folder is None:
        return None
    if not all((folder / f).is_file() for f in TOKENIZER_FILES) and not (folder / "tokenizer.json").is_file():
        if required:
            raise ModelFileNotFoundError(f"{folder}: no CLIP tokenizer here (expected {' and '.join(TOKENIZER_FILES)})")
        return None
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelFileError(f"{folder}: cannot load the CLIP tokenizer ({type(e).__name__}: {e})") from e


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP weights file (see statedict.read_state_dict), by its suffix first."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelFileError(f"{path}: unsupported model file type {path.suffix!r}; expected {', '.join(WEIGHT_SUFFIXES)}")
    return statedict.read_state_dict(path, "CLIP weights")


# ---------------------------------------------------------------- single files: layout and config


def _strip_prefix(sd: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor]:
    """Drop whatever prefix stands before `marker` in the key that ends with it (e.g. 'clip.')."""
    for k in sd:
        if k.endswith(marker):
            prefix = k[: -len(marker)]
            if not prefix:
                return sd
            return {kk[len(prefix):]: v for kk, v in sd.items() if kk.startswith(prefix)}
    return sd


_OC_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def _convert_open_clip_blocks(sd: dict, src: str, dst: str, out: dict, used: set) -> None:
    """open_clip `src.transformer.resblocks.N.*` -> Hugging Face `dst.encoder.layers.N.*`."""
    pat = re.compile(rf"^{re.escape(src)}transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in sd.items():
        m = pat.match(k)
        if not m:
            continue
        i, name, kind = m.groups()
        if name in _OC_LAYER:
            out[f"{dst}encoder.layers.{i}.{_OC_LAYER[name]}.{kind}"] = v
            used.add(k)
    fused = re.compile(rf"^{re.escape(src)}transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
    for k, v in sd.items():
        m = fused.match(k)
        if m:  # q, k and v stacked in one [3 * width, ...] tensor
            i, kind = m.groups()
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{dst}encoder.layers.{i}.self_attn.{proj}.{kind}"] = part.contiguous()
            used.add(k)


def open_clip_to_transformers(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (`visual.*`, `transformer.*`, `token_embedding.weight`, ...) in
    Hugging Face CLIPModel key names. Keys it cannot place raise ModelFileError."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    simple = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    for k, dst in simple.items():
        if k in sd:
            out[dst] = sd[k]
            used.add(k)
    # projections are stored [width, embed] in open_clip, Linear weights are [embed, width]
    for k, dst in (("visual.proj", "visual_projection.weight"), ("text_projection", "text_projection.weight")):
        if k in sd:
            out[dst] = sd[k].t().contiguous()
            used.add(k)
    _convert_open_clip_blocks(sd, "visual.", "vision_model.", out, used)
    _convert_open_clip_blocks(sd, "", "text_model.", out, used)
    left = sorted(k for k in sd if k not in used and not k.endswith("attn_mask"))
    if left:
        raise ModelFileError(f"{source}: open_clip keys this converter does not know: {left[:8]}"
                             f"{' ...' if len(left) > 8 else ''} (only plain ViT CLIP models are supported)")
    return out


def _layer_count(sd: dict, prefix: str) -> int:
    try:
        n = statedict.count_indexed(sd, f"{prefix}encoder.layers.", f"CLIP {prefix}encoder")
    except KeyLayoutError as e:
        raise ModelFileError(str(e)) from e
    if n == 0:
        raise ModelFileError(f"{prefix}encoder.layers.N: expected layers 0..N-1, found none")
    return n


def _vision_heads(width: int) -> int:
    return {1280: 16, 1664: 16}.get(width, max(1, width // 64))


def _act(width: int) -> str:
    return "quick_gelu" if width <= 1024 else "gelu"


def _vision_config(sd: dict, source: str, num_heads: int | None, hidden_act: str | None) -> dict:
    key = "vision_model.embeddings.patch_embedding.weight"
    for need in (key, "vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight",
                 "visual_projection.weight"):
        if need not in sd:
            what = " (a SigLIP or other non-CLIP image tower?)" if need.endswith("class_embedding") else ""
            raise ModelFileError(f"{source}: no {need!r}; expected a CLIP image tower in Hugging Face or open_clip "
                                 f"key names{what}")
    width, _, patch, _ = sd[key].shape
    n = sd["vision_model.embeddings.position_embedding.weight"].shape[0] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ModelFileError(f"{source}: {n} image patch positions is not a square grid")
    return dict(
        hidden_size=int(width), intermediate_size=int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        projection_dim=int(sd["visual_projection.weight"].shape[0]), num_hidden_layers=_layer_count(sd, "vision_model."),
        num_attention_heads=num_heads or _vision_heads(int(width)), image_size=int(grid * patch), patch_size=int(patch),
        hidden_act=hidden_act or _act(int(width)), layer_norm_eps=1e-5,
    )


def _text_config(sd: dict, source: str, tokenizer, num_heads: int | None, hidden_act: str | None) -> dict:
    if "text_projection.weight" not in sd:
        raise ModelFileError(f"{source}: has text_model.* weights but no 'text_projection.weight'")
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    cfg = dict(
        vocab_size=int(vocab), hidden_size=int(width),
        intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        projection_dim=int(sd["text_projection.weight"].shape[0]), num_hidden_layers=_layer_count(sd, "text_model."),
        num_attention_heads=num_heads or max(1, int(width) // 64),
        max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        hidden_act=hidden_act or _act(int(width)), layer_norm_eps=1e-5,
    )
    if tokenizer is not None:  # the pooled text embedding is read at the end-of-text token
        cfg.update(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return cfg


def _load_file(path: Path, tokenizer_dir, num_heads: int | None, hidden_act: str | None) -> ClipEncoder:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    sd = read_state_dict(path)
    sd = _strip_prefix(sd, "visual.conv1.weight") if any(k.endswith("visual.conv1.weight") for k in sd) else (
        _strip_prefix(sd, "vision_model.embeddings.patch_embedding.weight"))
    if "visual.conv1.weight" in sd:
        sd = open_clip_to_transformers(sd, str(path))
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # buffers rebuilt by transformers
    vcfg = _vision_config(sd, str(path), num_heads, hidden_act)
    has_text = "text_model.embeddings.token_embedding.weight" in sd
    tokenizer = None
    if has_text:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else _tokenizer_dir_beside(path)
        tokenizer = _load_tokenizer(tok_dir, required=tokenizer_dir is not None)
        tcfg = _text_config(sd, str(path), tokenizer, num_heads, hidden_act)
        if tcfg["projection_dim"] != vcfg["projection_dim"]:
            raise ModelFileError(f"{path}: text projection {tcfg['projection_dim']} != image projection {vcfg['projection_dim']}")
        config = CLIPConfig(text_config=tcfg, vision_config=vcfg, projection_dim=vcfg["projection_dim"])
        model = CLIPModel(config)
    else:
        sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg))
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(sd) if k != "logit_scale" and not k.endswith("position_ids"))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise ModelFileError(f"{path}: weights do not fit the CLIP read from its shapes: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    log.info("CLIP from %s: image tower %s%s", path, vcfg, ", text tower" if has_text else " (no text tower)")
    return ClipEncoder(
        vision=model.vision_model, visual_projection=model.visual_projection,
        image_processor=_default_image_processor(vcfg["image_size"]),
        text=getattr(model, "text_model", None), text_projection=getattr(model, "text_projection", None),
        tokenizer=tokenizer, source=str(path),
    )


def describe(enc: ClipEncoder) -> str:
    """One line for logs and node reports."""
    size = enc.image_processor.crop_size
    return (f"{enc.source}: CLIP embed {enc.embed_dim}, input {json.dumps(size)}, "
            f"{'image + text towers' if enc.has_text else 'image tower only'}")

