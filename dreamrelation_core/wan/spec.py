"""Wan 2.1 / 2.2 as `BaseModelSpec`s, on top of `latents`, `dit_keys` and `loading`.

Two latent formats, so two specs (docs/method.md "Wan 2.1 / 2.2"):
- `wan2.1`: the Wan 2.1 VAE (16 channels, 8x space, 4x time): Wan 2.1 1.3B and 14B, and each
  expert of Wan 2.2 A14B (the same architecture as 2.1 14B: one LoRA file fits both);
- `wan2.2-5b`: the Wan 2.2 TI2V 5B with its own VAE (48 channels, 16x space, 4x time).

Where the relation LoRA triplet sits on Wan is a choice (`TrainConfig.lora_placement`), because
Wan is not an MM-DiT: each block has self-attention over the video tokens and cross-attention
from the video to the umT5 text. `default`: relation on self-attention Q, K and cross-attention
Q, K; subjects on both V; the shared ("ffn") LoRA on both output projections. `self_attention`:
the same on the self-attention only (cross-attention untouched).

Time: diffusers' `WanTransformer3DModel` takes 1000 * sigma and predicts v = eps - z; `predict`
returns u = z - eps = -v, the core's convention. Text: Wan has no attention mask; the rows past
the caption are zeros, as ComfyUI feeds them, so `predict` zeroes the masked rows.
"""

from __future__ import annotations

import re

import torch

from ..basemodel import BaseModelSpec, model_class_name
from . import latents

PLACEMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "default": {
        "relation": ("attn1.to_q", "attn1.to_k", "attn2.to_q", "attn2.to_k"),
        "subject1": ("attn1.to_v", "attn2.to_v"),
        "subject2": ("attn1.to_v", "attn2.to_v"),
        "ffn": ("attn1.to_out.0", "attn2.to_out.0"),
    },
    "self_attention": {
        "relation": ("attn1.to_q", "attn1.to_k"),
        "subject1": ("attn1.to_v",),
        "subject2": ("attn1.to_v",),
        "ffn": ("attn1.to_out.0",),
    },
}


class WanSpec(BaseModelSpec):
    family = "wan"
    temporal_compression = latents.TEMPORAL_COMPRESSION
    patch_size = latents.PATCH_SIZE[1]
    text_len = latents.TEXT_LEN
    blocks_attr = "blocks"
    diffusers_class = "WanTransformer3DModel"
    frame_rule = "4k + 1 frames (5, 9, ..., 49, ..., 81)"
    placements = tuple(PLACEMENTS)
    # diffusers casts the time features to the time embedder's parameter dtype: it stays in a compute dtype
    keep_precision = ("condition_embedder.time_embedder",)
    module_re = re.compile(r"^blocks\.(\d+)\.(attn[12]\.(?:to_q|to_k|to_v|to_out\.0))$")

    def __init__(self, name: str, display_name: str, latent_channels: int, placement: str = "default"):
        self.name = name
        self.display_name = display_name
        self.latent_channels = latent_channels
        self.spatial_compression = latents.spatial_compression(latent_channels)
        self.placement = placement
        self.adapter_modules = PLACEMENTS[placement]

    def with_placement(self, placement: str) -> WanSpec:
        super().with_placement(placement)  # checks the name
        return self if placement == self.placement else WanSpec(self.name, self.display_name, self.latent_channels,
                                                                placement)

    # -- frames, sizes, latents, time ------------------------------------------------------------
    def check_frame_count(self, num_frames: int) -> None:
        latents.check_frame_count(num_frames)

    def latent_frame_count(self, num_frames: int) -> int:
        return latents.latent_frame_count(num_frames)

    def nearest_valid_frame_counts(self, num_frames: int) -> tuple[int, int]:
        return latents.nearest_valid_frame_counts(num_frames)

    def check_training_size(self, size: tuple[int, int]) -> None:
        latents.check_training_size(size, self.latent_channels)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return latents.normalize_latents(z)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return latents.denormalize_latents(z)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return latents.diffusers_timestep(sigma)

    def predict(self, model, latents_: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
        text = text * text_mask[..., None].to(text.dtype)  # [B, L, D]: zero rows past the caption
        v = model(hidden_states=latents_, timestep=self.model_timestep(sigma), encoder_hidden_states=text,
                  return_dict=False)[0]
        return -v  # v = eps - z -> u = z - eps

    @torch.no_grad()
    def block_inputs(self, model, device: torch.device) -> tuple[tuple, dict]:
        cfg = model.config
        d = cfg.num_attention_heads * cfg.attention_head_dim
        pt, ph, pw = cfg.patch_size
        grid = torch.zeros(1, cfg.in_channels, pt, 2 * ph, 4 * pw, device=device)  # 1 x 2 x 4 patches
        cos, sin = (t.to(device) for t in model.rope(grid))  # the rope reads the grid's shape only
        n, text = 8, 2
        return (torch.randn(1, n, d, device=device),  # video tokens [1, n, d]
                torch.randn(1, text, d, device=device),  # text after the model's projection [1, L, d]
                torch.randn(1, 6, d, device=device),  # the six modulation vectors [1, 6, d]
                (cos, sin)), {}

    # -- model and LoRA placement ---------------------------------------------------------------
    def is_model(self, model) -> bool:
        if model_class_name(model) != self.diffusers_class:
            return False
        cfg = getattr(model, "config", {})
        out = cfg.get("out_channels") or cfg.get("in_channels")
        return out == self.latent_channels

    def module_path(self, block: int, sub: str) -> str:
        return f"blocks.{block}.{sub}"

    def parse_module_path(self, path: str) -> tuple[int, str]:
        m = self.module_re.match(path)
        if m is None:
            raise ValueError(f"not a Wan attention projection module path: {path!r}")
        return int(m.group(1)), m.group(2)

    # -- ComfyUI's LoRA keys ----------------------------------------------------------------------
    def comfy_module(self, path: str) -> str:
        """diffusers module path -> ComfyUI's module name (`blocks.3.attn1.to_q` -> `blocks.3.self_attn.q`)."""
        from .dit_keys import BLOCK_LINEARS

        block, sub = self.parse_module_path(path)
        comfy = {d: c for c, d in BLOCK_LINEARS.items()}[sub]
        return f"blocks.{block}.{comfy}"

    def comfy_lora_state_dict(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                              prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
        """{module path: (A [r, in], B [out, r] with the scale folded in)} -> the keys ComfyUI's stock
        LoRA loader reads for Wan: `diffusion_model.blocks.{i}.self_attn.q.lora_A.weight`, `.lora_B.weight`
        and `.alpha` (= rank, so ComfyUI's alpha / rank factor is 1)."""
        sd = {}
        for path, (a, b) in pairs.items():
            key = prefix + self.comfy_module(path)
            sd[f"{key}.lora_A.weight"] = a
            sd[f"{key}.lora_B.weight"] = b
            sd[f"{key}.alpha"] = torch.tensor(float(a.shape[0]))
        return sd

    # -- files -----------------------------------------------------------------------------------
    def detect(self, keys: list[str]) -> bool:
        from .dit_keys import is_wan_file

        return is_wan_file(keys)

    def variant_of_file(self, path) -> WanSpec:
        """The Wan spec of a transformer file: 48 output channels is the TI2V 5B (shapes read from
        the file's header only)."""
        from types import SimpleNamespace

        from safetensors import safe_open

        from .dit_keys import detect_variant, wan_layout

        if wan_layout(path) != "comfy":
            return self
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: SimpleNamespace(shape=tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        variant = detect_variant(shapes, what=str(path))
        return WAN22_5B if variant.latent_channels == latents.WAN22_CHANNELS else WAN21

    def load_transformer(self, source: str, config_dir: str = "", dtype: torch.dtype = torch.float32, seed: int = 0,
                         tiny: dict | None = None, linear_dtype: torch.dtype | None = None) -> torch.nn.Module:
        # Wan's loader reads in `dtype`; fp8 storage follows in `fp8.freeze_linears` (linear_dtype unused)
        from .loading import load_transformer

        if source == "tiny":
            tiny = {"latent_channels": self.latent_channels, **(tiny or {})}
        return load_transformer(source, config_dir, dtype, seed, tiny)

    def load_vae(self, path, config_dir=None, dtype: torch.dtype = torch.float32, device="cpu") -> torch.nn.Module:
        from .loading import load_vae

        return load_vae(path, config_dir, dtype=dtype, device=device)

    def load_text_encoder(self, path, tokenizer_dir=None, config_dir=None, dtype: torch.dtype = torch.float32,
                          device="cpu") -> tuple:
        from .loading import load_text_encoder

        return load_text_encoder(path, tokenizer_dir, config_dir, dtype=dtype, device=device)

    def vae_from_comfy_state_dict(self, state_dict: dict, dtype: torch.dtype = torch.float32,
                                  source: str = "state dict") -> torch.nn.Module:
        from .loading import vae_from_comfy_state_dict

        return vae_from_comfy_state_dict(state_dict, dtype, source=source)

    def tiny_encoders(self, seed: int = 0, text_len: int = latents.TEXT_LEN) -> tuple:
        """Tiny Wan VAE of this spec's latent format (2.1: 16 channels; 2.2: 48), umT5 and its tokenizer."""
        from .tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae

        return tiny_vae(seed, latent_channels=self.latent_channels), tiny_text_encoder(seed), tiny_tokenizer()


WAN21 = WanSpec("wan2.1", "Wan 2.1", latents.WAN21_CHANNELS)  # also each expert of Wan 2.2 A14B
WAN22_5B = WanSpec("wan2.2-5b", "Wan 2.2 TI2V 5B", latents.WAN22_CHANNELS)
