"""The training progress bar shared by the `train`, `resume` and `demo` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def training_bar(total: int, start: int = 0) -> tuple[Any, Callable[[Any], None]]:
    """(tqdm bar, callback for Trainer.train's `progress`): steps done, branch and loss terms.

    Close the bar when training returns."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(info) -> None:  # a training.trainer.StepInfo
        bar.update(info.step - bar.n)
        l = info.losses
        bar.set_postfix_str(
            f"{info.branch:8s} total {l['total']:.4f} mse {l['mse']:.4f} masked {l['masked']:.4f} "
            f"rcl {l['rcl']:.3f} lr {info.lr:.2e}"
        )

    return bar, update
