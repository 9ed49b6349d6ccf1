"""The synthetic world of the ablation study (docs/ablation.md "The world").

Two subjects, each a kind and a colour, move by a relation program on Mochi's latent grid
[12, T, h, w]. Rendering is straight on the latent grid, with a fixed code: a subject is a 2x2
block of cells whose 12 channels hold its colour one-hot (channels 0-5) and its kind one-hot
(channels 6-11), times AMPLITUDE; the background is 0. Masks are the exact cell sets, on the
latent grid as the trainer takes them. A 2x2 block is one patch of the transformer when aligned,
so one subject covers one to four tokens.

Positions are the top-left cell (row, column) of a subject's block; programs move them as floats
that are rounded to cells when rendered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("square", "circle", "triangle", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
RELATIONS = ("approach_touch", "move_apart", "pass_by", "follow", "circle_around", "jump_over")
PHRASES = {
    "approach_touch": "approaches and touches",
    "move_apart": "moves away from",
    "pass_by": "passes by",
    "follow": "follows",
    "circle_around": "circles around",
    "jump_over": "jumps over",
}
# Channel value of a subject's colour and kind; the background is 0. Large because the subjects are
# sparse: at 1.5 the clips' variance was 0.023 against the unit-variance noise of flow matching, and
# a base pretrained on them predicted background at every noise level above 0.5 (docs/ablation.md).
AMPLITUDE = 4.0
BLOCK = 2  # a subject is BLOCK x BLOCK latent cells
CHANNELS = 12  # Mochi's latent channels: 6 for the colour, 6 for the kind
# The exemplars' fixed subjects; generation asks for kinds and colours none of them have.
EXEMPLAR_SUBJECTS = (("red", "square"), ("blue", "circle"))


@dataclass(frozen=True)
class Subject:
    colour: str
    kind: str

    def words(self) -> str:
        return f"{self.colour} {self.kind}"


def caption(s1: Subject, relation: str, s2: Subject) -> str:
    return f"a {s1.words()} {PHRASES[relation]} a {s2.words()}"


def vocabulary() -> list[str]:
    """Every word a caption can hold (for the world's word-level tokenizer)."""
    words = ["a"] + list(COLOURS) + list(KINDS)
    for p in PHRASES.values():
        words += [w for w in p.split() if w not in words]
    return words


# ---------------------------------------------------------------- relation programs
# Each returns two float position tracks [T, 2] (row, column) for subject 1 (the actor) and 2.


def _lin(a: float, b: float, n: int, until: int | None = None) -> np.ndarray:
    """n values from a to b linearly, reaching b at index `until` (default n - 1) and staying."""
    until = n - 1 if until is None else until
    s = np.clip(np.arange(n) / max(1, until), 0.0, 1.0)
    return a + (b - a) * s


def _mirror(p1: np.ndarray, p2: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    q1, q2 = p1.copy(), p2.copy()
    q1[:, 1] = w - BLOCK - q1[:, 1]
    q2[:, 1] = w - BLOCK - q2[:, 1]
    return q1, q2


def _approach(rng: np.random.Generator, t: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    r1 = int(rng.integers(0, h - BLOCK + 1))
    r2 = int(np.clip(r1 + rng.integers(-1, 2), 0, h - BLOCK))
    c1 = float(rng.integers(0, 3))
    c2 = float(rng.integers(w - BLOCK - 2, w - BLOCK + 1))
    meet = float(rng.integers(int(c1) + 3, int(c2) - BLOCK - 2))  # subject 1's last column
    touch = t - 1 - int(rng.integers(0, 2))  # contact from this frame on
    p1 = np.stack([np.full(t, r1, float), _lin(c1, meet, t, touch)], 1)
    p2 = np.stack([np.full(t, r2, float), _lin(c2, meet + BLOCK, t, touch)], 1)
    return _mirror(p1, p2, w) if rng.random() < 0.5 else (p1, p2)


def _apart(rng, t, h, w):
    p1, p2 = _approach(rng, t, h, w)
    return p1[::-1].copy(), p2[::-1].copy()


def _pass_by(rng, t, h, w):
    r1 = int(rng.integers(0, h - BLOCK + 1))
    choices = [r for r in range(h - BLOCK + 1) if abs(r - r1) >= 3]
    r2 = int(rng.choice(choices))
    p1 = np.stack([np.full(t, r1, float), _lin(rng.integers(0, 3), rng.integers(w - BLOCK - 2, w - BLOCK + 1), t)], 1)
    p2 = np.stack([np.full(t, r2, float), _lin(rng.integers(w - BLOCK - 2, w - BLOCK + 1), rng.integers(0, 3), t)], 1)
    return _mirror(p1, p2, w) if rng.random() < 0.5 else (p1, p2)


def _follow(rng, t, h, w):
    r1 = int(rng.integers(0, h - BLOCK + 1))
    r2 = int(np.clip(r1 + rng.integers(-1, 2), 0, h - BLOCK))
    gap = int(rng.integers(3, 6))
    c0 = int(rng.integers(0, 2))
    dist = int(rng.integers(5, w - BLOCK - gap - c0 + 1))
    p1 = np.stack([np.full(t, r1, float), _lin(c0, c0 + dist, t)], 1)
    p2 = np.stack([np.full(t, r2, float), _lin(c0 + gap, c0 + gap + dist, t)], 1)
    return _mirror(p1, p2, w) if rng.random() < 0.5 else (p1, p2)


def _circle(rng, t, h, w):
    r2 = (h - BLOCK) / 2
    c2 = float(rng.integers(4, w - BLOCK - 3))
    radius = 3.2
    theta0 = rng.uniform(0, 2 * math.pi)
    sweep = math.radians(rng.uniform(250, 300)) * (1 if rng.random() < 0.5 else -1)
    th = theta0 + sweep * np.arange(t) / (t - 1)
    p1 = np.stack([r2 + radius * np.sin(th), c2 + radius * np.cos(th)], 1)
    p1[:, 0] = np.clip(p1[:, 0], 0, h - BLOCK)
    p1[:, 1] = np.clip(p1[:, 1], 0, w - BLOCK)
    p2 = np.tile([r2, c2], (t, 1)).astype(float)
    return p1, p2


def _jump(rng, t, h, w):
    r2 = int(rng.integers(3, h - BLOCK + 1))
    c2 = int(rng.integers(5, w - BLOCK - 4))
    before, after = int(rng.integers(4, 6)), int(rng.integers(4, 6))
    cols = _lin(max(0, c2 - before), min(w - BLOCK, c2 + after), t)
    rows = r2 - 3.0 * np.sin(math.pi * np.arange(t) / (t - 1))
    p1 = np.stack([rows, cols], 1)
    p2 = np.tile([r2, c2], (t, 1)).astype(float)
    return _mirror(p1, p2, w) if rng.random() < 0.5 else (p1, p2)


PROGRAMS = {
    "approach_touch": _approach, "move_apart": _apart, "pass_by": _pass_by, "follow": _follow,
    "circle_around": _circle, "jump_over": _jump,
}


def relation_tracks(relation: str, rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Integer cell tracks [T, 2] (row, column) of subject 1 and subject 2 for one clip."""
    t, h, w = shape
    p1, p2 = PROGRAMS[relation](rng, t, h, w)
    clip = np.array([h - BLOCK, w - BLOCK])
    # floor(x + 0.5), not rint: rint rounds halves to even, which breaks constant gaps between tracks
    return (np.clip(np.floor(p1 + 0.5), 0, clip).astype(int), np.clip(np.floor(p2 + 0.5), 0, clip).astype(int))


# ---------------------------------------------------------------- rendering


def subject_code(s: Subject) -> torch.Tensor:
    """[12]: the subject's channel values (colour one-hot, then kind one-hot, times AMPLITUDE)."""
    v = torch.zeros(CHANNELS)
    v[COLOURS.index(s.colour)] = AMPLITUDE
    v[len(COLOURS) + KINDS.index(s.kind)] = AMPLITUDE
    return v


def block_masks(track: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """[T, h, w] float 0/1: the cells of a subject's block on every frame."""
    t, h, w = shape
    m = torch.zeros(t, h, w)
    for f, (r, c) in enumerate(track):
        m[f, r:r + BLOCK, c:c + BLOCK] = 1.0
    return m


def render(s1: Subject, s2: Subject, track1: np.ndarray, track2: np.ndarray,
           shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> latents [12, T, h, w], mask1, mask2 [T, h, w]. Subject 1 is drawn last (on top)."""
    m1, m2 = block_masks(track1, shape), block_masks(track2, shape)
    z = m2[None] * subject_code(s2)[:, None, None, None]  # [12, T, h, w]
    z = torch.where(m1[None] > 0, subject_code(s1)[:, None, None, None].expand_as(z), z)
    return z, m1, m2


@dataclass
class WorldClip:
    """One clip of the world; fits the trainer's Clip protocol once y_feat / y_mask are set."""

    name: str
    relation: str
    subject1: Subject
    subject2: Subject
    track1: np.ndarray  # [T, 2]
    track2: np.ndarray
    latents: torch.Tensor  # [12, T, h, w]
    mask1: torch.Tensor  # [T, h, w]
    mask2: torch.Tensor
    y_feat: torch.Tensor | None = None  # [L, D]
    y_mask: torch.Tensor | None = None  # [L] bool

    @property
    def caption(self) -> str:
        return caption(self.subject1, self.relation, self.subject2)

    def sample_latents(self, generator: torch.Generator) -> torch.Tensor:
        return self.latents.clone()  # the world's latents are exact: nothing to sample


def layout_rng(relation: str, k: int, seed: int = 0) -> np.random.Generator:
    """The generator of layout k of a relation: a world with a few layouts per relation draws every
    clip's positions, speeds and direction from one of these (the subjects stay free)."""
    return np.random.default_rng([seed, RELATIONS.index(relation), k])


def make_clip(relation: str, s1: Subject, s2: Subject, rng: np.random.Generator, shape: tuple[int, int, int],
              name: str = "", layouts: int = 0) -> WorldClip:
    """One clip; with `layouts` > 0 its motion is one of that many fixed layouts of the relation
    (drawn with rng), else a fresh random one."""
    pos_rng = layout_rng(relation, int(rng.integers(layouts))) if layouts else rng
    t1, t2 = relation_tracks(relation, pos_rng, shape)
    z, m1, m2 = render(s1, s2, t1, t2, shape)
    return WorldClip(name or relation, relation, s1, s2, t1, t2, z, m1, m2)


def random_pair(rng: np.random.Generator, colours=COLOURS, kinds=KINDS) -> tuple[Subject, Subject]:
    """Two subjects with different colours and different kinds (so each is told apart by either)."""
    c = rng.choice(len(colours), 2, replace=False)
    k = rng.choice(len(kinds), 2, replace=False)
    return Subject(colours[c[0]], kinds[k[0]]), Subject(colours[c[1]], kinds[k[1]])


def new_pairs(n: int) -> list[tuple[Subject, Subject]]:
    """n fixed subject pairs whose kinds and colours all differ from the exemplars' subjects."""
    used_c = {c for c, _ in EXEMPLAR_SUBJECTS}
    used_k = {k for _, k in EXEMPLAR_SUBJECTS}
    colours = [c for c in COLOURS if c not in used_c]
    kinds = [k for k in KINDS if k not in used_k]
    pairs = []
    for i in range(len(colours) * len(kinds)):
        c1, k1 = colours[i % len(colours)], kinds[(i // len(colours)) % len(kinds)]
        c2, k2 = colours[(i + 1) % len(colours)], kinds[(i // len(colours) + 1) % len(kinds)]
        pairs.append((Subject(c1, k1), Subject(c2, k2)))
    return pairs[:n]


def exemplars(relation: str, n: int, shape: tuple[int, int, int], seed: int, layouts: int = 0) -> list[WorldClip]:
    """n clips of `relation` between the fixed exemplar subjects, positions drawn from `seed` (with
    `layouts` > 0: exemplar i shows layout i mod layouts of the relation, so all of them appear)."""
    rng = np.random.default_rng(seed)
    s1, s2 = (Subject(c, k) for c, k in EXEMPLAR_SUBJECTS)
    if not layouts:
        return [make_clip(relation, s1, s2, rng, shape, f"exemplar{i}") for i in range(n)]
    out = []
    for i in range(n):
        t1, t2 = relation_tracks(relation, layout_rng(relation, i % layouts), shape)
        z, m1, m2 = render(s1, s2, t1, t2, shape)
        out.append(WorldClip(f"exemplar{i}", relation, s1, s2, t1, t2, z, m1, m2))
    return out
