"""Grounding DINO on transformers 5, from local files only.

Two on-disk forms are read:
- a Hugging Face folder (`config.json` + `model.safetensors`, tokenizer files or not), loaded with
  `GroundingDinoForObjectDetection.from_pretrained(folder, local_files_only=True)`;
- an original IDEA-Research checkpoint (`groundingdino_swint_ogc.pth`,
  `groundingdino_swinb_cogcoor.pth`, optionally with its `.cfg.py`), converted here, offline, to
  transformers' layout: renamed keys, fused qkv / in_proj weights split into q, k, v. The model's
  sizes are read from the tensors' shapes; the few numbers shapes cannot tell (attention heads)
  come from the `.cfg.py` when present, else the original defaults.

The original packages (`groundingdino-py`, `rf-groundingdino`) do not build on transformers 5 and
are not used. The tokenizer needs only BERT's `vocab.txt`: from the HF folder or from
`models/bert-base-uncased/`. Nothing is ever downloaded.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError
from ..statedict import indices, read_state_dict
from .images import check_uint8_frames, imagenet_normalize
from .tracking import FrameDetections, nms

log = logging.getLogger("dreamrelation.masks")

ORIGINAL_FILES = ("groundingdino_swint_ogc.pth", "groundingdino_swinb_cogcoor.pth")
# transformers' model hard-codes BERT's ids of [CLS], [SEP], "." and "?" to split phrases.
BERT_SPECIAL_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}


# ---------------------------------------------------------------------------------------------
# Files


def parse_cfg_py(path: str | os.PathLike) -> dict:
    """Simple `name = literal` assignments of an original `.cfg.py`; the file is never executed."""
    out: dict = {}
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue  # expressions (dict(), calls) are not needed
    return out


def load_bert_tokenizer(*folders: str | os.PathLike | None):
    """BERT tokenizer from the first folder holding tokenizer files or a `vocab.txt`."""
    from transformers import BertTokenizer

    tried = []
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        tried.append(str(folder))
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        vocab = folder / "vocab.txt"
        if vocab.is_file():
            words = vocab.read_text(encoding="utf-8").splitlines()
            # transformers 5 ignores BertTokenizer(vocab_file=...): the vocabulary goes in as a dict.
            return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    raise ModelFileError(
        "no BERT tokenizer vocabulary: expected `vocab.txt` (or tokenizer.json) in "
        + (", ".join(tried) if tried else "models/bert-base-uncased/")
        + " — copy bert-base-uncased's vocab.txt into models/bert-base-uncased/"
    )


def _check_vocab(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    wrong = {t: (vocab.get(t), i) for t, i in BERT_SPECIAL_IDS.items() if vocab.get(t) != i}
    if wrong:
        shown = ", ".join(f"{t!r} is {got} (expected {want})" for t, (got, want) in wrong.items())
        raise ModelFileError(f"tokenizer vocabulary is not bert-base-uncased's: {shown}")


# ---------------------------------------------------------------------------------------------
# Original checkpoint -> transformers


def _strip_module(sd: dict) -> dict:
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def is_original_checkpoint(sd: dict) -> bool:
    return "transformer.level_embed" in sd and any(k.startswith("backbone.0.") for k in sd)


def config_from_original(sd: dict, cfg: dict | None = None):
    """GroundingDinoConfig matching an original checkpoint's tensor shapes (cfg: its .cfg.py)."""
    from transformers import GroundingDinoConfig

    cfg = cfg or {}
    stages = len(indices(sd, "backbone.0.layers."))
    depths = [len(indices(sd, f"backbone.0.layers.{i}.blocks.")) for i in range(stages)]
    tables = [sd[f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
    window = int(round((tables[0].shape[0] ** 0.5 + 1) / 2))
    embed_dim = sd["backbone.0.patch_embed.proj.weight"].shape[0]
    norms = sorted(int(m.group(1)) for k in sd if (m := re.match(r"backbone\.0\.norm(\d+)\.weight$", k)))
    backbone = dict(
        model_type="swin",
        embed_dim=embed_dim,
        depths=depths,
        num_heads=[t.shape[1] for t in tables],
        window_size=window,
        patch_size=sd["backbone.0.patch_embed.proj.weight"].shape[-1],
        mlp_ratio=sd["backbone.0.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        image_size=224 if window == 7 else 384,  # pretraining size; no weight depends on it
        out_indices=[i + 1 for i in norms],
    )
    hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    text = dict(
        model_type="bert",
        vocab_size=sd["bert.embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        num_hidden_layers=len(indices(sd, "bert.encoder.layer.")),
        num_attention_heads=int(cfg.get("text_encoder_heads", max(1, hidden // 64))),
        intermediate_size=sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["bert.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0],
    )
    levels, d_model = sd["transformer.level_embed"].shape
    heads = int(cfg.get("nheads", 8))
    enc_attn = sd["transformer.encoder.layers.0.self_attn.attention_weights.weight"].shape[0]
    dec_attn = sd["transformer.decoder.layers.0.cross_attn.attention_weights.weight"].shape[0]
    return GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=d_model,
        num_feature_levels=levels,
        encoder_layers=len(indices(sd, "transformer.encoder.layers.")),
        decoder_layers=len(indices(sd, "transformer.decoder.layers.")),
        encoder_ffn_dim=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn_dim=sd["transformer.decoder.layers.0.linear1.weight"].shape[0],
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_n_points=enc_attn // (heads * levels),
        decoder_n_points=dec_attn // (heads * levels),
        num_queries=sd["transformer.tgt_embed.weight"].shape[0],
        max_text_len=int(cfg.get("max_text_len", 256)),
        two_stage_bbox_embed_share=bool(cfg.get("two_stage_bbox_embed_share", False)),
        decoder_bbox_embed_share=bool(cfg.get("dec_pred_bbox_embed_share", True)),
    )


# Renames inside one module, original suffix -> transformers suffix.
_SWIN_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_DEFORMABLE = {
    "self_attn.sampling_offsets": "deformable_layer.self_attn.sampling_offsets",
    "self_attn.attention_weights": "deformable_layer.self_attn.attention_weights",
    "self_attn.value_proj": "deformable_layer.self_attn.value_proj",
    "self_attn.output_proj": "deformable_layer.self_attn.output_proj",
    "norm1": "deformable_layer.self_attn_layer_norm",
    "linear1": "deformable_layer.fc1",
    "linear2": "deformable_layer.fc2",
    "norm2": "deformable_layer.final_layer_norm",
}
_TEXT_ENHANCER = {
    "self_attn.out_proj": "text_enhancer_layer.self_attn.out_proj",
    "linear1": "text_enhancer_layer.fc1",
    "linear2": "text_enhancer_layer.fc2",
    "norm1": "text_enhancer_layer.layer_norm_before",
    "norm2": "text_enhancer_layer.layer_norm_after",
}
_FUSION = {
    "gamma_v": "fusion_layer.vision_param",
    "gamma_l": "fusion_layer.text_param",
    "layer_norm_v": "fusion_layer.layer_norm_vision",
    "layer_norm_l": "fusion_layer.layer_norm_text",
    "attn.v_proj": "fusion_layer.attn.vision_proj",
    "attn.l_proj": "fusion_layer.attn.text_proj",
    "attn.values_v_proj": "fusion_layer.attn.values_vision_proj",
    "attn.values_l_proj": "fusion_layer.attn.values_text_proj",
    "attn.out_v_proj": "fusion_layer.attn.out_vision_proj",
    "attn.out_l_proj": "fusion_layer.attn.out_text_proj",
}
_DECODER = {
    "cross_attn.sampling_offsets": "encoder_attn.sampling_offsets",
    "cross_attn.attention_weights": "encoder_attn.attention_weights",
    "cross_attn.value_proj": "encoder_attn.value_proj",
    "cross_attn.output_proj": "encoder_attn.output_proj",
    "norm1": "encoder_attn_layer_norm",
    "ca_text.out_proj": "encoder_attn_text.out_proj",
    "catext_norm": "encoder_attn_text_layer_norm",
    "self_attn.out_proj": "self_attn.out_proj",
    "norm2": "self_attn_layer_norm",
    "linear1": "fc1",
    "linear2": "fc2",
    "norm3": "final_layer_norm",
}
# Fused projections split into three along the output rows (q, k, v in that order).
_FUSED_MHA = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
# Original keys that have no counterpart in transformers' model (unused there, or buffers it rebuilds).
_UNUSED = re.compile(
    r"^(bert\.pooler\..*|.*relative_position_index|.*attn_mask|bert\.embeddings\.position_ids"
    r"|bert\.embeddings\.token_type_ids|.*num_batches_tracked)$"
)
_SWIN = "model.backbone.conv_encoder.model.swin."


def _split3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = t.shape[0] // 3
    return t[:n], t[n : 2 * n], t[2 * n :]


def _rename_simple(key: str) -> str | None:
    """Target name of an original key that maps one to one, else None."""
    rules: list[tuple[str, str]] = [
        (r"^backbone\.0\.patch_embed\.proj\.(.*)$", _SWIN + r"embeddings.patch_embeddings.projection.\1"),
        (r"^backbone\.0\.patch_embed\.norm\.(.*)$", _SWIN + r"embeddings.norm.\1"),
        (r"^backbone\.0\.layers\.(\d+)\.downsample\.(.*)$", _SWIN + r"encoder.layers.\1.downsample.\2"),
        (r"^bert\.(.*)$", r"model.text_backbone.\1"),
        (r"^input_proj\.(.*)$", r"model.input_proj_vision.\1"),
        (r"^feat_map\.(.*)$", r"model.text_projection.\1"),
        (r"^transformer\.level_embed$", "model.level_embed"),
        (r"^transformer\.tgt_embed\.weight$", "model.query_position_embeddings.weight"),
        (r"^transformer\.enc_output(_norm)?\.(.*)$", r"model.enc_output\1.\2"),
        (r"^transformer\.enc_out_bbox_embed\.(.*)$", r"model.encoder_output_bbox_embed.\1"),
        (r"^transformer\.decoder\.norm\.(.*)$", r"model.decoder.layer_norm.\1"),
        (r"^transformer\.decoder\.ref_point_head\.(.*)$", r"model.decoder.reference_points_head.\1"),
        (r"^transformer\.decoder\.bbox_embed\.(.*)$", r"model.decoder.bbox_embed.\1"),
        (r"^bbox_embed\.(.*)$", r"bbox_embed.\1"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    m = re.match(r"^backbone\.0\.norm(\d+)\.(weight|bias)$", key)
    if m:
        return f"model.backbone.conv_encoder.model.hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.match(r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias|relative_position_bias_table)$", key)
    if m and m.group(3) in _SWIN_BLOCK:
        return f"{_SWIN}encoder.layers.{m.group(1)}.blocks.{m.group(2)}.{_SWIN_BLOCK[m.group(3)]}.{m.group(4)}"
    if m and m.group(4) == "relative_position_bias_table" and m.group(3) == "attn":
        return f"{_SWIN}encoder.layers.{m.group(1)}.blocks.{m.group(2)}.{_SWIN_BLOCK['attn.relative_position_bias_table']}"
    for prefix, target, table in (
        ("transformer.encoder.layers", "model.encoder.layers", _DEFORMABLE),
        ("transformer.encoder.text_layers", "model.encoder.layers", _TEXT_ENHANCER),
        ("transformer.encoder.fusion_layers", "model.encoder.layers", _FUSION),
        ("transformer.decoder.layers", "model.decoder.layers", _DECODER),
    ):
        m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.+?)(\.weight|\.bias)?$", key)
        if m and m.group(2) in table:
            return f"{target}.{m.group(1)}.{table[m.group(2)]}{m.group(3) or ''}"
    return None


def _rename_fused(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Split a fused qkv / in_proj tensor into its three targets, else None."""
    m = re.match(r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
    if m:
        base = f"{_SWIN}encoder.layers.{m.group(1)}.blocks.{m.group(2)}.attention"
        q, k, v = _split3(value)
        return {f"{base}.q_proj.{m.group(3)}": q, f"{base}.k_proj.{m.group(3)}": k, f"{base}.v_proj.{m.group(3)}": v}
    for prefix, target, attn in (
        ("transformer.encoder.text_layers", "model.encoder.layers", "text_enhancer_layer.self_attn"),
        ("transformer.decoder.layers", "model.decoder.layers", None),
    ):
        m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(self_attn|ca_text)\.(in_proj_weight|in_proj_bias)$", key)
        if m:
            module = attn or ("self_attn" if m.group(2) == "self_attn" else "encoder_attn_text")
            base = f"{target}.{m.group(1)}.{module}"
            kind = _FUSED_MHA[m.group(3)]
            q, k, v = _split3(value)
            return {f"{base}.query.{kind}": q, f"{base}.key.{kind}": k, f"{base}.value.{kind}": v}
    return None


def convert_original_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Original Grounding DINO keys -> transformers keys.

    Returns (converted, unused, unknown): `unused` are keys the transformers model has no use
    for (BERT's pooler, buffers it rebuilds); `unknown` are keys no rule understood — a non-empty
    list means the checkpoint is not what this converter knows.
    """
    sd = _strip_module(sd)
    out: dict[str, torch.Tensor] = {}
    unused, unknown = [], []
    for key, value in sd.items():
        if _UNUSED.match(key):
            unused.append(key)
            continue
        fused = _rename_fused(key, value)
        if fused is not None:
            out.update(fused)
            continue
        new = _rename_simple(key)
        if new is not None:
            out[new] = value
        else:
            unknown.append(key)
    return out, unused, unknown


# Keys of transformers' model that an original checkpoint does not fill and that its forward
# pass never reads (the Swin classifier-style final norm; buffers built at init).
_NOT_IN_ORIGINAL = re.compile(
    r"^(model\.backbone\.conv_encoder\.model\.swin\.layernorm\..*|.*relative_position_index"
    r"|model\.special_tokens|model\.text_backbone\.embeddings\.(position_ids|token_type_ids))$"
)


def build_from_original(path: str | os.PathLike, cfg_path: str | os.PathLike | None = None):
    """GroundingDinoForObjectDetection with an original checkpoint's weights."""
    from transformers import GroundingDinoForObjectDetection

    path = Path(path)
    sd = _strip_module(read_state_dict(path))
    if not is_original_checkpoint(sd):
        sample = ", ".join(list(sd)[:4])
        raise ModelFileError(
            f"{path}: not an original Grounding DINO checkpoint: expected keys such as "
            f"'backbone.0.patch_embed.proj.weight', 'transformer.level_embed', 'bert.embeddings.*'; "
            f"found {len(sd)} keys like {sample}"
        )
    cfg_path = Path(cfg_path) if cfg_path else _find_cfg_py(path)
    cfg = parse_cfg_py(cfg_path) if cfg_path else None
    config = config_from_original(sd, cfg)
    converted, unused, unknown = convert_original_state_dict(sd)
    if unknown:
        raise ModelFileError(f"{path}: {len(unknown)} checkpoint keys this converter does not know: {unknown[:8]}")
    model = GroundingDinoForObjectDetection(config)
    model_keys = set(model.state_dict())
    extra = sorted(set(converted) - model_keys)
    missing = sorted(k for k in model_keys - set(converted) if not _NOT_IN_ORIGINAL.match(k))
    if extra or missing:
        raise ModelFileError(
            f"{path}: converted weights do not fit transformers' GroundingDino model: "
            f"{len(missing)} missing (e.g. {missing[:4]}), {len(extra)} unexpected (e.g. {extra[:4]})"
        )
    model.load_state_dict(converted, strict=False)
    log.info("Grounding DINO %s: %d tensors loaded, %d unused (%s)", path.name, len(converted), len(unused), unused[:3])
    return model.eval()


def _find_cfg_py(path: Path) -> Path | None:
    for cand in (path.with_suffix(".cfg.py"), path.parent / (path.stem + ".cfg.py")):
        if cand.is_file():
            return cand
    # The original repository names its configs after the backbone, not the weights file.
    names = {"swint": "GroundingDINO_SwinT_OGC.cfg.py", "swinb": "GroundingDINO_SwinB.cfg.py"}
    for tag, name in names.items():
        if tag in path.stem.lower() and (path.parent / name).is_file():
            return path.parent / name
    return None


# ---------------------------------------------------------------------------------------------
# Detector


@dataclass
class DetectorOptions:
    box_threshold: float = 0.35  # keep a box when its best phrase's token probability exceeds this
    text_threshold: float = 0.25  # ... and that phrase's probability exceeds this too
    nms_iou: float = 0.5  # the decoder's 900 queries produce duplicates; drop overlaps above this
    short_side: int = 800  # detector input: shorter image side (the original's test size)
    max_side: int = 1333
    batch_size: int = 4  # frames per forward pass


class GroundingDino:
    """Text-prompted box detector: frames + one phrase per subject -> FrameDetections."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        _check_vocab(tokenizer)
        self.model = model.eval().to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype

    def to(self, device: str | torch.device) -> GroundingDino:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def encode_prompts(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """'[CLS] p1 . p2 . [SEP]' token ids and, per phrase, the token positions it occupies."""
        cls_id, sep_id, dot_id = (BERT_SPECIAL_IDS[t] for t in ("[CLS]", "[SEP]", "."))
        ids, spans = [cls_id], []
        for p in prompts:
            phrase = p.strip().lower().rstrip(".").strip()
            if not phrase:
                raise ValueError(f"empty subject prompt in {prompts!r}")
            toks = self.tokenizer.encode(phrase, add_special_tokens=False)
            if not toks:
                raise ValueError(f"prompt {p!r} gives no tokens with this vocabulary")
            spans.append(list(range(len(ids), len(ids) + len(toks))))
            ids += toks + [dot_id]
        ids.append(sep_id)
        limit = int(self.model.config.max_text_len)
        if len(ids) > limit:
            raise ValueError(f"prompts {prompts!r} give {len(ids)} tokens; the model reads at most {limit}")
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "token_type_ids": torch.zeros_like(t)}, spans

    def preprocess(self, frames: np.ndarray, opt: DetectorOptions) -> torch.Tensor:
        """uint8 [N,H,W,3] -> normalised float [N,3,h,w] at the detector's input size."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = min(opt.short_side / min(h, w), opt.max_side / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        return imagenet_normalize(x).to(self.dtype)

    @torch.inference_mode()
    def detect(
        self,
        frames: np.ndarray,
        prompts: list[str],
        options: DetectorOptions | None = None,
        frame_indices: list[int] | None = None,
    ) -> list[FrameDetections]:
        """Boxes per frame. `labels` holds the prompt index of each box when prompts differ."""
        opt = options or DetectorOptions()
        frames = np.asarray(frames)
        check_uint8_frames(frames)
        unique = list(dict.fromkeys(p.strip().lower() for p in prompts))
        text, spans = self.encode_prompts(unique)
        idx = list(frame_indices) if frame_indices is not None else list(range(len(frames)))
        h, w = frames.shape[1:3]
        out: list[FrameDetections] = []
        for start in range(0, len(frames), max(1, opt.batch_size)):
            chunk = frames[start : start + opt.batch_size]
            pixels = self.preprocess(chunk, opt)
            n = len(chunk)
            res = self.model(
                pixel_values=pixels,
                pixel_mask=torch.ones((n,) + pixels.shape[-2:], dtype=torch.long, device=self.device),
                **{k: v.expand(n, -1) for k, v in text.items()},
            )
            probs = res.logits.float().sigmoid()  # [n, Q, max_text_len]; -inf outside the text
            phrase_probs = torch.stack([probs[..., s].amax(-1) for s in spans], -1)  # [n, Q, P]
            boxes = res.pred_boxes.float()  # cx, cy, w, h relative to the image
            for b in range(n):
                out.append(self._frame_result(idx[start + b], phrase_probs[b], boxes[b], w, h, opt, len(unique) > 1))
        return out

    @staticmethod
    def _frame_result(frame: int, phrase_probs: torch.Tensor, boxes: torch.Tensor, w: int, h: int,
                      opt: DetectorOptions, labelled: bool) -> FrameDetections:
        score, label = phrase_probs.max(-1)
        keep = (score > opt.box_threshold) & (score > opt.text_threshold)
        cxcywh = boxes[keep].cpu().numpy().astype(np.float64)
        xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], -1)
        xyxy = np.clip(xyxy * np.array([w, h, w, h]), 0, [w, h, w, h])
        sc = score[keep].cpu().numpy().astype(np.float64)
        lab = label[keep].cpu().numpy()
        k = nms(xyxy, sc, opt.nms_iou)
        return FrameDetections(frame, xyxy[k], sc[k], lab[k] if labelled else None)


def has_hf_weights(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def load_grounding_dino(
    path: str | os.PathLike,
    bert_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GroundingDino:
    """A detector from an HF folder or an original checkpoint file (+ vocab from `bert_dir`)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file() or not has_hf_weights(path):
            raise ModelFileError(
                f"{path}: expected a Hugging Face Grounding DINO folder with config.json and "
                f"model.safetensors (or pytorch_model.bin); found {sorted(p.name for p in path.iterdir())[:10]}"
            )
        from transformers import GroundingDinoForObjectDetection

        model = GroundingDinoForObjectDetection.from_pretrained(str(path), local_files_only=True, use_safetensors=None)
        tokenizer = load_bert_tokenizer(path, bert_dir)
    else:
        if not path.is_file():
            raise ModelFileError(
                f"Grounding DINO checkpoint {path} not found; put one of {', '.join(ORIGINAL_FILES)} "
                f"or a Hugging Face folder (config.json + model.safetensors) in {path.parent}"
            )
        model = build_from_original(path)
        tokenizer = load_bert_tokenizer(bert_dir)
    return GroundingDino(model, tokenizer, device=device, dtype=dtype)
