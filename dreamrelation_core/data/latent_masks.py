"""Per-frame subject masks -> masks on the base model's latent grid (docs/method.md "Latent masks").

The frame-count rule and the compression factors are the base model's (its spec; Mochi's by
default: 8x spatial, frame 0 alone then groups of 6; Wan 2.1: 8x, groups of 4). Below in Mochi's numbers.

Latent mask of one subject:
- each frame's mask is brought to the latent grid (H/8 x W/8) *per frame*, as the reference does:
  nearest-neighbour resize, then every positive source pixel re-marks the latent cell at its
  scaled position (floor(y * h / H), floor(x * w / W)). A subject one pixel wide therefore
  always keeps at least one latent cell; when H and W are multiples of 8 the result equals an
  8x8 "any" pooling.
- latent frame 0 <- frame 0's cell mask; latent frame t >= 1 <- mean of the cell masks of frames
  1 + 6(t-1) ... 6t. Values are fractions of frames in [0, 1] (e.g. 0.5 where the subject
  covered a cell in 3 of the 6 frames). Doing the re-marking per frame before averaging (rather
  than averaging first) keeps these fractions exact counts of frames.
Relation mask = mask1 + mask2 (2 where the subjects overlap), as the reference adds them.

Which mask goes in: the source-resolution mask after the clip's crop, marked straight onto the
latent grid of the training size (`latent_mask(cropped, grid=(H // 8, W // 8))`), as the
reference does. Resizing it to the training size first and marking after loses the cells of thin
subjects that fall between the resize's samples (3-5 % of the cells on 1920x1080 masks).

A source pixel is "positive" by the one mask rule (`mask_files.as_bool_mask`): bool masks as they
are, finite numbers in [0, 1] where > 0.5; other values are refused.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base_models import get_spec
from ..basemodel import BaseModelSpec
from .mask_files import as_bool_mask


def _row_groups(n_src: int, n_dst: int) -> np.ndarray:
    """Start index of each destination cell's source rows, for floor(y * n_dst / n_src)."""
    owner = (np.arange(n_src) * n_dst) // n_src  # [n_src] destination cell of each source row
    # n_dst <= n_src, so every cell owns at least one source row: starts are strictly increasing.
    return np.searchsorted(owner, np.arange(n_dst), side="left")


def frame_cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[F, H, W] bool -> [F, h, w] bool on the latent grid: nearest resize OR re-marked pixels."""
    f, H, W = mask.shape
    h, w = grid
    # Re-marking: a cell is set when any source pixel maps into it (any-pooling over its rows/cols).
    rows = np.logical_or.reduceat(mask, _row_groups(H, h), axis=1)  # [F, h, W]
    cells = np.logical_or.reduceat(rows, _row_groups(W, w), axis=2)  # [F, h, w]
    # Nearest-neighbour samples source pixel floor(i * H / h); with H not a multiple of h that
    # pixel can sit in the previous cell's rows, so it is OR-ed in explicitly as the reference does.
    ys = (np.arange(h) * H) // h
    xs = (np.arange(w) * W) // w
    return cells | mask[:, ys][:, :, xs]


def _as_bool_stack(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        mask = mask.numpy() if mask.dtype == torch.bool else mask.float().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected per-frame masks of shape [F, H, W], got shape {tuple(mask.shape)}")
    return as_bool_mask(mask, "latent mask")


def latent_grid(size: tuple[int, int], spec: BaseModelSpec | None = None) -> tuple[int, int]:
    """Latent grid (h, w) of a training size (H, W): 8x smaller on Mochi."""
    return (spec or get_spec()).latent_grid(size)


def latent_mask(mask: torch.Tensor | np.ndarray, grid: tuple[int, int] | None = None,
                spec: BaseModelSpec | None = None) -> torch.Tensor:
    """[F, H, W] bool/float per-frame mask -> [T_lat, h, w] float32 in [0, 1].

    grid=None: the mask is at the training size and (h, w) = (H // 8, W // 8). With `grid`, the
    mask may have any resolution (the source-resolution mask after the crop) and is marked
    straight onto that grid, never smaller than the mask."""
    spec = spec or get_spec()
    s, group = spec.spatial_compression, spec.temporal_compression
    m = _as_bool_stack(mask)
    f, H, W = m.shape
    t = spec.latent_frame_count(f)  # raises unless f = 6k + 1 (Mochi)
    if grid is None:
        if H % s or W % s:
            raise ValueError(
                f"mask frames are {H}x{W} (HxW); the VAE grid needs both multiples of {s}"
            )
        grid = (H // s, W // s)
    if not (0 < grid[0] <= H and 0 < grid[1] <= W):
        raise ValueError(f"latent grid {grid[0]}x{grid[1]} (hxw) must be positive and no larger than the mask {H}x{W}")
    cells = frame_cells(m, (int(grid[0]), int(grid[1]))).astype(np.float32)
    first = cells[:1]  # [1, h, w]: the causal first frame stands alone
    rest = cells[1:].reshape(t - 1, group, *cells.shape[1:]).mean(axis=1)  # [T-1, h, w]
    return torch.from_numpy(np.concatenate([first, rest], axis=0))


def relation_mask(mask1: torch.Tensor, mask2: torch.Tensor) -> torch.Tensor:
    """Relation mask of two latent masks: their sum (2 where both subjects are present)."""
    if mask1.shape != mask2.shape:
        raise ValueError(f"latent masks differ in shape: {tuple(mask1.shape)} vs {tuple(mask2.shape)}")
    return mask1 + mask2
