"""Tiny random models for the evaluation tests, built from configs with the real libraries and
saved the way users have them (Hugging Face folders, single files, TorchScript)."""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path

import numpy as np
import torch

WORDS_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


# ---------------------------------------------------------------- CLIP


def write_clip_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer with a character vocabulary (no merges): every word still encodes."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in WORDS_CHARS:
        vocab[c] = len(vocab)
    for c in WORDS_CHARS:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_clip(tokenizer, seed: int = 0, image_size: int = 32):
    """CLIPModel: image tower width 128 (2 heads = width/64, as a file's loader assumes), text width 64."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, projection_dim=32),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=16, projection_dim=32,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        projection_dim=32,
    )
    return CLIPModel(cfg).eval()


def save_clip_folder(folder: Path, seed: int = 0) -> Path:
    """A full CLIP saved with save_pretrained (model + processor), as from the hub."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    tok = clip_tokenizer(folder.parent / f"{folder.name}_tok")
    model = tiny_clip(tok, seed)
    model.save_pretrained(folder)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


def save_clip_file(path: Path, folder: Path, vision_only: bool) -> Path:
    """The folder's weights as one .safetensors (ComfyUI clip_vision style when vision_only)."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    sd = CLIPModel.from_pretrained(folder, local_files_only=True).state_dict()
    keep = ("vision_model.", "visual_projection.") if vision_only else ("",)
    sd = {k: v.contiguous() for k, v in sd.items() if k.startswith(keep) and not k.endswith("position_ids")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP keys -> open_clip keys (written from open_clip's module names)."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in (("vision_model.", "visual."), ("text_model.", "")):
        n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{src}encoder.layers."))
        for i in range(n):
            a, b = f"{src}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{b}attn.in_proj_{kind}"] = torch.cat([sd[f"{a}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{b}attn.out_proj.{kind}"] = sd[f"{a}self_attn.out_proj.{kind}"]
                out[f"{b}ln_1.{kind}"] = sd[f"{a}layer_norm1.{kind}"]
                out[f"{b}ln_2.{kind}"] = sd[f"{a}layer_norm2.{kind}"]
                out[f"{b}mlp.c_fc.{kind}"] = sd[f"{a}mlp.fc1.{kind}"]
                out[f"{b}mlp.c_proj.{kind}"] = sd[f"{a}mlp.fc2.{kind}"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    out["visual.proj"] = sd["visual_projection.weight"].t()
    out["text_projection"] = sd["text_projection.weight"].t()
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["logit_scale"] = sd["logit_scale"]
    out["attn_mask"] = torch.full((16, 16), float("-inf")).triu(1)
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- videos


def moving_square(num_frames: int = 6, size: tuple[int, int] = (40, 56), colour=(220, 40, 40), seed: int = 0,
                  background: int = 30) -> np.ndarray:
    """uint8 [F, H, W, 3]: a square moving right over a textured background."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.clip(background + rng.integers(-10, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    frames = np.repeat(base[None], num_frames, axis=0)
    s = h // 3
    for f in range(num_frames):
        x = (f * 5) % (w - s)
        frames[f, h // 3 : h // 3 + s, x : x + s] = colour
    return frames


# ---------------------------------------------------------------- video feature network


class StyleGanVLikeI3D(torch.nn.Module):
    """A tiny 3D CNN behind StyleGAN-V's i3d_torchscript interface (rescale, resize, return_features)."""

    def __init__(self, feature_dim: int = 12) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.head = torch.nn.Linear(8, feature_dim)
        self.logits = torch.nn.Linear(feature_dim, 5)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        if rescale:  # the real one maps [0, 255] to [-1, 1] itself: inputs here are already there
            x = x / 127.5 - 1
        if resize:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        feats = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))
        return feats if return_features else self.logits(feats)


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # TorchScript is deprecated; I3D files are still shared that way
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module.eval()).save(str(path))
    return path


# ---------------------------------------------------------------- vision-language judge


def save_tiny_qwen2vl(folder: Path, answer: str = " Yes", seed: int = 0) -> Path:
    """A tiny Qwen2-VL (model + processor with a byte-level tokenizer and a chat template) that
    always answers `answer` (repeated): its text layers add nothing to the residual stream, every
    token embeds to one vector, and only the answer token's logit row is non-zero. The vision tower
    stays random and still runs on the frames."""
    from tokenizers import pre_tokenizers
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder.parent / f"{folder.name}_tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = Qwen2Tokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([answer])
    ids = dict(zip(specials, tok.convert_tokens_to_ids(specials)))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=template)
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        lm = model.model.language_model
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.embed_tokens.weight.copy_(torch.ones_like(lm.embed_tokens.weight))
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids(answer)] = 1.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
