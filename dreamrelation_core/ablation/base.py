"""The world's base model: diffusers' MochiTransformer3DModel (the class the trainer uses) and a
tiny T5, pretrained together with flow matching on clips of every relation but the target
(docs/ablation.md "The base"), cached by the hash of their recipe.

The pretraining is the base's own training (all weights, as Mochi's makers trained theirs), not
the method: the LoRAs are trained afterwards through the trainer."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.encode import encode_captions
from ..fileio import atomic_path, save_safetensors
from ..mochi.latents import diffusers_timestep
from ..mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer_config
from ..training.flow import noisy
from .recipe import Recipe
from .world import RELATIONS, make_clip, random_pair, vocabulary

log = logging.getLogger("dreamrelation")

CAPTION_DROPOUT = 0.1  # as in LoRA training: the sampler's guidance needs an unconditional model


def default_cache_dir() -> Path:
    """$DREAMRELATION_CACHE/ablation, else ~/.cache/dreamrelation/ablation (never inside the repository)."""
    root = os.environ.get("DREAMRELATION_CACHE") or Path.home() / ".cache" / "dreamrelation"
    return Path(root) / "ablation"


@dataclass
class Base:
    recipe: Recipe
    transformer_state: dict[str, torch.Tensor]
    text_encoder: torch.nn.Module
    tokenizer: object
    pretrain_seconds: float
    final_loss: float
    cached: bool = False

    def transformer(self) -> torch.nn.Module:
        """A fresh copy of the pretrained transformer (frozen weights, eval mode)."""
        from diffusers import MochiTransformer3DModel

        model = MochiTransformer3DModel(**transformer_config(self.recipe))
        model.load_state_dict(self.transformer_state)
        return model.eval()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> y_feat [N, L, D], y_mask [N, L] bool."""
        return encode_captions(self.text_encoder, self.tokenizer, captions, self.recipe.text_len)


def transformer_config(r: Recipe) -> dict:
    return tiny_transformer_config(num_layers=r.layers, heads=r.heads, head_dim=r.head_dim, text_dim=r.text_dim,
                                   text_len=r.text_len)


def init_rope(model: torch.nn.Module, r: Recipe) -> None:
    """Start the learned RoPE frequencies [3 axes, heads, head_dim / 2] at a spread of wavelengths.

    diffusers starts `pos_frequencies` at zero (Mochi's checkpoint brings trained ones); from zero a
    small base pretrained from scratch never learned them (after 6,000 steps the largest was 0.04
    rad per unit): with no positions its tokens could not tell one frame from the next, and it drew
    every frame on its own (docs/ablation.md "The base"). Each frequency pair gets one axis (time,
    row, column in turn) and a per-patch angular speed from `rope_max` down to `rope_min`
    (geometric); rows and columns are divided by the unit Mochi's RoPE measures one patch in."""
    from ..mochi.tiny import PATCH_SIZE

    freqs = torch.zeros_like(model.pos_frequencies)  # [3, heads, head_dim / 2]
    t, h, w = r.shape
    hp, wp = h // PATCH_SIZE, w // PATCH_SIZE
    unit = (192 * 192 / (hp * wp)) ** 0.5  # diffusers' MochiRoPE: patch centres this far apart on both axes
    n = freqs.shape[-1]
    for axis in range(3):
        idx = list(range(axis, n, 3))
        speeds = r.rope_max * (r.rope_min / r.rope_max) ** (torch.arange(len(idx)) / max(1, len(idx) - 1))
        freqs[axis, :, idx] = (speeds if axis == 0 else speeds / unit).to(freqs.dtype)
    with torch.no_grad():
        model.pos_frequencies.copy_(freqs)


QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def scale_qk_norms(model: torch.nn.Module, scale: float) -> None:
    """Start the query / key RMSNorm weights at `scale` (diffusers: 1).

    With normalised queries and keys an attention logit is at most about weight² x sqrt(head_dim):
    5.7 at head_dim 32, too flat to single out the few tokens of one place on other frames among
    the clip's 224 (Mochi's 128-wide heads reach 11). Pooling a subject's faint evidence over the
    frames is what lets sampling keep it in one place (docs/ablation.md "The base")."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in QK_NORMS and getattr(module, "weight", None) is not None:
                module.weight.fill_(scale)


def param_groups(params: list[torch.nn.Parameter], norm_decay: bool, weight_decay: float = 0.01) -> list[dict]:
    """AdamW groups: without norm_decay the 1-d parameters (norm weights, biases) get no weight decay,
    the usual practice; decay pulled the query / key norms, and with them attention's sharpness, down."""
    if norm_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


SIGMA_LOGIT_MEAN = 0.5  # logit-normal sigma: median 0.62, where the world's subjects sink into the noise


def draw_sigmas(n: int, g: torch.Generator, how: str) -> torch.Tensor:
    """[n] noise levels: uniform on (0, 1), or logit-normal (SD3's choice; mean SIGMA_LOGIT_MEAN,
    std 1), which spends the steps at middle noise, where sampling decides where the subjects go."""
    if how == "uniform":
        return torch.rand(n, generator=g)
    if how == "logit_normal":
        return torch.sigmoid(SIGMA_LOGIT_MEAN + torch.randn(n, generator=g))
    raise ValueError(f"unknown sigma sampling {how!r}: expected 'uniform' or 'logit_normal'")


def _relation_weights(r: Recipe) -> np.ndarray:
    """Pretraining share of each relation: target_share for the target, the rest split evenly."""
    rest = (1.0 - r.target_share) / (len(RELATIONS) - 1)
    return np.array([r.target_share if rel == r.target else rest for rel in RELATIONS])


def pretrain(r: Recipe, progress: Callable[[int, int, float], None] | None = None, init: Base | None = None) -> Base:
    """Pretrain transformer + T5 from scratch (seeded) on fresh random clips every step; with
    `init`, continue from that base for r.pretrain_more steps at half the learning rate (stage
    r.more_stages of them: its clips are drawn from seed base_seed + more_stages)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(r.base_seed)
    model = MochiTransformer3DModel(**transformer_config(r)).train()
    words = vocabulary()
    tok = tiny_tokenizer(r.text_len, words)
    t5 = tiny_text_encoder(r.base_seed, r.text_dim, words).train()
    steps, lr, seed = r.pretrain_steps, r.pretrain_lr, r.base_seed
    if init is not None:
        model.load_state_dict(init.transformer_state)
        t5.load_state_dict(init.text_encoder.state_dict())
        t5.requires_grad_(True)
        steps, lr, seed = r.pretrain_more, r.pretrain_lr / 2, r.base_seed + r.more_stages  # new clips, not a replay
    else:
        scale_qk_norms(model, r.qk_scale)
    if r.rope_max and (init is not None or not r.rope_at_more):
        init_rope(model, r)  # over the loaded frequencies when a base pretrained without positions goes on
        model.pos_frequencies.requires_grad_(False)  # fixed: Adam's steps of pretrain_lr are as large as these
    params = [p for p in model.parameters() if p.requires_grad] + list(t5.parameters())
    opt = torch.optim.AdamW(param_groups(params, r.norm_decay), lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    probs = _relation_weights(r)
    t0, loss_ema = time.perf_counter(), float("nan")
    for step in range(steps):
        rels = rng.choice(len(RELATIONS), r.pretrain_batch, p=probs)
        clips = [make_clip(RELATIONS[i], *random_pair(rng), rng, r.shape, layouts=r.layouts) for i in rels]
        z = torch.stack([c.latents for c in clips])  # [B, 12, T, h, w]
        ids = tok([c.caption for c in clips], padding="max_length", max_length=r.text_len, truncation=True,
                  return_tensors="pt")
        keep = (torch.rand(len(clips), generator=g) >= CAPTION_DROPOUT).float()  # [B]
        y = t5(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state * keep[:, None, None]
        ym = ids["attention_mask"].bool() & keep.bool()[:, None]
        eps = torch.randn(z.shape, generator=g)
        sigma = draw_sigmas(len(clips), g, r.more_sigma if init is not None else r.pretrain_sigma)  # [B]
        x, u = noisy(z, eps, sigma)
        pred = model(hidden_states=x, encoder_hidden_states=y, timestep=diffusers_timestep(sigma),
                     encoder_attention_mask=ym, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, u)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        loss_ema = value if step == 0 else 0.98 * loss_ema + 0.02 * value
        if progress is not None:
            progress(step + 1, steps, loss_ema)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - t0 + (init.pretrain_seconds if init is not None else 0.0)
    return Base(r, state, t5.eval().requires_grad_(False), tok, seconds, loss_ema)


def _folder(r: Recipe, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"base-{r.base_hash()}"


def save_base(base: Base, cache_dir: Path) -> Path:
    folder = _folder(base.recipe, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / "transformer.safetensors", {k: v.contiguous() for k, v in base.transformer_state.items()}, {})
    save_safetensors(folder / "text_encoder.safetensors",
                     {k: v.detach().clone() for k, v in base.text_encoder.state_dict().items()}, {})  # T5 ties weights: clone
    info = {"recipe": base.recipe.base_fields(), "base_hash": base.recipe.base_hash(),
            "pretrain_seconds": base.pretrain_seconds, "final_loss": base.final_loss}
    with atomic_path(folder / "base.json") as tmp:  # written last: its presence marks a complete cache entry
        tmp.write_text(json.dumps(info, indent=1, default=list))
    return folder


def load_base(r: Recipe, cache_dir: Path) -> Base | None:
    from safetensors.torch import load_file

    folder = _folder(r, cache_dir)
    if not (folder / "base.json").is_file():
        return None
    info = json.loads((folder / "base.json").read_text())
    words = vocabulary()
    t5 = tiny_text_encoder(r.base_seed, r.text_dim, words)
    t5.load_state_dict(load_file(folder / "text_encoder.safetensors"))
    return Base(r, load_file(folder / "transformer.safetensors"), t5.eval().requires_grad_(False),
                tiny_tokenizer(r.text_len, words), float(info["pretrain_seconds"]), float(info["final_loss"]), True)


def get_base(r: Recipe, cache_dir: Path | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> Base:
    """The cached base of this recipe, or pretrain it and cache it."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = load_base(r, cache_dir)
    if base is None:
        first = None
        if r.pretrain_more:  # the stages before this one
            first = get_base(r.before_stage(r.more_stages - 1), cache_dir, progress)
        base = pretrain(r, progress, init=first)
        save_base(base, cache_dir)
    return base
