"""The one progress bar of every long command: prepare, masks, train / resume / demo, evaluate, analyze."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Update = Callable[..., None]  # update(done=None, total=None, label="")


def progress_bar(desc: str, unit: str, total: int | None = None, start: int = 0,
                 quiet: bool = False) -> tuple[Any, Update]:
    """(tqdm bar, `update(done=None, total=None, label="")`).

    `done` moves the bar to that count (None: one step on), `total` sets its length when the work
    learns it, `label` is shown after the counts. Positional calls fit the library's
    `(done, total, name)` progress callbacks. Close the bar when the work returns."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True, disable=quiet)

    def update(done: int | None = None, total: int | None = None, label: str = "") -> None:
        if total is not None and total != bar.total:
            bar.total = total
        bar.update(1 if done is None else done - bar.n)
        if label:
            bar.set_postfix_str(label)

    return bar, update


def say(text: str) -> None:
    """Print a line above the running bar (a plain print would tear it)."""
    from tqdm.auto import tqdm

    tqdm.write(text)


def training_bar(total: int, start: int = 0) -> tuple[Any, Callable[[Any], None]]:
    """(tqdm bar, callback for Trainer.train's `progress`): steps done, branch and loss terms.

    Close the bar when training returns."""
    bar, update = progress_bar("train", "step", total, start)

    def on_step(info) -> None:  # a training.trainer.StepInfo
        l = info.losses
        update(info.step, label=f"{info.branch:8s} total {l['total']:.4f} mse {l['mse']:.4f} "
                                f"masked {l['masked']:.4f} rcl {l['rcl']:.3f} lr {info.lr:.2e}")

    return bar, on_step
