"""The exact judge of the ablation world (docs/ablation.md "The judge").

Reads a latent clip [12, T, h, w] back in two ways. Cell by cell (text alignment, leakage): a cell
is a subject's if its strongest colour channel and its strongest kind channel both exceed half the
rendering amplitude; its colour and kind are those argmaxes. Block by block (the relation): a
subject of colour c sits, on each frame, at the 2x2 block where channel c has the largest mean,
if that mean exceeds half the amplitude; faint speckles elsewhere do not move it. Subjects are told
apart by colour (the two subjects of a clip have different colours). From the two subjects' block
tracks, fixed rules name the relation, or "none".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .world import AMPLITUDE, BLOCK, COLOURS, EXEMPLAR_SUBJECTS, KINDS, RELATIONS, Subject

MAX_STEP = 3.6  # cells per frame: faster than any program moves (smoothness)
TOL = 0.6  # cells: slack of the monotonicity rules


@dataclass
class Decoded:
    colour: np.ndarray  # [T, h, w] int colour index, -1 background
    kind: np.ndarray  # [T, h, w] int kind index, -1 background


def decode(latents: torch.Tensor) -> Decoded:
    """latents [12, T, h, w] (normalised, as the sampler returns them) -> per-cell colour and kind."""
    z = latents.detach().float().cpu()
    nc = len(COLOURS)
    cv, ci = z[:nc].max(0)  # [T, h, w]
    kv, ki = z[nc:].max(0)
    fg = (cv > AMPLITUDE / 2) & (kv > AMPLITUDE / 2)
    colour = torch.where(fg, ci, torch.full_like(ci, -1)).numpy()
    kind = torch.where(fg, ki, torch.full_like(ki, -1)).numpy()
    return Decoded(colour, kind)


def block_scores(latents: torch.Tensor) -> torch.Tensor:
    """[6, T, h - 1, w - 1]: per colour, the mean of its channel over the 2x2 block at each top-left cell."""
    z = latents.detach().float().cpu()[: len(COLOURS)]  # [6, T, h, w]
    return torch.nn.functional.avg_pool2d(z.flatten(0, 1)[:, None], BLOCK, stride=1)[:, 0].unflatten(0, z.shape[:2])


def _block_track(scores: torch.Tensor) -> np.ndarray | None:
    """scores [T, h', w'] of one colour -> [T, 2] top-left (row, column) of its best block per frame;
    a frame without a block above half the amplitude is missing: one is interpolated, more give None."""
    t, _, w = scores.shape
    best, idx = scores.flatten(1).max(1)  # [T]
    out = np.stack([(idx // w).numpy(), (idx % w).numpy()], 1).astype(float)
    missing = (best <= AMPLITUDE / 2).numpy()
    out[missing] = np.nan
    if missing.sum() > 1 or missing.all():
        return None
    if missing.any():
        f = int(np.nonzero(missing)[0][0])
        nb = [g for g in (f - 1, f + 1) if 0 <= g < t]
        out[f] = np.mean([out[g] for g in nb], 0)
    return out


def _contact(p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """[T] bool: the two 2x2 blocks share cells or are 8-neighbours."""
    return np.abs(p1 - p2).max(1) <= BLOCK


def _smooth(track: np.ndarray) -> bool:
    """No step of a [T, 2] track longer than MAX_STEP cells."""
    return bool((np.linalg.norm(np.diff(track, axis=0), axis=1) <= MAX_STEP).all())


def _monotone(x: np.ndarray, sign: float) -> bool:
    return bool((sign * np.diff(x) >= -TOL).all())


def classify_tracks(p1: np.ndarray, p2: np.ndarray, contact: np.ndarray) -> str:
    """The relation of two tracks [T, 2] (row, column) with per-frame contact [T] bool, or "none"."""
    if not (_smooth(p1) and _smooth(p2)):
        return "none"  # not a smooth motion (shuffled frames, flicker)
    d = np.linalg.norm(p1 - p2, axis=1)
    dr, dc = p1[:, 0] - p2[:, 0], p1[:, 1] - p2[:, 1]
    disp1, disp2 = (float(np.linalg.norm(p[-1] - p[0])) for p in (p1, p2))
    move1, move2 = p1[-1, 1] - p1[0, 1], p2[-1, 1] - p2[0, 1]
    flip = dc[0] * dc[-1] < 0 and abs(dc[0]) >= 2 and abs(dc[-1]) >= 2
    same_order = dc[0] * dc[-1] > 0
    found = []
    if (contact[-1] and not contact[0] and d[0] >= 5 and _monotone(d, -1) and disp1 >= 2 and disp2 >= 2
            and same_order):
        found.append("approach_touch")
    if (contact[0] and not contact[-1] and d[-1] >= 5 and _monotone(d, 1) and disp1 >= 2 and disp2 >= 2
            and same_order):
        found.append("move_apart")
    if (flip and not contact.any() and np.abs(dr).min() >= 2.5 and disp1 >= 3 and disp2 >= 3 and move1 * move2 < 0
            and _monotone(p1[:, 1], np.sign(move1)) and _monotone(p2[:, 1], np.sign(move2))):
        found.append("pass_by")
    if (flip and disp2 <= 1.5 and abs(dr[0]) <= 1 and abs(dr[-1]) <= 1 and dr.min() <= -2
            and _monotone(p1[:, 1], np.sign(move1))):
        found.append("jump_over")
    if (disp1 >= 4 and disp2 >= 4 and move1 * move2 > 0 and (dc * np.sign(move1) < 0).all() and not contact.any()
            and d.max() - d.min() <= 1.5 and _monotone(p1[:, 1], np.sign(move1)) and _monotone(p2[:, 1], np.sign(move2))):
        found.append("follow")
    ang = np.unwrap(np.arctan2(dr, dc))
    dth = np.diff(ang)
    if (disp2 <= 1.5 and (d >= 2).all() and (d <= 5).all() and abs(ang[-1] - ang[0]) >= math.radians(215)
            and ((dth > 0).all() or (dth < 0).all()) and (np.abs(dth) <= math.radians(100)).all()):
        found.append("circle_around")
    return found[0] if len(found) == 1 else "none"


def _tracks(scores: torch.Tensor, c1: int, c2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    p1, p2 = _block_track(scores[c1]), _block_track(scores[c2])
    if p1 is None or p2 is None:
        return None
    return p1, p2, _contact(p1, p2)


def _dominant_colours(scores: torch.Tensor) -> list[int]:
    """The two colours with a block on the most frames (ties: the higher summed block score)."""
    best = scores.flatten(2).max(2).values  # [6, T]
    frames = (best > AMPLITUDE / 2).sum(1).float() + 1e-3 * best.clamp(min=0).sum(1)
    return [int(i) for i in torch.argsort(-frames)[:2] if frames[i] >= 1]


def classify(latents: torch.Tensor, s1: Subject | None = None, s2: Subject | None = None) -> str:
    """The relation shown by a latent clip, or "none". With the prompted subjects given, subject 1
    is the one of s1's colour; if either colour is missing, the two colours seen most are taken in
    both orders (the relation is judged apart from appearance: see text_alignment)."""
    scores = block_scores(latents)
    tracks = None
    if s1 is not None and s2 is not None:
        tracks = _tracks(scores, COLOURS.index(s1.colour), COLOURS.index(s2.colour))
    if tracks is not None:
        return classify_tracks(*tracks)
    dom = _dominant_colours(scores)
    if len(dom) < 2:
        return "none"
    labels = []
    for c1, c2 in ((dom[0], dom[1]), (dom[1], dom[0])):
        tr = _tracks(scores, c1, c2)
        labels.append(classify_tracks(*tr) if tr is not None else "none")
    known = [x for x in labels if x != "none"]
    return known[0] if known else "none"


def smooth_tracks(latents: torch.Tensor, s1: Subject, s2: Subject) -> float:
    """Share of the two prompted subjects whose block track is whole (at most one frame missing)
    and smooth (no step above MAX_STEP): what a sampled clip must have before any relation rule can
    fit. It shows a base's progress while relation accuracy is still 0."""
    scores = block_scores(latents)
    ok = []
    for s in (s1, s2):
        track = _block_track(scores[COLOURS.index(s.colour)])
        ok.append(track is not None and _smooth(track))
    return float(np.mean(ok))


def text_alignment(latents: torch.Tensor, s1: Subject, s2: Subject) -> float:
    """Share of the two prompted subjects that appear as asked: the subject's colour is present on
    all frames but at most one, and the majority kind of its cells is the prompted kind."""
    dec = decode(latents)
    score = 0.0
    for s in (s1, s2):
        cells = dec.colour == COLOURS.index(s.colour)
        frames = int(cells.reshape(cells.shape[0], -1).any(1).sum())
        if frames >= cells.shape[0] - 1:
            kinds = np.bincount(dec.kind[cells], minlength=len(KINDS))
            score += 0.5 * float(int(np.argmax(kinds)) == KINDS.index(s.kind))
    return score


def leakage(latents: torch.Tensor, s1: Subject, s2: Subject) -> float:
    """Share of the subjects' cells that show an exemplar colour or kind the prompt did not ask for."""
    dec = decode(latents)
    fg = dec.colour >= 0
    if not fg.any():
        return 0.0
    asked_c, asked_k = {s1.colour, s2.colour}, {s1.kind, s2.kind}
    bad_c = [COLOURS.index(c) for c, _ in EXEMPLAR_SUBJECTS if c not in asked_c]
    bad_k = [KINDS.index(k) for _, k in EXEMPLAR_SUBJECTS if k not in asked_k]
    leak = np.isin(dec.colour, bad_c) | np.isin(dec.kind, bad_k)
    return float((leak & fg).sum() / fg.sum())


# ---------------------------------------------------------------- validation


def judge_check(shape: tuple[int, int, int], per_relation: int = 30, seed: int = 0) -> dict:
    """The judge on rendered ground truth of every relation, and on two negatives of the same
    clips: frames shuffled (a non-identity permutation that changes the clip) and subject 1 (the
    actor) frozen at its first position. -> accuracies, acceptances and `trustworthy`."""
    from .world import make_clip, random_pair, render

    rng = np.random.default_rng(seed)
    hits = {r: 0 for r in RELATIONS}
    shuffled = {r: 0 for r in RELATIONS}
    frozen = {r: 0 for r in RELATIONS}
    t = shape[0]
    for rel in RELATIONS:
        for _ in range(per_relation):
            s1, s2 = random_pair(rng)
            clip = make_clip(rel, s1, s2, rng, shape)
            hits[rel] += classify(clip.latents, s1, s2) == rel
            while True:
                perm = rng.permutation(t)
                if (perm != np.arange(t)).all() and not torch.equal(clip.latents[:, perm], clip.latents):
                    break
            shuffled[rel] += classify(clip.latents[:, perm], s1, s2) == rel
            still = np.repeat(clip.track1[:1], t, 0)
            z, _, _ = render(s1, s2, still, clip.track2, shape)
            frozen[rel] += classify(z, s1, s2) == rel
    n = per_relation
    acc = {r: hits[r] / n for r in RELATIONS}
    out = {
        "clips_per_relation": n,
        "ground_truth_accuracy": acc,
        "ground_truth_accuracy_mean": float(np.mean(list(acc.values()))),
        "shuffled_acceptance": {r: shuffled[r] / n for r in RELATIONS},
        "frozen_actor_acceptance": {r: frozen[r] / n for r in RELATIONS},
    }
    out["shuffled_acceptance_mean"] = float(np.mean(list(out["shuffled_acceptance"].values())))
    out["frozen_actor_acceptance_mean"] = float(np.mean(list(out["frozen_actor_acceptance"].values())))
    out["trustworthy"] = bool(min(acc.values()) >= 0.95 and max(out["shuffled_acceptance"].values()) <= 0.1
                              and max(out["frozen_actor_acceptance"].values()) <= 0.1)
    return out
