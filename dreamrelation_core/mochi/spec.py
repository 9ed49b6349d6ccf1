"""Mochi 1 as a `BaseModelSpec`: the facts of `latents`, `loading` and the joint attention in one object."""

from __future__ import annotations

import re

import torch

from ..basemodel import BaseModelSpec
from . import latents


class MochiSpec(BaseModelSpec):
    name = "mochi-1-preview"
    family = "mochi"
    display_name = "Mochi"
    frame_rule = "6k + 1 frames (7, 13, ..., 61, ...)"
    latent_channels = latents.LATENT_CHANNELS
    spatial_compression = latents.SPATIAL_COMPRESSION
    temporal_compression = latents.TEMPORAL_COMPRESSION
    patch_size = latents.PATCH_SIZE
    text_len = 256
    blocks_attr = "transformer_blocks"
    diffusers_class = "MochiTransformer3DModel"
    # adapter -> joint-attention submodules it sits on (visual, then text)
    adapter_modules = {
        "relation": ("to_q", "to_k", "add_q_proj", "add_k_proj"),
        "subject1": ("to_v", "add_v_proj"),
        "subject2": ("to_v", "add_v_proj"),
        "ffn": ("to_out.0", "to_add_out"),
    }
    # Where the relation adapter may sit (`with_relation_placement`; ablations, docs/ablation.md):
    # "qk" is the method's; the others move it to the queries or keys only, the values, or all
    # three. The subject adapters stay on V, the ffn adapter on the outputs, whatever it is.
    relation_placements = {
        "qk": ("to_q", "to_k", "add_q_proj", "add_k_proj"),
        "q": ("to_q", "add_q_proj"),
        "k": ("to_k", "add_k_proj"),
        "v": ("to_v", "add_v_proj"),
        "kv": ("to_k", "to_v", "add_k_proj", "add_v_proj"),
        "qkv": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"),
    }
    module_re = re.compile(
        r"^transformer_blocks\.(\d+)\.attn1\."
        r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$"
    )

    def check_frame_count(self, num_frames: int) -> None:
        latents.check_frame_count(num_frames)

    def latent_frame_count(self, num_frames: int) -> int:
        return latents.latent_frame_count(num_frames)

    def nearest_valid_frame_counts(self, num_frames: int) -> tuple[int, int]:
        return latents.nearest_valid_frame_counts(num_frames)

    def check_training_size(self, size: tuple[int, int]) -> None:
        latents.check_training_size(size)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return latents.normalize_latents(z)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return latents.denormalize_latents(z)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return latents.diffusers_timestep(sigma)

    def predict(self, model, latents_: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
        # diffusers' Mochi predicts u = z - eps at timestep 1000 * (1 - sigma)
        return model(hidden_states=latents_, encoder_hidden_states=text, timestep=self.model_timestep(sigma),
                     encoder_attention_mask=text_mask, return_dict=False)[0]

    @torch.no_grad()
    def block_inputs(self, model, device: torch.device) -> tuple[tuple, dict]:
        cfg = model.config
        d = cfg.num_attention_heads * cfg.attention_head_dim
        frames, height, width, text = 1, 2, 4, 2  # a few patches and text tokens
        rope = model.rope(model.pos_frequencies.detach().to(device), frames, height, width, device=device,
                          dtype=torch.float32)  # (cos, sin) [n, heads, head_dim / 2]
        return (), dict(hidden_states=torch.randn(1, frames * height * width, d, device=device),  # [1, n, d]
                        encoder_hidden_states=torch.randn(1, text, cfg.pooled_projection_dim, device=device),
                        temb=torch.randn(1, d, device=device),  # [1, d]
                        encoder_attention_mask=torch.ones(1, text, dtype=torch.bool, device=device),
                        image_rotary_emb=rope)

    def module_path(self, block: int, sub: str) -> str:
        return f"transformer_blocks.{block}.attn1.{sub}"

    def parse_module_path(self, path: str) -> tuple[int, str]:
        m = self.module_re.match(path)
        if m is None:
            raise ValueError(f"not a Mochi joint-attention module path: {path!r}")
        return int(m.group(1)), m.group(2)

    def target_modules(self, adapter: str, num_layers: int) -> list[str]:
        """The last block discards its text stream: its `add_q_proj` only ever gets a zero gradient
        and it has no `to_add_out`, so both are left out."""
        out = []
        for i in range(num_layers):
            for sub in self.adapter_modules[adapter]:
                if i == num_layers - 1 and sub in ("add_q_proj", "to_add_out"):
                    continue
                out.append(self.module_path(i, sub))
        return out

    def detect(self, keys: list[str]) -> bool:
        """genmo / ComfyUI keys (`blocks.N.attn.qkv_x`) or diffusers' (`transformer_blocks.N.attn1.add_q_proj`)."""
        return any(".attn.qkv_x." in k or k.startswith("transformer_blocks.") and ".attn1.add_q_proj" in k for k in keys)

    def load_transformer(self, source: str, config_dir: str = "", dtype: torch.dtype = torch.float32, seed: int = 0,
                         tiny: dict | None = None, linear_dtype: torch.dtype | None = None) -> torch.nn.Module:
        from .loading import load_transformer

        return load_transformer(source, config_dir, dtype, seed, tiny, linear_dtype)

    def load_vae(self, path, config_dir=None, dtype: torch.dtype = torch.float32, device="cpu") -> torch.nn.Module:
        from .loading import load_vae

        return load_vae(path, config_dir, dtype=dtype, device=device)

    def load_text_encoder(self, path, tokenizer_dir=None, config_dir=None, dtype: torch.dtype = torch.float32,
                          device="cpu") -> tuple:
        from .loading import load_text_encoder

        return load_text_encoder(path, tokenizer_dir, config_dir, dtype=dtype, device=device)

    def vae_from_comfy_state_dict(self, state_dict: dict, dtype: torch.dtype = torch.float32,
                                  source: str = "state dict") -> torch.nn.Module:
        """Encoder only (the genmo keys `encoder.*`): training needs no decoder."""
        from .loading import vae_from_genmo_state_dict

        return vae_from_genmo_state_dict({k: v for k, v in state_dict.items() if k.startswith("encoder.")}, dtype,
                                         source=source)

    def tiny_encoders(self, seed: int = 0, text_len: int = 16) -> tuple:
        from .tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae

        return tiny_vae(seed), tiny_text_encoder(seed), tiny_tokenizer(text_len)


MOCHI = MochiSpec()
