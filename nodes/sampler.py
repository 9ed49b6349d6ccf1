"""Sampling-time control of a relation LoRA on ComfyUI's Mochi and Wan, and attention maps.

The loader merges the relation LoRA into the weights (no per-step cost). This patch changes its
effective strength per model call without touching the merged weights: for the batch rows where
the wanted strength differs from the merged one (outside the denoising range, or the
unconditional pass in "cond only" mode), forward hooks on the patched linear layers add the
low-rank correction (wanted − merged) · (x Aᵀ) Bᵀ — exact, and costing a rank-2r matmul on
those rows only. The hooks live only for the duration of one `apply_model` call (ComfyUI's
APPLY_MODEL wrapper), so the model object is left as it was.

Attention recording uses ComfyUI's `optimized_attention_override`: for each joint attention call
(Mochi) or cross-attention call (Wan: video queries, umT5 keys) it takes the visual queries
against the text keys, softmax over the prompt tokens (the prompt "cross-attention" of every
video token, cheap: N × L), keeps the chosen words' columns, averages heads, blocks and steps of
the conditional pass, then calls the normal attention unchanged.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .comfy_types import Attention
from .lora import INFO_KEY, RelationLoraInfo

WRAPPER_KEY = "dreamrelation_sampler_patch"
APPLY_TO = ["cond and uncond", "cond only"]


class _Shared:
    """Objects held in model_options that must survive ModelPatcher.clone()'s deepcopy as themselves."""

    def __deepcopy__(self, memo: dict):
        return self


# ---------------------------------------------------------------------------------------------
# attention recording


class AttentionRecorder(_Shared):
    """Accumulates, per chosen word, the attention of every video token to that word's tokens."""

    def __init__(self, words: list[str], positions: list[list[int]]):
        if len(words) != len(positions) or not words:
            raise ValueError("AttentionRecorder needs one token position list per word")
        self.words = words
        self.positions = positions
        self.reset()

    def reset(self) -> None:
        self.sum: torch.Tensor | None = None  # [n_words, N] float32, CPU
        self.count = 0
        self.grid: tuple[int, int, int] | None = None  # token grid (T, h, w)
        self.patch_size = 1  # latent pixels per token side, the model's own (Mochi: 2)

    def add(self, q: torch.Tensor, k: torch.Tensor, n_visual: int, rows: list[int], grid: tuple[int, int, int],
            patch_size: int) -> None:
        """q, k: [B, heads, N + L, D] as Mochi's joint attention builds them (visual tokens first)."""
        self.start(grid, patch_size)
        if k.shape[2] - n_visual <= 0 or not rows:
            return
        self.add_cross(q[:, :, :n_visual], k[:, :, n_visual:], rows)

    def start(self, grid: tuple[int, int, int], patch_size: int) -> None:
        """The token grid and patch size of this call; a new video size starts over."""
        if self.grid is not None and (self.grid, self.patch_size) != (grid, patch_size):
            self.reset()
        self.grid, self.patch_size = grid, patch_size

    def add_cross(self, qv: torch.Tensor, kt: torch.Tensor, rows: list[int]) -> None:
        """qv: [B, heads, N, D] video queries, kt: [B, heads, L, D] text keys (grid set by the caller)."""
        n_text = kt.shape[2]
        idx = torch.tensor(rows, device=qv.device)
        q = qv.index_select(0, idx)
        qv, kt = q, kt.index_select(0, idx)
        logits = torch.matmul(qv, kt.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [b, h, N, L]
        probs = logits.softmax(dim=-1).mean(dim=(0, 1))  # [N, L]
        per_word = []
        for pos in self.positions:
            valid = [p for p in pos if p < n_text]
            per_word.append(probs[:, valid].sum(dim=-1) if valid else probs.new_zeros(probs.shape[0]))
        contrib = torch.stack(per_word).cpu()
        self.sum = contrib if self.sum is None else self.sum + contrib
        self.count += 1

    def maps(self) -> torch.Tensor:
        """[n_words, T, h, w] mean attention (token grid of the latent video)."""
        if self.sum is None or self.grid is None:
            raise RuntimeError("no attention recorded: run a sampler with the patched MODEL before the Attention Maps node")
        return (self.sum / self.count).reshape(len(self.words), *self.grid)

    def latent_shape(self) -> tuple[int, int, int]:
        """(T, H, W) of the latent video the maps were recorded on."""
        if self.grid is None:
            raise RuntimeError("no attention recorded: run a sampler with the patched MODEL before the Attention Maps node")
        T, h, w = self.grid
        return T, h * self.patch_size, w * self.patch_size


def token_positions(tokenize, prompt: str, words: list[str]) -> list[list[int]]:
    """Token indices of each word in `prompt` as the CLIP's own tokenizer splits it.

    `tokenize(text)` is the CLIP's `tokenize` (ComfyUI: {name: [[(token id, weight), ...]]}).
    A word is found where its own token sequence occurs in the prompt's (every occurrence);
    SentencePiece may write a lone word-start piece before it, which is tried without too.
    `#N` picks token N directly.
    """
    out = []
    prompt_ids: list[int] | None = None
    for word in words:
        if word.startswith("#") and word[1:].isdigit():
            out.append([int(word[1:])])
            continue
        if prompt_ids is None:
            prompt_ids = _ids(tokenize, prompt)
        pos = _find(prompt_ids, _ids(tokenize, word))
        if not pos:
            raise ValueError(f"attention word {word!r} is not in the prompt {prompt!r}")
        out.append(pos)
    return out


def _ids(tokenize, text: str) -> list[int]:
    """Token ids of `text` with end-of-text and padding (ids 1 and 0 in T5) removed."""
    res = tokenize(text)
    seq = [t[0] for t in next(iter(res.values()))[0]]
    while seq and seq[-1] in (0, 1):
        seq.pop()
    return seq


def _find(seq: list[int], sub: list[int]) -> list[int]:
    for cand in (sub, sub[1:]):
        if not cand:
            continue
        n = len(cand)
        hits = [i for i in range(len(seq) - n + 1) if seq[i:i + n] == cand]
        if hits:
            return [i + j for i in hits for j in range(n)]
    return []


# ---------------------------------------------------------------------------------------------
# the patch


class RelationSamplerPatch(_Shared):
    """APPLY_MODEL wrapper: relation strength per denoising range / pass, optional recording."""

    def __init__(self, infos: list[RelationLoraInfo], strength: float, start_percent: float, end_percent: float,
                 cond_only: bool, recorder: AttentionRecorder | None):
        self.infos = infos
        self.strength = float(strength)
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self.cond_only = cond_only
        self.recorder = recorder
        self._cast: dict = {}

    # --- which rows get which strength

    def _active(self, model_sampling, sigmas: torch.Tensor) -> torch.Tensor:
        """Per row: inside [start_percent, end_percent]? An empty range (start >= end) is never active."""
        if self.start_percent >= self.end_percent:
            return torch.zeros(sigmas.shape[0], dtype=torch.bool)
        hi = model_sampling.percent_to_sigma(self.start_percent)
        lo = model_sampling.percent_to_sigma(self.end_percent)
        s = sigmas.detach().float().cpu()
        return (s <= hi) & (s >= lo)

    def coefficients(self, model_sampling, sigmas: torch.Tensor, cond_or_uncond: list[int] | None) -> list[torch.Tensor]:
        """Per loaded LoRA: correction factor per batch row (wanted strength − merged strength)."""
        rows = sigmas.shape[0]
        active = self._active(model_sampling, sigmas)
        if self.cond_only and cond_or_uncond:
            per = rows // len(cond_or_uncond)
            is_cond = torch.tensor([c == 0 for c in cond_or_uncond]).repeat_interleave(per)
            active = active & is_cond
        return [torch.where(active, info.strength * self.strength, 0.0) - info.strength for info in self.infos]

    # --- hooks

    def _factors(self, f, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(f), device, dtype)
        if key not in self._cast:
            self._cast[key] = (f.down.to(device, dtype), f.up.to(device, dtype))
        return self._cast[key]

    def _hook(self, f, coef: torch.Tensor):
        rows = torch.nonzero(coef).flatten()
        full = rows.numel() == coef.numel()

        def hook(module, args, out):
            x = args[0]
            down, up = self._factors(f, x.device, x.dtype)
            c = coef.to(x.device, x.dtype)
            if full:
                return out + c.view(-1, *([1] * (x.ndim - 1))) * ((x @ down.t()) @ up.t())
            r = rows.to(x.device)
            xs = x.index_select(0, r)
            delta = c.index_select(0, r).view(-1, *([1] * (x.ndim - 1))) * ((xs @ down.t()) @ up.t())
            return out.index_add(0, r, delta.to(out.dtype))

        return hook

    def _register(self, diffusion_model, coefs: list[torch.Tensor]) -> list:
        handles = []
        for info, coef in zip(self.infos, coefs):
            if not bool(coef.any()):
                continue
            for stem, f in info.fused.items():
                module = diffusion_model.get_submodule(stem)  # Mochi `blocks.3.attn.qkv_x`, Wan `blocks.3.self_attn.q`
                handles.append(module.register_forward_hook(self._hook(f, coef)))
        return handles

    # --- attention override

    def _attention_override(self, n_visual: int, grid: tuple[int, int, int], patch_size: int, rows: list[int]):
        recorder = self.recorder

        def override(func, q, k, v, heads, *args, **kwargs):
            if kwargs.get("skip_reshape") and q.ndim == 4 and q.shape[2] > n_visual:  # Mochi's joint attention
                with torch.no_grad():
                    recorder.add(q, k, n_visual, rows, grid, patch_size)
            elif not kwargs.get("skip_reshape") and q.ndim == 3 and q.shape[1] == n_visual and k.shape[1] != n_visual:
                with torch.no_grad():  # Wan's cross-attention: [B, N, heads * D] queries, [B, L, heads * D] keys
                    b, d = q.shape[0], q.shape[-1] // heads
                    recorder.start(grid, patch_size)
                    recorder.add_cross(q.view(b, -1, heads, d).transpose(1, 2), k.view(b, -1, heads, d).transpose(1, 2),
                                       rows)
            return func(q, k, v, heads, *args, **kwargs)

        return override

    # --- ComfyUI wrappers

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if transformer_options is None:
            transformer_options = {}
        base_model = executor.class_obj
        cond_or_uncond = transformer_options.get("cond_or_uncond")
        coefs = self.coefficients(base_model.model_sampling, t, cond_or_uncond)
        handles = self._register(base_model.diffusion_model, coefs)
        try:
            if self.recorder is not None:
                transformer_options = self._with_recording(base_model, x, transformer_options, cond_or_uncond)
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def _with_recording(self, base_model, x, transformer_options: dict, cond_or_uncond) -> dict:
        p = base_model.diffusion_model.patch_size  # Mochi: 2; Wan: (1, 2, 2)
        pt, ph, pw = tuple(p) if isinstance(p, (tuple, list)) else (1, p, p)
        T, H, W = x.shape[-3:]
        grid = (T // pt, H // ph, W // pw)
        per = x.shape[0] // max(len(cond_or_uncond or [0]), 1)
        chunks = cond_or_uncond or [0]
        rows = [r for i, c in enumerate(chunks) if c == 0 for r in range(i * per, (i + 1) * per)]
        if not rows:
            return transformer_options
        to = dict(transformer_options)
        to["optimized_attention_override"] = self._attention_override(grid[0] * grid[1] * grid[2], grid, ph, rows)
        return to

    def outer_sample(self, executor, *args, **kwargs):
        if self.recorder is not None:
            self.recorder.reset()  # maps of this sampling run only
        return executor(*args, **kwargs)


def patch_model(model, strength: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0,
                cond_only: bool = False, recorder: AttentionRecorder | None = None):
    """Clone `model` with the sampler patch. With the defaults and no recorder it is the loader's
    model unchanged (nothing to correct, nothing registered)."""
    import comfy.patcher_extension as pe

    infos = model.model_options.get("transformer_options", {}).get(INFO_KEY, [])
    if not infos:
        raise ValueError("DreamRelation Sampler Patch: the MODEL carries no relation LoRA; connect "
                         "'DreamRelation Relation LoRA Loader' before it")
    if not 0.0 <= start_percent <= 1.0 or not 0.0 <= end_percent <= 1.0:
        raise ValueError(f"start_percent {start_percent} / end_percent {end_percent}: both must lie in [0, 1]")
    new = model.clone()
    defaults = strength == 1.0 and start_percent == 0.0 and end_percent == 1.0 and not cond_only
    if defaults and recorder is None:
        return new
    patch = RelationSamplerPatch(infos, strength, start_percent, end_percent, cond_only, recorder)
    new.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    new.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    new.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, patch.apply_model)
    new.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, patch.outer_sample)
    return new


class MochiSamplerPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationMochiSamplerPatch",
            display_name="DreamRelation Sampler Patch",
            category="DreamRelation/sampling",
            description="Relation LoRA strength per denoising range and pass; optional attention recording of prompt words.",
            inputs=[
                io.Model.Input("model", tooltip="Mochi or Wan MODEL from 'DreamRelation Relation LoRA Loader'."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Relation LoRA strength inside the range, relative to the loader's (1 = as loaded)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the denoising range where the LoRA acts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of that range (1 = last step). Outside it the model is the base model; "
                                       "start >= end means never."),
                io.Combo.Input("apply_to", options=APPLY_TO, tooltip="'cond only': the negative / unconditional pass "
                                                                     "uses the base model, so CFG pushes towards the relation."),
                io.String.Input("attention_words", default="", tooltip=(
                    "Comma-separated prompt words whose attention onto the video is recorded (needs clip and prompt), "
                    "or token indices like #3. Empty: no recording.")),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP used for the prompt (Mochi's T5, Wan's umT5): finds the words' tokens."),
                io.String.Input("prompt", optional=True, multiline=True, default="",
                                tooltip="The positive prompt text, as given to CLIPTextEncode."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched MODEL for KSampler."),
                Attention.Output(display_name="attention",
                                 tooltip="Recorded attention; connect to 'DreamRelation Attention Maps'."),
            ],
        )

    @classmethod
    def execute(cls, model, strength: float, start_percent: float, end_percent: float, apply_to: str,
                attention_words: str, clip=None, prompt: str = "") -> io.NodeOutput:
        words = [w.strip() for w in attention_words.split(",") if w.strip()]
        recorder = None
        if words:
            if clip is None and not all(w.startswith("#") for w in words):
                raise ValueError("attention_words need the clip input (and the prompt) to find their tokens; or give #token indices")
            tokenize = clip.tokenize if clip is not None else None
            recorder = AttentionRecorder(words, token_positions(tokenize, prompt, words))
        new = patch_model(model, strength, start_percent, end_percent, apply_to == APPLY_TO[1], recorder)
        return io.NodeOutput(new, recorder)


# ---------------------------------------------------------------------------------------------
# attention maps node


def heatmap_frames(maps: torch.Tensor, patch_size: int = 2, upscale: int = 1, colormap: str = "inferno") -> torch.Tensor:
    """[T, h, w] token-grid map -> IMAGE [T, h·p·upscale, w·p·upscale, 3] in [0, 1] (normalised
    over the whole video so frames compare)."""
    m = maps.float()
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    f = patch_size * upscale
    m = m.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)  # latent grid (x upscale)
    if colormap == "gray":
        return m.unsqueeze(-1).repeat(1, 1, 1, 3).contiguous()
    import matplotlib

    cmap = matplotlib.colormaps[colormap]
    return torch.from_numpy(cmap(m.numpy())[..., :3]).float()


class AttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationAttentionMaps",
            display_name="DreamRelation Attention Maps",
            category="DreamRelation/sampling",
            description="Heat maps of how much the video tokens attend to a prompt word during sampling (paper Fig. attention maps).",
            inputs=[
                Attention.Input("attention", tooltip="From 'DreamRelation Sampler Patch' (attention_words set)."),
                io.Latent.Input("samples", tooltip="KSampler's output latent: makes this node run after sampling."),
                io.String.Input("word", default="", tooltip="Which recorded word to show; empty = the first."),
                io.Combo.Input("colormap", options=["inferno", "viridis", "magma", "gray"], tooltip="Heat-map colours."),
                io.Int.Input("upscale", default=1, min=1, max=16, tooltip="Extra nearest-neighbour scaling of the "
                                                                          "latent-grid frames (8 = pixel size)."),
            ],
            outputs=[
                io.Image.Output(display_name="heatmaps", tooltip="One heat-map frame per latent frame, at the latent "
                                                                 "grid size times upscale."),
            ],
        )

    @classmethod
    def execute(cls, attention: AttentionRecorder | None, samples: dict, word: str, colormap: str,
                upscale: int) -> io.NodeOutput:
        if attention is None:
            raise ValueError("no attention recorded: set attention_words on the DreamRelation Sampler Patch")
        maps = attention.maps()
        i = 0
        if word.strip():
            if word.strip() not in attention.words:
                raise ValueError(f"word {word!r} was not recorded; recorded: {attention.words}")
            i = attention.words.index(word.strip())
        recorded = attention.latent_shape()
        lat = tuple(samples["samples"].shape[-3:])
        if lat != recorded:
            raise ValueError(f"recorded attention is for a latent video {'x'.join(map(str, recorded))}, samples are {lat}")
        return io.NodeOutput(heatmap_frames(maps[i], attention.patch_size, upscale, colormap))


NODES: list[type[io.ComfyNode]] = [MochiSamplerPatch, AttentionMaps]
