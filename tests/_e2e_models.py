"""Tiny model files for the test server, and API-prompt edits that point a shipped workflow at them.

Files (written into the server's own model folders, under names no shipped workflow uses, so a
stock loader never meets a tiny file):
- a Mochi DiT in genmo/ComfyUI keys (d = 96, mlp ratio 4: the feed-forward widths of ComfyUI and
  diffusers agree, so the trainer's diffusers model and ComfyUI's sampler load the same file);
- a T5 encoder (transformers' T5, T5-XXL's vocabulary, width 32 = the DiT's text width);
- ComfyUI's genmo VAE at a tiny size (written with ComfyUI's classes, in-process);
- a relation LoRA for that DiT (the core's triplet, relation + ffn kept);
- Grounding DINO (original .pth + .cfg.py, BERT vocab), SAM (.pth), SAM 2 (.pt + .yaml sidecar; written
  only where the optional sam2 package is installed).

`use_tiny_models(prompt, models)` swaps the stock loaders for the test-only tiny ones (same
inputs and outputs, links kept) and sets every model-file input to a tiny file;
`shrink(prompt)` sets clip sizes / steps small. Everything else in the prompt is left as the
frontend made it from the workflow.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from comfy_test_nodes import REPLACES as TINY_REPLACES  # stock loader -> tiny stand-in

DIT_KWARGS = dict(  # diffusers MochiTransformer3DModel
    patch_size=2, num_attention_heads=2, attention_head_dim=48, num_layers=2, pooled_projection_dim=96,
    in_channels=12, text_embed_dim=32, time_embed_dim=256, max_sequence_length=16,
)
T5_KWARGS = dict(  # transformers T5Config: T5-XXL's vocabulary (ComfyUI's tokenizer), tiny width
    vocab_size=32128, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
# clip sizes and step counts a CPU runs in seconds (node type -> input -> value)
TINY_INPUTS: dict[str, dict] = {
    "EmptyMochiLatentVideo": {"width": 32, "height": 32, "length": 7, "batch_size": 1},
    "EmptyHunyuanLatentVideo": {"width": 32, "height": 32, "length": 5, "batch_size": 1},  # Wan: 4k + 1 frames
    "KSampler": {"steps": 2},
    "KSamplerAdvanced": {"steps": 4},
    "DreamRelationDataset": {"frames": 7, "height": 32, "width": 32},
    "DreamRelationPrepareDataset": {"max_text_len": 16},
    "DreamRelationTrain": {"steps": 4, "rank": 2, "alpha": 2.0, "positives_per_anchor": 1, "warmup_steps": 1,
                           "checkpoint_every": 2},
    "DreamRelationSubjectMasks": {"box_threshold": 0.0, "text_threshold": 0.0, "detection_stride": 2,
                                  "max_frames_per_batch": 4},
}


@dataclass(frozen=True)
class TinyModels:
    """File names, as the server's loaders list them (relative to their model folder)."""

    dit: str = "tiny_mochi_dit.safetensors"
    t5: str = "tiny_mochi_t5.safetensors"
    t5_fp8: str = "tiny_t5xxl_fp8_e4m3fn_scaled.safetensors"  # the layout of ComfyUI's t5xxl_fp8_e4m3fn_scaled
    vae: str = "tiny_mochi_vae.safetensors"
    lora: str = "tiny_relation.safetensors"
    reference: str = "tiny_model_2000.lora.pt"
    grounding_dino: str = "tiny_groundingdino.pth"
    sam: str = "tiny_sam.pth"
    sam2: str = "tiny_sam2.pt"

    def model_inputs(self) -> dict[tuple[str, str], str]:
        """(node type, input) -> the tiny file that input should name."""
        return {
            ("UNETLoader", "unet_name"): self.dit, ("TinyMochiUNETLoader", "unet_name"): self.dit,
            ("CLIPLoader", "clip_name"): self.t5, ("TinyMochiCLIPLoader", "clip_name"): self.t5,
            ("VAELoader", "vae_name"): self.vae, ("TinyMochiVAELoader", "vae_name"): self.vae,
            ("DreamRelationTrain", "transformer"): self.dit,
            ("DreamRelationRelationLoraLoader", "lora_name"): self.lora,
            ("DreamRelationSubjectMasks", "grounding_dino"): self.grounding_dino,
            ("DreamRelationSubjectMasks", "sam"): self.sam,
            ("DreamRelationSubjectMasks", "sam2"): self.sam2,
        }


# ---------------------------------------------------------------------------------------------
# writing the files


def _save(path: Path, sd: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))


def tiny_diffusers_dit(seed: int = 0):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    return MochiTransformer3DModel(**DIT_KWARGS).eval()


def write_dit(path: Path, seed: int = 0) -> None:
    from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo

    _save(path, diffusers_to_genmo(tiny_diffusers_dit(seed).state_dict(), prefix="model.diffusion_model."))


def write_relation_lora(path: Path, seed: int = 1) -> None:
    """A relation-only LoRA for the tiny DiT, non-zero so that it changes the model's output."""
    from dreamrelation_core.lora import files, peft_triplet

    model = peft_triplet.add_triplet(tiny_diffusers_dit(), rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_triplet.lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    path.parent.mkdir(parents=True, exist_ok=True)
    files.save_relation_only(path, peft_triplet.to_lora_set(model))


# diffusers module of a joint-attention layer -> the reference implementation's key name
_REFERENCE_NAMES = {"to_q": "to_q_x", "to_k": "to_k_x", "to_v": "to_v_x", "add_q_proj": "to_q_y",
                    "add_k_proj": "to_k_y", "add_v_proj": "to_v_y", "to_out.0": "proj_x", "to_add_out": "proj_y"}


def write_reference_checkpoint(path: Path, seed: int = 2) -> None:
    """A checkpoint as the reference implementation saves it (`model_<step>.lora.pt`: bf16 tensors,
    rank/alpha in its kwargs; docs/method.md "Reference checkpoint format") for the tiny DiT."""
    from dreamrelation_core.lora import peft_triplet

    rank = 2
    model = peft_triplet.add_triplet(tiny_diffusers_dit(), rank=rank, alpha=float(rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_triplet.lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    lora = peft_triplet.to_lora_set(model)
    sd = {}
    for adapter, modules in lora.weights.items():
        for module, (a, b) in modules.items():
            block, name = module.split(".attn1.")
            key = f"blocks.{block.split('.')[-1]}.attn.{_REFERENCE_NAMES[name]}"
            suffix = "" if adapter == "ffn" else f".{adapter}"
            sd[f"{key}.lora_A{suffix}"] = a.to(torch.bfloat16)
            sd[f"{key}.lora_B{suffix}"] = b.to(torch.bfloat16)
    kwargs = {"qkv_proj_lora_rank": rank, "qkv_proj_lora_alpha": rank, "out_proj_lora_rank": rank,
              "out_proj_lora_alpha": rank, "q_lora_names": ["relation"], "k_lora_names": ["relation"],
              "v_lora_names": ["subject1", "subject2"], "test_lora_names": ["relation"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "kwargs": kwargs}, path)


def write_t5(path: Path, seed: int = 0) -> None:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    sd = T5EncoderModel(T5Config(**T5_KWARGS)).state_dict()
    sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; ComfyUI's T5 reads `shared`
    _save(path, sd)


def write_t5_fp8_scaled(path: Path, seed: int = 0) -> None:
    """The tiny T5 in the layout of t5xxl_fp8_e4m3fn_scaled.safetensors: every Linear weight in
    float8_e4m3fn with its fp32 `scale_weight` (real weight = weight.float() * scale_weight), the
    `scaled_fp8` marker key, everything else in fp16."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**T5_KWARGS))
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight, as in write_t5
        if key in linears:
            scale = value.abs().max().float() / 448.0  # e4m3fn's largest value
            sd[key] = (value / scale).to(torch.float8_e4m3fn)
            sd[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            sd[key] = value.to(torch.float16)
    _save(path, sd)


def write_vae(path: Path, seed: int = 0) -> None:
    """ComfyUI's genmo VAE classes at the tiny size (ComfyUI imported in this process)."""
    from conftest import import_comfyui

    import_comfyui()
    from comfy_test_nodes.tiny import random_fill_, tiny_video_vae

    _save(path, random_fill_(tiny_video_vae(), seed).state_dict())


def write_mask_models(models_dir: Path, names: TinyModels) -> None:
    from fixtures.mask_models import write_original_gdino, write_sam, write_vocab

    write_original_gdino(models_dir / "grounding-dino" / names.grounding_dino)
    write_vocab(models_dir / "bert-base-uncased")
    write_sam(models_dir / "sams" / names.sam)
    if has_sam2():
        from fixtures.mask_models import write_sam2_seeing_objects

        write_sam2_seeing_objects(models_dir / "sam2" / names.sam2)


def has_sam2() -> bool:
    """The optional sam2 package (SAM 2 propagation) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("sam2", "hydra"))


def write_tiny_models(models_dir: Path, names: TinyModels | None = None) -> TinyModels:
    names = names or TinyModels()
    write_dit(models_dir / "diffusion_models" / names.dit)
    write_t5(models_dir / "text_encoders" / names.t5)
    write_t5_fp8_scaled(models_dir / "text_encoders" / names.t5_fp8)
    write_vae(models_dir / "vae" / names.vae)
    write_relation_lora(models_dir / "loras" / names.lora)
    write_reference_checkpoint(models_dir / "loras" / names.reference)
    write_mask_models(models_dir, names)
    return names


# ---------------------------------------------------------------------------------------------
# Wan: the DiT in ComfyUI's keys (ComfyUI's stock loading function builds it at this size), umT5 with
# its SentencePiece model inside, the Wan 2.1 VAE in ComfyUI's layout, and a relation LoRA for the DiT


@dataclass(frozen=True)
class TinyWanModels:
    """File names of the tiny Wan models, as the server's loaders list them."""

    dit: str = "tiny_wan_dit.safetensors"  # also the high-noise expert of the Wan 2.2 workflow
    dit_low: str = "tiny_wan_dit_low_noise.safetensors"  # the low-noise expert (other weights)
    umt5: str = "tiny_wan_umt5.safetensors"
    vae: str = "tiny_wan_vae.safetensors"
    lora: str = "tiny_wan_relation.safetensors"  # ours: relation + ffn, base model Wan 2.1
    lora_comfy: str = "tiny_wan_relation_comfy.safetensors"  # its ComfyUI export (stock LoRA keys)

    def model_inputs(self) -> dict[tuple[str, str], str]:
        """(node type, input) -> the tiny file that input should name."""
        return {
            ("UNETLoader", "unet_name"): self.dit, ("TinyMochiUNETLoader", "unet_name"): self.dit,
            ("CLIPLoader", "clip_name"): self.umt5, ("TinyMochiCLIPLoader", "clip_name"): self.umt5,
            ("VAELoader", "vae_name"): self.vae, ("TinyMochiVAELoader", "vae_name"): self.vae,
            ("DreamRelationRelationLoraLoader", "lora_name"): self.lora,
            ("LoraLoaderModelOnly", "lora_name"): self.lora_comfy,
            ("DreamRelationTrain", "transformer"): self.dit,
        }


def write_wan_relation_lora(path: Path, comfy_path: Path, seed: int = 1) -> None:
    """A relation-only Wan LoRA for the tiny Wan DiT (non-zero: it changes the output), and its
    ComfyUI export."""
    from dreamrelation_core.lora import files, peft_triplet
    from dreamrelation_core.lora.comfy_export import comfy_state_dict
    from dreamrelation_core.wan import tiny
    from dreamrelation_core.wan.spec import WAN21

    model = peft_triplet.add_triplet(tiny.tiny_transformer(seed=0), rank=2, alpha=2.0, spec=WAN21)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_triplet.lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    lora = peft_triplet.to_lora_set(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.save_relation_only(path, lora)
    _save(comfy_path, comfy_state_dict(files.load_lora_file(path)))


def write_tiny_wan_models(models_dir: Path, names: TinyWanModels | None = None) -> TinyWanModels:
    from conftest import import_comfyui

    from dreamrelation_core.wan import dit_keys, tiny

    import_comfyui()
    from fixtures.wan import comfy_tiny_vae

    names = names or TinyWanModels()
    for name, seed in ((names.dit, 0), (names.dit_low, 5)):
        sd = dit_keys.diffusers_to_comfy(tiny.tiny_transformer(seed=seed).state_dict(), prefix="model.diffusion_model.")
        _save(models_dir / "diffusion_models" / name, sd)
    encoder = tiny.tiny_text_encoder(seed=0)
    _save(models_dir / "text_encoders" / names.umt5, tiny.umt5_file_state_dict(encoder, tiny.tiny_spiece_model()))
    _save(models_dir / "vae" / names.vae, comfy_tiny_vae(seed=0).state_dict())
    write_wan_relation_lora(models_dir / "loras" / names.lora, models_dir / "loras" / names.lora_comfy)
    return names


# ---------------------------------------------------------------------------------------------
# editing API prompts


def nodes_of(prompt: dict, class_type: str) -> list[tuple[str, dict]]:
    return [(i, n) for i, n in prompt.items() if n.get("class_type") == class_type]


def only(prompt: dict, class_type: str) -> dict:
    """The one node of that type (its dict, editable in place)."""
    found = nodes_of(prompt, class_type)
    assert len(found) == 1, f"expected one {class_type} in the prompt, found {len(found)}"
    return found[0][1]


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    """Set widget inputs of every node of that type (links are never overwritten)."""
    for _, node in nodes_of(prompt, class_type):
        for key, value in values.items():
            assert not _is_link(node["inputs"].get(key)), f"{class_type}.{key} is a link, not a widget"
            node["inputs"][key] = value
    return prompt


def use_tiny_models(prompt: dict, models: TinyModels) -> dict:
    """A copy of `prompt` with UNETLoader / CLIPLoader / VAELoader replaced by the tiny loaders
    (same inputs, same outputs, so every link stays) and each model-file input naming a tiny file
    ("none" choices, e.g. an optional SAM 2, are kept)."""
    out = copy.deepcopy(prompt)
    files = models.model_inputs()
    for node in out.values():
        node["class_type"] = TINY_REPLACES.get(node["class_type"], node["class_type"])
        for key, value in list(node["inputs"].items()):
            tiny = files.get((node["class_type"], key))
            if tiny is not None and not _is_link(value) and value != "none":
                node["inputs"][key] = tiny
    return out


def shrink(prompt: dict, extra: dict[str, dict] | None = None) -> dict:
    """Tiny clip sizes and step counts (TINY_INPUTS, then `extra`), on inputs the nodes have."""
    for table in (TINY_INPUTS, extra or {}):
        for class_type, values in table.items():
            for _, node in nodes_of(prompt, class_type):
                for key, value in values.items():
                    if key in node["inputs"] and not _is_link(node["inputs"][key]):
                        node["inputs"][key] = value
    return prompt
