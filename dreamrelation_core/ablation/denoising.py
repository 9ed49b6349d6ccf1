"""Denoising scores: what a model prefers among exactly rendered clips, without sampling
(docs/ablation.md "Denoising scores").

The generation judge needs a base that samples coherent motion; ours does not (docs/ablation.md).
These scores ask the model a question it can answer without sampling: under the prompt "<new
subject 1> <target relation> <new subject 2>", which of two rendered clips does it denoise better
(a lower flow-matching error at the same noise draws)? A lower error means the clip is more
likely under the model (the same idea as a diffusion model used as a classifier).

- relation AUC: per new subject pair, a clip of the target relation against a clip of another
  relation, both between the prompted subjects: the share of such comparisons the target relation
  wins (0.5: the model does not tell the target motion apart; 1: always).
- relation gain AUC: the same comparisons on how much the model lowers the error against the base
  (err_base - err_model): the clips' own difficulty cancels, so this isolates what a LoRA added
  to the target motion over the other motions (0.5 for the base itself, and for a LoRA that
  helps or hurts every motion alike).
- error change: the mean relative change of the error against the base over all these clips
  (negative: the LoRA denoises the world better, positive: worse).
- leakage AUC: the same target-relation tracks drawn once with the prompted subjects and once
  with the exemplars' subjects: the share the exemplars' appearance wins (0: the prompt's
  subjects always preferred; higher: the exemplars' appearance leaks into the model).
Every clip and model is scored at the same (sigma, noise) draws: differences between variants
are not noise of the draws.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base_models import spec_of_model
from .recipe import Recipe
from .world import EXEMPLAR_SUBJECTS, RELATIONS, Subject, caption, new_pairs, relation_tracks, render

CLIPS_PER_RELATION = 2  # per subject pair and relation
DRAWS = 6  # (sigma, noise) draws per clip
SIGMAS = (0.3, 0.8)  # noise levels scored: where the motion is decided, not the last details


def held_out(r: Recipe, seed: int = 7) -> dict:
    """The clips scored: per new pair, CLIPS_PER_RELATION clips of every relation (fresh positions
    from `seed`), and the target relation's tracks drawn with the exemplars' subjects."""
    rng = np.random.default_rng(seed)
    ex1, ex2 = (Subject(c, k) for c, k in EXEMPLAR_SUBJECTS)
    pairs = []
    for s1, s2 in new_pairs(r.pairs):
        by_relation, leak = {}, []
        for rel in RELATIONS:
            clips = []
            for _ in range(CLIPS_PER_RELATION):
                t1, t2 = relation_tracks(rel, rng, r.shape)
                clips.append(render(s1, s2, t1, t2, r.shape)[0])  # [12, T, h, w]
                if rel == r.target:
                    leak.append(render(ex1, ex2, t1, t2, r.shape)[0])  # the same motion, the exemplars' look
            by_relation[rel] = torch.stack(clips)
        pairs.append({"prompt": caption(s1, r.target, s2), "by_relation": by_relation, "exemplar_look": torch.stack(leak)})
    return {"pairs": pairs, "seed": seed}


@torch.no_grad()
def errors(model: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, ym: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Mean flow-matching error of each clip z [N, C, T, h, w] under one prompt (y [1, L, D],
    ym [1, L]) over DRAWS draws shared by all clips -> [N]."""
    spec = spec_of_model(model)
    g = torch.Generator().manual_seed(seed)
    n = z.shape[0]
    total = torch.zeros(n)
    for _ in range(DRAWS):
        sigma = SIGMAS[0] + (SIGMAS[1] - SIGMAS[0]) * torch.rand(1, generator=g)
        eps = torch.randn(z.shape[1:], generator=g).expand_as(z)  # one noise for every clip of the draw
        s = sigma.view(1, 1, 1, 1, 1)
        x, u = (1 - s) * z + s * eps, z - eps
        pred = spec.predict(model, x, y.expand(n, -1, -1), ym.expand(n, -1), sigma.expand(n))
        total += (pred.float() - u).square().mean(dim=(1, 2, 3, 4))
    return total / DRAWS


def _wins(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (i, j) with a[i] < b[j] (ties count half)."""
    a, b = a[:, None], b[None, :]
    return float(((a < b).float() + 0.5 * (a == b).float()).mean())


def clip_errors(model: torch.nn.Module, encode, r: Recipe, clips: dict) -> list[dict[str, torch.Tensor]]:
    """Per new pair: the errors of its target, other and exemplar-look clips under `model`."""
    model.eval()
    out = []
    for i, p in enumerate(clips["pairs"]):
        y, ym = encode([p["prompt"]])
        target = p["by_relation"][r.target]
        others = torch.cat([c for rel, c in p["by_relation"].items() if rel != r.target])
        err = errors(model, torch.cat([target, others, p["exemplar_look"]]), y, ym, seed=i)
        nt, no = len(target), len(others)
        out.append({"target": err[:nt], "others": err[nt:nt + no], "look": err[nt + no:]})
    return out


def scores(model: torch.nn.Module, encode, r: Recipe, clips: dict,
           base_errors: list[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
    """The scores of `model` (module docstring); `encode(captions)` -> (y, ym); `base_errors`:
    clip_errors of the base (the gain scores need them; None: `model` is the base)."""
    errs = clip_errors(model, encode, r, clips)
    ref = base_errors if base_errors is not None else errs
    rel, gain, leak, change = [], [], [], []
    for e, b in zip(errs, ref):
        rel.append(_wins(e["target"], e["others"]))
        gain.append(_wins(e["target"] - b["target"], e["others"] - b["others"]))  # larger drop wins
        leak.append(float(((e["look"] < e["target"]).float() + 0.5 * (e["look"] == e["target"]).float()).mean()))
        both, both_b = torch.cat([e["target"], e["others"]]), torch.cat([b["target"], b["others"]])
        change.append(float(((both - both_b) / both_b).mean()))
    return {"relation_auc": float(np.mean(rel)), "relation_gain_auc": float(np.mean(gain)),
            "error_change": float(np.mean(change)), "leakage_auc": float(np.mean(leak))}


POOLING_SIGMAS = (0.8, 0.9)  # where sampling decides where the subjects go


def _at(scores: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the largest entry of a [h', w'] map."""
    k = int(scores.flatten().argmax())
    return k // scores.shape[-1], k % scores.shape[-1]


@torch.no_grad()
def temporal_pooling(model: torch.nn.Module, encode, r: Recipe, clips: int = 24, seed: int = 5) -> dict[str, dict]:
    """Does the base gather a subject's evidence over the frames? The still subject of "circles
    around" clips, noised to sigma: the share of frames on which its colour's strongest 2x2 block in
    the model's one-step estimate of the clean clip is the true block, against the same read from the
    noisy clip itself (one frame alone) and from the noisy frames averaged (what pooling them can
    reach). A base no better than one frame alone draws every frame on its own, and its samples
    jump from frame to frame (docs/ablation.md "The base")."""
    from .judge import block_scores
    from .world import COLOURS, make_clip, random_pair

    spec = spec_of_model(model)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    world = [make_clip("circle_around", *random_pair(rng), rng, r.shape) for _ in range(clips)]
    z = torch.stack([c.latents for c in world])  # [N, 12, T, h, w]
    y, ym = encode([c.caption for c in world])
    out = {}
    for sigma in POOLING_SIGMAS:
        eps = torch.randn(z.shape, generator=g)
        x = (1 - sigma) * z + sigma * eps
        z_hat = x + sigma * spec.predict(model, x, y, ym, torch.full((len(z),), sigma)).float()  # x + sigma u
        hits = np.zeros(3)
        for i, c in enumerate(world):
            ch, true = COLOURS.index(c.subject2.colour), tuple(int(v) for v in c.track2[0])
            est, noisy = block_scores(z_hat[i])[ch], block_scores(x[i])[ch]  # [T, h - 1, w - 1]
            hits += [np.mean([_at(est[f]) == true for f in range(len(est))]),
                     np.mean([_at(noisy[f]) == true for f in range(len(noisy))]), _at(noisy.mean(0)) == true]
        model_share, alone, pooled = (float(v) for v in hits / clips)
        out[f"{sigma:g}"] = {"model": model_share, "one_frame": alone, "frames_pooled": pooled}
    return out
