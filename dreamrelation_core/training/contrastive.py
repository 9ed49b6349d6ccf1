"""Space-time relational contrastive loss (RCL) with its two FIFO memory banks (docs/method.md
"Relational contrastive loss").

From a model output pred [B, C, T, h, w]:
  s_t = mean over (h, w)         -> single-frame features  [B, T, C]
  a_t = s_{t+1} - s_t            -> relational anchors     [B, T-1, C]
Each anchor is pulled towards anchors of earlier steps at the same index (positive bank) and
pushed away from single-frame features (the current T, detached earlier ones from the negative
bank): multi-positive InfoNCE with cosine similarity and temperature tau.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def frame_features(pred: torch.Tensor) -> torch.Tensor:
    """[B, C, T, h, w] -> [B, T, C]."""
    if pred.ndim != 5:
        raise ValueError(f"expected a model output [B, C, T, h, w], got shape {tuple(pred.shape)}")
    return pred.float().mean(dim=(3, 4)).transpose(1, 2)


def relational_features(s: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, T-1, C]: differences of consecutive frames."""
    return s[:, 1:] - s[:, :-1]


def multi_positive_info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over anchors of -log(sum_pos e^{sim/tau} / sum_{pos+neg} e^{sim/tau}).

    anchors [N, C]; positives [N, P, C]; negatives [N, M, C]; sim = cosine similarity.
    """
    a = F.normalize(anchors, dim=-1).unsqueeze(1)  # [N, 1, C]
    pos = (a * F.normalize(positives, dim=-1)).sum(-1) / temperature  # [N, P]
    neg = (a * F.normalize(negatives, dim=-1)).sum(-1) / temperature  # [N, M]
    return (torch.logsumexp(torch.cat([pos, neg], 1), 1) - torch.logsumexp(pos, 1)).mean()


class MemoryBank:
    """FIFO of detached tensors of one shape; the oldest entry leaves when a new one comes in full."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"memory bank size must be >= 1, got {size}")
        self.size = size
        self.entries: deque[torch.Tensor] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, items: torch.Tensor) -> None:
        """Push each item along dim 0 (oldest first)."""
        for x in items.detach().float().cpu():
            self.entries.append(x.clone())

    def compatible(self, shape: torch.Size) -> list[int]:
        """Indices of entries with the given shape (clips of another length are never mixed)."""
        return [i for i, e in enumerate(self.entries) if e.shape == shape]

    def state_dict(self) -> dict:
        return {"size": self.size, "entries": [e.clone() for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.entries = deque((e.clone() for e in state["entries"]), maxlen=self.size)


@dataclass
class RCLSettings:
    positive_bank_size: int = 10
    negative_bank_size: int = 64
    positives_per_anchor: int = 4
    negatives: int = 10
    temperature: float = 0.07


class RelationalContrastiveLoss:
    """RCL with its banks. Call `loss(pred, generator)` then `update(pred)` once per step."""

    def __init__(self, settings: RCLSettings | None = None):
        self.settings = settings or RCLSettings()
        self.positive_bank = MemoryBank(self.settings.positive_bank_size)  # entries [T-1, C]
        self.negative_bank = MemoryBank(self.settings.negative_bank_size)  # entries [C]

    def loss(self, pred: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """RCL of pred [B, C, T, h, w]; None while the positive bank holds nothing usable."""
        return self.loss_of_features(frame_features(pred), generator)

    def loss_of_features(self, s: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """RCL of single-frame features s [B, T, C] (`frame_features`): what data-parallel training
        gathers over processes, so that every process computes the whole batch's loss."""
        anchors = relational_features(s)  # [B, T-1, C]
        b, n, c = anchors.shape
        usable = self.positive_bank.compatible(anchors.shape[1:])
        if not usable or n == 0:
            return None
        k = min(self.settings.positives_per_anchor, len(usable))
        bank = torch.stack([self.positive_bank.entries[i] for i in usable]).to(s.device)  # [P, T-1, C]
        t = s.shape[1]
        extra = max(self.settings.negatives - t, 0)
        neg_pool = list(self.negative_bank.entries)
        extra = min(extra, len(neg_pool))
        neg_bank = torch.stack(neg_pool).to(s.device) if extra else None  # [Nn, C]
        losses = []
        for i in range(b):
            # anchors visited in random order: the order decides which draws each one gets
            order = torch.randperm(n, generator=generator)
            pos_idx = torch.stack([torch.randperm(len(usable), generator=generator)[:k] for _ in range(n)])  # [n, k]
            pos = bank[pos_idx, order.unsqueeze(1)]  # [n, k, C]: entries at each anchor's own index
            neg = s[i].unsqueeze(0).expand(n, t, c)  # [n, T, C] current frames, not detached
            if neg_bank is not None:
                draw = torch.stack([torch.randperm(len(neg_pool), generator=generator)[:extra] for _ in range(n)])
                neg = torch.cat([neg, neg_bank[draw]], 1)  # [n, T + extra, C]
            losses.append(multi_positive_info_nce(anchors[i, order], pos, neg, self.settings.temperature))
        return torch.stack(losses).mean()

    def update(self, pred: torch.Tensor) -> None:
        """Push this step's detached anchors (one positive entry per sample) and frame features."""
        self.update_features(frame_features(pred.detach()))

    def update_features(self, s: torch.Tensor) -> None:
        """`update` from single-frame features s [B, T, C]."""
        s = s.detach()
        self.positive_bank.push(relational_features(s))
        self.negative_bank.push(s.reshape(-1, s.shape[-1]))

    def state_dict(self) -> dict:
        return {"positive": self.positive_bank.state_dict(), "negative": self.negative_bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.positive_bank.load_state_dict(state["positive"])
        self.negative_bank.load_state_dict(state["negative"])
