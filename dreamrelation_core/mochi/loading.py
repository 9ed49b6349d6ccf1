"""The frozen Mochi transformer the LoRAs train on, from local files only.

Accepted: a diffusers folder (`transformer/` of genmo/mochi-1-preview), a diffusers single file
with a local config folder, a genmo / ComfyUI single file (`mochi_preview_dit_*.safetensors` in
ComfyUI's `models/diffusion_models/`: no config needed, the shapes give it), or "tiny".
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import dit_keys as mochi_convert


def config_from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """MochiTransformer3DModel config read off the weights' shapes."""
    n = mochi_convert.count_blocks(sd, r"^transformer_blocks\.(\d+)\.")
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


def load_genmo_file(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A genmo / ComfyUI Mochi DiT `.safetensors` -> diffusers MochiTransformer3DModel."""
    from accelerate import init_empty_weights
    from diffusers import MochiTransformer3DModel
    from safetensors.torch import load_file

    path = Path(path)
    try:
        raw = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        sd = mochi_convert.genmo_to_diffusers(raw)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a Mochi DiT in genmo/ComfyUI key layout: {e}") from e
    config = config_from_diffusers_state_dict(sd)
    with init_empty_weights():
        model = MochiTransformer3DModel(**config)
    expected = model.state_dict()
    for k, t in sd.items():
        if k in expected and expected[k].shape != t.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, a Mochi with config {config} expects {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def _looks_genmo(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.split(".", 2)[-1].startswith("blocks.") or k.startswith("blocks.") or ".blocks." in k for k in f.keys())
    except Exception:
        return False


def load_transformer(source: str, config_dir: str = "", dtype: torch.dtype = torch.float32, seed: int = 0, tiny: dict | None = None):
    """Frozen base model from `source` (see module docstring)."""
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
            return load_genmo_file(path, dtype)
        if not config_dir or not Path(config_dir).is_dir():
            raise FileNotFoundError(
                f"{path}: a diffusers single-file Mochi needs `transformer_config`, a local folder with the "
                f"transformer's config.json (got {config_dir!r}); nothing is downloaded"
            )
        return MochiTransformer3DModel.from_single_file(str(path), config=config_dir, local_files_only=True, torch_dtype=dtype)
    raise FileNotFoundError(f"transformer {source!r}: no such file or folder (expected a diffusers folder or a .safetensors)")
