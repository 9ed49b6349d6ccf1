"""Tiny ComfyUI Mochi built the way ComfyUI's loader builds one, plus its diffusers twin.

ComfyUI's `AsymmetricJointBlock` asserts hidden_size_x * mlp_ratio_x == 12288. Two sizes:
- `inprocess_config()`: keeps that product (64 x 192), runs under normal Python; its
  feed-forward widths differ from diffusers', so it has no diffusers twin;
- `twin_config()`: d = 192, mlp_ratio_x = 4, text width 96: feed-forward widths equal diffusers'
  ((8·d)//3 = 512 = ComfyUI's 2/3·4·d rounded to 256) — only under `python -O`, where the
  assert is skipped. `python -O tests/_comfy_mochi.py twin` runs the equivalence checks there
  and prints JSON numbers the parent test asserts on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TEXT_DIM = 32  # T5 feature width of the tiny models
TEXT_LEN = 16


def base_unet_config(depth: int, hidden_x: int, hidden_y: int, heads: int, mlp_ratio_x: float) -> dict:
    """What `comfy.model_detection` makes of a genmo Mochi checkpoint, at a tiny size."""
    return dict(
        image_model="mochi_preview", depth=depth, patch_size=2, num_heads=heads, hidden_size_x=hidden_x,
        hidden_size_y=hidden_y, mlp_ratio_x=mlp_ratio_x, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12,
        qk_norm=True, qkv_bias=False, out_bias=True, attn_drop=0.0, patch_embed_bias=True,
        posenc_preserve_area=True, timestep_mlp_bias=True, attend_to_padding=False, timestep_scale=1000.0,
        use_t5=True, t5_feat_dim=TEXT_DIM, t5_token_length=TEXT_LEN,
    )


def inprocess_config(depth: int = 2) -> dict:
    return base_unet_config(depth, hidden_x=64, hidden_y=32, heads=2, mlp_ratio_x=192.0)


def twin_config(depth: int = 2) -> dict:
    return base_unet_config(depth, hidden_x=192, hidden_y=96, heads=2, mlp_ratio_x=4.0)


def diffusers_kwargs(cfg: dict) -> dict:
    """MochiTransformer3DModel arguments with the same shapes as a `twin_config()` ComfyUI Mochi."""
    return dict(
        patch_size=2, num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size_x"] // cfg["num_heads"],
        num_layers=cfg["depth"], pooled_projection_dim=cfg["hidden_size_y"], in_channels=12,
        text_embed_dim=TEXT_DIM, time_embed_dim=256, max_sequence_length=TEXT_LEN,
    )


def random_genmo_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random genmo-key weights (`diffusion_model.` prefix, as in a ComfyUI checkpoint file)."""
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(dict(cfg))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.diffusion_model.state_dict().items():
        # Scaled so activations stay O(1) through the blocks.
        fan_in = v.shape[1] if v.ndim > 1 else 1
        sd[f"diffusion_model.{k}"] = torch.randn(v.shape, generator=g) / max(fan_in, 1) ** 0.5 * (1.0 if v.ndim > 1 else 0.1)
    return sd


def build_comfy_mochi(cfg: dict, weights: dict[str, torch.Tensor]):
    """The tiny Mochi as `comfy.sd.load_diffusion_model_state_dict` builds the real one: model
    config -> float32 inference dtype -> get_model -> load_model_weights -> ModelPatcher."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(dict(cfg))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(weights, "")
    model = model.to(comfy.model_management.unet_offload_device())
    model.load_model_weights(dict(weights), "diffusion_model.")
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def inputs(seed: int = 1, frames: int = 2, h: int = 4, w: int = 6, tokens: int = 5, batch: int = 1):
    """(latent x [B,12,T,H,W], text features [B,L,TEXT_DIM], mask [B,L] with `tokens` valid)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, frames, h, w, generator=g)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    mask[:, :tokens] = 1
    return x, text, mask


def comfy_denoised(patcher, x, sigma: float, text, mask) -> torch.Tensor:
    """ComfyUI's denoised estimate for one (x, σ, text) through BaseModel.apply_model, with the
    patcher's weight patches merged (as sampling does)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    t = torch.full((x.shape[0],), sigma)
    with torch.no_grad():
        out = patcher.model.apply_model(
            x, t, c_crossattn=text, attention_mask=mask, num_tokens=int(mask[0].sum()),
            transformer_options=patcher.model_options.get("transformer_options", {}),
        )
    return out.float()


def setup_comfyui() -> None:
    """In-process ComfyUI on CPU (SPEC recipe) for the `python -O` subprocess."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(1, str(ROOT))
    from conftest import import_comfyui

    import_comfyui()


# ---------------------------------------------------------------------------------------------
# the `python -O` equivalence run


def _twin_run(lora_dir: Path) -> dict:
    """ComfyUI Mochi + our loader vs diffusers Mochi + peft relation-only, same weights."""
    import folder_paths
    from conftest import load_pack
    from diffusers import MochiTransformer3DModel

    from dreamrelation_core.lora import files as formats
    from dreamrelation_core.lora import peft_triplet as triplet
    from dreamrelation_core.mochi import dit_keys as mochi_convert

    cfg = twin_config(depth=2)
    weights = random_genmo_weights(cfg, seed=0)
    base = build_comfy_mochi(cfg, weights)

    # diffusers twin from the same weights, through our converter
    dm = MochiTransformer3DModel(**diffusers_kwargs(cfg)).eval()
    missing, unexpected = dm.load_state_dict(mochi_convert.genmo_to_diffusers(weights), strict=True)
    triplet.add_triplet(dm, rank=4, alpha=8.0)  # scale 2: must be honoured on both sides
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in triplet.lora_parameters(dm):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "subject" not in name else 1e3))
    lora = triplet.to_lora_set(dm)
    folder_paths.add_model_folder_path("loras", str(lora_dir), is_default=True)
    formats.save_triplet(lora_dir / "twin_triplet.safetensors", lora)
    without_subjects = lora.only(("relation", "ffn"))
    formats.save_relation_only(lora_dir / "twin_relation.safetensors", without_subjects)

    pack = load_pack()
    loader = pack.NODE_CLASS_MAPPINGS["DreamRelationRelationLoraLoader"]()
    patched, report = loader.load(base, "twin_triplet.safetensors", 1.0)
    patched_rel, _ = loader.load(base, "twin_relation.safetensors", 1.0)

    x, text, mask = inputs(tokens=5)
    res: dict = {"report": report}
    triplet.activate_inference(dm)
    for sigma in (0.9, 0.35):
        # Conventions: diffusers takes timestep = 1000·(1 − σ) and predicts u = z − ε; ComfyUI's
        # AsymmDiTJoint takes σ and predicts ε − z = −u, and apply_model returns the denoised
        # estimate x − σ·(ε − z) = x + σ·u. So the core's prediction maps to ComfyUI's as
        # denoised_comfy = x + σ·u_diffusers.
        with torch.no_grad():
            u = dm(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([1000.0 * (1 - sigma)]),
                   encoder_attention_mask=mask, return_dict=False)[0]
        core = x + sigma * u
        comfy = comfy_denoised(patched, x, sigma, text, mask)
        comfy_rel = comfy_denoised(patched_rel, x, sigma, text, mask)
        res[f"sigma_{sigma}"] = {
            "max_abs_diff": (comfy - core).abs().max().item(),
            "max_abs_diff_relation_file": (comfy_rel - core).abs().max().item(),
            "lora_effect": (comfy - comfy_denoised(base, x, sigma, text, mask)).abs().max().item(),
            "scale": float(core.abs().max()),
        }
    return res


def main() -> None:
    import tempfile

    setup_comfyui()
    what = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        if what == "twin":
            res = _twin_run(Path(d))
        else:
            raise SystemExit(f"unknown run {what!r}")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
