"""The exact judge of the ablation world (docs/ablation.md "The judge").

Reads a latent clip [12, T, h, w] back in two ways. Cell by cell (text alignment, leakage): a cell
is a subject's if its strongest colour channel and its strongest kind channel both exceed half the
rendering amplitude; its colour and kind are those argmaxes. Block by block (the relation): a
subject of colour c sits, on each frame, at the 2x2 block where channel c has the largest mean,
if that mean exceeds half the amplitude; faint speckles elsewhere do not move it. Subjects are told
apart by colour (the two subjects of a clip have different colours). The two subjects' block
tracks show the relation whose nearest true clip (from a bank of its program's clips) is within
TAU cells, or "none"; the distance itself grades clips that come near without being right.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .world import AMPLITUDE, BLOCK, COLOURS, EXEMPLAR_SUBJECTS, KINDS, RELATIONS, Subject, relation_tracks

MAX_STEP = 3.6  # cells per frame: faster than any program moves (smoothness)
# How near (cells, root mean square over frames of both subjects' position error) a clip's tracks must
# come to a true clip of a relation to show it. Ground truth with each subject one cell off on 2 of its
# 7 frames is 0.76 cells away; shuffled frames and a frozen actor do not come near (docs/ablation.md
# "The judge").
TAU = 1.0
DISTANCE_CAP = 6.0  # cells: a clip's relation distance is capped here; a missing subject counts as the cap
BANK_DRAWS = 40000  # draws of each program: enough to hold every clip the discrete programs can give (11 s, once)
BANK_SEED = 12345
JITTER_FRAMES = 2  # the check's jittered ground truth: frames on which each subject is one cell off


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


def _smooth(track: np.ndarray) -> bool:
    """No step of a [T, 2] track longer than MAX_STEP cells."""
    return bool((np.linalg.norm(np.diff(track, axis=0), axis=1) <= MAX_STEP).all())


@functools.lru_cache(maxsize=4)
def relation_bank(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per relation, the distinct integer track pairs [N, T, 4] (subject 1's row, column, then subject
    2's) its program gives in BANK_DRAWS draws: the world's own definition of the relation."""
    rng = np.random.default_rng(BANK_SEED)
    bank = {}
    for rel in RELATIONS:
        draws = [np.concatenate(relation_tracks(rel, rng, shape), 1) for _ in range(BANK_DRAWS)]
        bank[rel] = np.unique(np.stack(draws), axis=0).astype(float)
    return bank


def track_distances(p1: np.ndarray, p2: np.ndarray, shape: tuple[int, int, int]) -> dict[str, float]:
    """Per relation, the distance in cells from two tracks [T, 2] to the nearest true clip of it: the
    root mean square over frames of the two subjects' joint position error."""
    x = np.concatenate([p1, p2], 1)  # [T, 4]
    return {rel: float(np.sqrt(((b - x) ** 2).sum(2).mean(1)).min()) for rel, b in relation_bank(tuple(shape)).items()}


def classify_tracks(p1: np.ndarray, p2: np.ndarray, shape: tuple[int, int, int]) -> str:
    """The relation of two tracks [T, 2] (row, column): the one with the nearest true clip, if that is
    within TAU cells; else "none"."""
    d = track_distances(p1, p2, shape)
    rel = min(d, key=d.get)
    return rel if d[rel] <= TAU else "none"


def _tracks(scores: torch.Tensor, c1: int, c2: int) -> tuple[np.ndarray, np.ndarray] | None:
    p1, p2 = _block_track(scores[c1]), _block_track(scores[c2])
    if p1 is None or p2 is None:
        return None
    return p1, p2


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
    shape = tuple(latents.shape[1:])
    tracks = None
    if s1 is not None and s2 is not None:
        tracks = _tracks(scores, COLOURS.index(s1.colour), COLOURS.index(s2.colour))
    if tracks is not None:
        return classify_tracks(*tracks, shape)
    dom = _dominant_colours(scores)
    if len(dom) < 2:
        return "none"
    labels = []
    for c1, c2 in ((dom[0], dom[1]), (dom[1], dom[0])):
        tr = _tracks(scores, c1, c2)
        labels.append(classify_tracks(*tr, shape) if tr is not None else "none")
    known = [x for x in labels if x != "none"]
    return known[0] if known else "none"


def relation_distance(latents: torch.Tensor, s1: Subject, s2: Subject, relation: str) -> float:
    """Cells from the prompted subjects' tracks to the nearest true clip of `relation`, capped at
    DISTANCE_CAP (also the value when a subject is missing): how near a clip comes, right or not."""
    scores = block_scores(latents)
    tracks = _tracks(scores, COLOURS.index(s1.colour), COLOURS.index(s2.colour))
    if tracks is None:
        return DISTANCE_CAP
    return min(DISTANCE_CAP, track_distances(*tracks, tuple(latents.shape[1:]))[relation])


def smooth_tracks(latents: torch.Tensor, s1: Subject, s2: Subject) -> float:
    """Share of the two prompted subjects whose block track is whole (at most one frame missing)
    and smooth (no step above MAX_STEP): what a sampled clip must have before it can come near a
    true clip. It shows a base's progress while relation accuracy is still 0."""
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


def jitter(track: np.ndarray, rng: np.random.Generator, shape: tuple[int, int, int],
           frames: int = JITTER_FRAMES) -> np.ndarray:
    """A copy of a track [T, 2] with, on `frames` frames drawn at random, its row or column one cell
    off (kept on the grid): ground truth as a slightly imprecise model would draw it."""
    t, h, w = shape
    out = track.copy()
    for f in rng.choice(t, frames, replace=False):
        out[f, int(rng.integers(2))] += int(rng.choice([-1, 1]))
    out[:, 0] = out[:, 0].clip(0, h - BLOCK)
    out[:, 1] = out[:, 1].clip(0, w - BLOCK)
    return out


def judge_check(shape: tuple[int, int, int], per_relation: int = 30, seed: int = 0) -> dict:
    """The judge on rendered ground truth of every relation, on the same clips jittered (`jitter`),
    and on two negatives of them: frames shuffled (a non-identity permutation that changes the clip)
    and subject 1 (the actor) frozen at its first position. -> accuracies, acceptances and
    `trustworthy`."""
    from .world import make_clip, random_pair, render

    rng = np.random.default_rng(seed)
    jitter_rng = np.random.default_rng([seed, 1])  # its own stream: the other clips stay as they were
    hits = {r: 0 for r in RELATIONS}
    jittered = {r: 0 for r in RELATIONS}
    shuffled = {r: 0 for r in RELATIONS}
    frozen = {r: 0 for r in RELATIONS}
    t = shape[0]
    for rel in RELATIONS:
        for _ in range(per_relation):
            s1, s2 = random_pair(rng)
            clip = make_clip(rel, s1, s2, rng, shape)
            hits[rel] += classify(clip.latents, s1, s2) == rel
            z, _, _ = render(s1, s2, jitter(clip.track1, jitter_rng, shape), jitter(clip.track2, jitter_rng, shape), shape)
            jittered[rel] += classify(z, s1, s2) == rel
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
        "jittered_accuracy": {r: jittered[r] / n for r in RELATIONS},
        "shuffled_acceptance": {r: shuffled[r] / n for r in RELATIONS},
        "frozen_actor_acceptance": {r: frozen[r] / n for r in RELATIONS},
    }
    out["jittered_accuracy_mean"] = float(np.mean(list(out["jittered_accuracy"].values())))
    out["shuffled_acceptance_mean"] = float(np.mean(list(out["shuffled_acceptance"].values())))
    out["frozen_actor_acceptance_mean"] = float(np.mean(list(out["frozen_actor_acceptance"].values())))
    # jittered: a judge that only exact clips pass cannot grade a model's samples (docs/ablation.md
    # "The judge": the earlier rules passed far fewer)
    out["trustworthy"] = bool(min(acc.values()) >= 0.95 and min(out["jittered_accuracy"].values()) >= 0.8
                              and max(out["shuffled_acceptance"].values()) <= 0.1
                              and max(out["frozen_actor_acceptance"].values()) <= 0.1)
    return out
