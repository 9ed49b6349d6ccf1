"""Tiny random-weight Grounding DINO / SAM / SAM 2 for the mask tests (real classes, small sizes).

Also writes them to disk the way users have them: an HF folder, an original Grounding DINO
checkpoint (original key layout, fused qkv), a SAM `.pth`, a SAM 2 `.pt`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

WORDS = ["person", "dog", "bear", "raccoon", "a", "the", "cat"]


def bert_vocab() -> list[str]:
    """A small vocabulary with bert-base-uncased's ids for [PAD] [UNK] [CLS] [SEP] [MASK] . ?"""
    v = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    v += [f"[unused{i}]" for i in range(99, 99 + 1012 - len(v))] + ["."]
    v += [f"[unused{i}]" for i in range(2000, 2000 + 1029 - len(v))] + ["?"] + WORDS
    return v


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    return folder


def tiny_gdino_config(heads: int = 2):
    from transformers import GroundingDinoConfig

    backbone = dict(model_type="swin", embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=4,
                    image_size=64, out_indices=[2, 3, 4])
    text = dict(model_type="bert", vocab_size=len(bert_vocab()), hidden_size=64, num_hidden_layers=1,
                num_attention_heads=1, intermediate_size=64, max_position_embeddings=64)
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=heads, decoder_attention_heads=heads,
        num_queries=30, max_text_len=32, encoder_n_points=2, decoder_n_points=2,
    )


def tiny_gdino(seed: int = 0, heads: int = 2):
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    return GroundingDinoForObjectDetection(tiny_gdino_config(heads)).eval()


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(bert_vocab())})


def write_hf_gdino(folder: Path, seed: int = 0) -> Path:
    model = tiny_gdino(seed)
    model.save_pretrained(folder)
    write_vocab(folder)
    return folder


# --- original Grounding DINO layout, written independently of the pack's converter ----------

_SWIN = "model.backbone.conv_encoder.model.swin."


def _inverse_rules() -> list[tuple[str, str]]:
    """transformers key regex -> original key template (from the original repository's names)."""
    return [
        (_SWIN + r"embeddings\.patch_embeddings\.projection\.(.*)", r"backbone.0.patch_embed.proj.\1"),
        (_SWIN + r"embeddings\.norm\.(.*)", r"backbone.0.patch_embed.norm.\1"),
        (_SWIN + r"encoder\.layers\.(\d+)\.downsample\.(.*)", r"backbone.0.layers.\1.downsample.\2"),
        (_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.(.*)", r"backbone.0.layers.\1.blocks.\2.norm1.\3"),
        (_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.(.*)", r"backbone.0.layers.\1.blocks.\2.norm2.\3"),
        (_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.(.*)", r"backbone.0.layers.\1.blocks.\2.attn.proj.\3"),
        (_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.relative_position_bias\.relative_position_bias_table",
         r"backbone.0.layers.\1.blocks.\2.attn.relative_position_bias_table"),
        (_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc\d)\.(.*)", r"backbone.0.layers.\1.blocks.\2.mlp.\3.\4"),
        (r"model\.backbone\.conv_encoder\.model\.hidden_states_norms\.stage2\.(.*)", r"backbone.0.norm1.\1"),
        (r"model\.backbone\.conv_encoder\.model\.hidden_states_norms\.stage3\.(.*)", r"backbone.0.norm2.\1"),
        (r"model\.backbone\.conv_encoder\.model\.hidden_states_norms\.stage4\.(.*)", r"backbone.0.norm3.\1"),
        (r"model\.text_backbone\.(.*)", r"bert.\1"),
        (r"model\.input_proj_vision\.(.*)", r"input_proj.\1"),
        (r"model\.text_projection\.(.*)", r"feat_map.\1"),
        (r"model\.level_embed", "transformer.level_embed"),
        (r"model\.query_position_embeddings\.weight", "transformer.tgt_embed.weight"),
        (r"model\.enc_output\.(.*)", r"transformer.enc_output.\1"),
        (r"model\.enc_output_norm\.(.*)", r"transformer.enc_output_norm.\1"),
        (r"model\.encoder_output_bbox_embed\.(.*)", r"transformer.enc_out_bbox_embed.\1"),
        (r"model\.decoder\.layer_norm\.(.*)", r"transformer.decoder.norm.\1"),
        (r"model\.decoder\.reference_points_head\.(.*)", r"transformer.decoder.ref_point_head.\1"),
        (r"model\.decoder\.bbox_embed\.(.*)", r"transformer.decoder.bbox_embed.\1"),
        (r"bbox_embed\.(.*)", r"bbox_embed.\1"),
        (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn\.(.*)", r"transformer.encoder.layers.\1.self_attn.\2"),
        (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn_layer_norm\.(.*)", r"transformer.encoder.layers.\1.norm1.\2"),
        (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.fc1\.(.*)", r"transformer.encoder.layers.\1.linear1.\2"),
        (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.fc2\.(.*)", r"transformer.encoder.layers.\1.linear2.\2"),
        (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.final_layer_norm\.(.*)", r"transformer.encoder.layers.\1.norm2.\2"),
        (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.out_proj\.(.*)", r"transformer.encoder.text_layers.\1.self_attn.out_proj.\2"),
        (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc1\.(.*)", r"transformer.encoder.text_layers.\1.linear1.\2"),
        (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc2\.(.*)", r"transformer.encoder.text_layers.\1.linear2.\2"),
        (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_before\.(.*)", r"transformer.encoder.text_layers.\1.norm1.\2"),
        (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_after\.(.*)", r"transformer.encoder.text_layers.\1.norm2.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.vision_param", r"transformer.encoder.fusion_layers.\1.gamma_v"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.text_param", r"transformer.encoder.fusion_layers.\1.gamma_l"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_vision\.(.*)", r"transformer.encoder.fusion_layers.\1.layer_norm_v.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_text\.(.*)", r"transformer.encoder.fusion_layers.\1.layer_norm_l.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.vision_proj\.(.*)", r"transformer.encoder.fusion_layers.\1.attn.v_proj.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.text_proj\.(.*)", r"transformer.encoder.fusion_layers.\1.attn.l_proj.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.values_vision_proj\.(.*)", r"transformer.encoder.fusion_layers.\1.attn.values_v_proj.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.values_text_proj\.(.*)", r"transformer.encoder.fusion_layers.\1.attn.values_l_proj.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.out_vision_proj\.(.*)", r"transformer.encoder.fusion_layers.\1.attn.out_v_proj.\2"),
        (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.out_text_proj\.(.*)", r"transformer.encoder.fusion_layers.\1.attn.out_l_proj.\2"),
        (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.(.*)", r"transformer.decoder.layers.\1.cross_attn.\2"),
        (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.(.*)", r"transformer.decoder.layers.\1.norm1.\2"),
        (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.out_proj\.(.*)", r"transformer.decoder.layers.\1.ca_text.out_proj.\2"),
        (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text_layer_norm\.(.*)", r"transformer.decoder.layers.\1.catext_norm.\2"),
        (r"model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)", r"transformer.decoder.layers.\1.self_attn.out_proj.\2"),
        (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)", r"transformer.decoder.layers.\1.norm2.\2"),
        (r"model\.decoder\.layers\.(\d+)\.fc1\.(.*)", r"transformer.decoder.layers.\1.linear1.\2"),
        (r"model\.decoder\.layers\.(\d+)\.fc2\.(.*)", r"transformer.decoder.layers.\1.linear2.\2"),
        (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.(.*)", r"transformer.decoder.layers.\1.norm3.\2"),
    ]


_FUSED = [
    # (transformers prefix regex with q/k/v names, original fused name, q name, k name, v name)
    (_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.", r"backbone.0.layers.\1.blocks.\2.attn.qkv.",
     ("q_proj", "k_proj", "v_proj"), ("weight", "bias")),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.", r"transformer.encoder.text_layers.\1.self_attn.",
     ("query", "key", "value"), ("in_proj_weight", "in_proj_bias")),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.", r"transformer.decoder.layers.\1.self_attn.",
     ("query", "key", "value"), ("in_proj_weight", "in_proj_bias")),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.", r"transformer.decoder.layers.\1.ca_text.",
     ("query", "key", "value"), ("in_proj_weight", "in_proj_bias")),
]

_SKIP = re.compile(r".*(relative_position_index|special_tokens|position_ids|token_type_ids)$|" + _SWIN.replace(".", r"\.") + r"layernorm\..*")


def to_original_layout(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers GroundingDino state dict written back in the original repository's keys."""
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for prefix, orig, names, orig_kinds in _FUSED:
        rx = re.compile("^" + prefix + names[0] + r"\.(weight|bias)$")
        for key in hf_sd:
            m = rx.match(key)
            if not m:
                continue
            base = key[: -len(names[0] + "." + m.group(m.lastindex))]
            kind = m.group(m.lastindex)
            parts = [hf_sd[f"{base}{n}.{kind}"] for n in names]
            done.update(f"{base}{n}.{kind}" for n in names)
            target = re.sub("^" + prefix, orig, base)
            out[target + (orig_kinds[0] if kind == "weight" else orig_kinds[1])] = torch.cat(parts, 0)
    rules = _inverse_rules()
    for key, value in hf_sd.items():
        if key in done or _SKIP.match(key):
            continue
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                out[re.sub("^" + pattern + "$", repl, key)] = value
                break
        else:
            raise KeyError(f"test helper has no original name for {key}")
    # Original checkpoints also carry BERT's pooler, which transformers' model does not use.
    h = hf_sd["model.text_backbone.embeddings.word_embeddings.weight"].shape[1]
    out["bert.pooler.dense.weight"] = torch.zeros(h, h)
    out["bert.pooler.dense.bias"] = torch.zeros(h)
    return out


def write_original_gdino(path: Path, seed: int = 0, heads: int = 2, cfg_py: bool = True):
    """(model, path): a tiny model and its weights as an original `.pth` (+ `.cfg.py`)."""
    model = tiny_gdino(seed, heads)
    sd = {("module." + k): v.clone() for k, v in to_original_layout(model.state_dict()).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "epoch": 3}, path)
    if cfg_py:
        path.with_suffix(".cfg.py").write_text(
            f'batch_size = 1\nmodelname = "groundingdino"\nbackbone = "swin_T_224_1k"\nnheads = {heads}\n'
            "max_text_len = 32\ntext_encoder_type = \"bert-base-uncased\"\n", encoding="utf-8")
    return model, path


# --- SAM (segment-anything) -----------------------------------------------------------------

def tiny_sam(seed: int = 0, image_size: int = 128):
    from dreamrelation_core.masks.sam import build_sam1

    torch.manual_seed(seed)
    return build_sam1(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4,
                      image_size=image_size, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_heads=2)


def write_sam(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_sam(seed).state_dict(), path)
    return path


# --- SAM 2 -----------------------------------------------------------------------------------

def tiny_sam2_overrides() -> dict:
    """Sizes for a tiny SAM 2 (dotted config paths -> values)."""
    return {
        "image_size": 128,
        "image_encoder.trunk.embed_dim": 8,
        "image_encoder.trunk.num_heads": 1,
        "image_encoder.trunk.stages": [1, 1, 2, 1],
        "image_encoder.trunk.global_att_blocks": [3],
        "image_encoder.trunk.window_pos_embed_bkg_spatial_size": [4, 4],
        "image_encoder.trunk.window_spec": [4, 4, 4, 2],
        "image_encoder.neck.d_model": 32,
        "image_encoder.neck.backbone_channel_list": [64, 32, 16, 8],
        "image_encoder.neck.position_encoding.num_pos_feats": 32,
        "memory_attention.d_model": 32,
        "memory_attention.num_layers": 1,
        "memory_attention.layer.d_model": 32,
        "memory_attention.layer.dim_feedforward": 64,
        "memory_attention.layer.self_attention.embedding_dim": 32,
        "memory_attention.layer.self_attention.feat_sizes": [8, 8],
        "memory_attention.layer.cross_attention.embedding_dim": 32,
        "memory_attention.layer.cross_attention.feat_sizes": [8, 8],
        "memory_attention.layer.cross_attention.kv_in_dim": 16,
        "memory_encoder.out_dim": 16,
        "memory_encoder.in_dim": 32,
        "memory_encoder.mask_downsampler.embed_dim": 32,
        "memory_encoder.position_encoding.num_pos_feats": 16,
        "memory_encoder.fuser.layer.dim": 32,
        "memory_encoder.fuser.num_layers": 1,
        "num_maskmem": 3,
    }


def tiny_sam2(seed: int = 0):
    from dreamrelation_core.masks.sam import build_sam2_model

    torch.manual_seed(seed)
    return build_sam2_model("sam2.1_hiera_t", overrides=tiny_sam2_overrides())


def write_sam2(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": tiny_sam2(seed).state_dict()}, path)
    return path


# --- clips -----------------------------------------------------------------------------------

def two_subject_clip(frames: int = 6, h: int = 64, w: int = 96) -> np.ndarray:
    """uint8 [F,H,W,3]: two coloured rectangles walking towards each other on grey."""
    clip = np.full((frames, h, w, 3), 90, np.uint8)
    for f in range(frames):
        clip[f, 16:52, 8 + 2 * f : 28 + 2 * f] = (220, 40, 40)
        clip[f, 12:56, 64 - 2 * f : 86 - 2 * f] = (40, 60, 220)
    return clip
