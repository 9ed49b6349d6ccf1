"""Out of GPU memory at the first step: step down the memory ladder and try again.

`execute_with_fallback(plan, ...)` carries out a run plan like `runs.execute`. When the first
step of this session (or the model's setup on the device) runs out of GPU memory, it frees what
the attempt held, moves one rung down `memory.policy`'s LADDER (changing only the memory options
the request left on 'auto') and starts again from the last good state: the run's start for a new
run (nothing of the failed attempt is kept), its last checkpoint for a resumed one. Each retry is
reported (`on_retry`) and the options that finally ran are saved with the run's checkpoints. At
the bottom of the ladder, with every option fixed by the user, or for an out-of-memory after the
first step, it stops with a TrainingError that names the options and what is left to lower.

Test seam: the environment variable DREAMRELATION_TEST_OOM_ATTEMPTS=N makes the first N
attempts fail with torch.OutOfMemoryError just before their first step, so that the ladder can
be walked on a CPU (docs/method.md "Memory fallback").
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import TrainingError
from .memory.policy import Choice, memory_advice, next_rung, user_fixed, with_memory_options
from .memory.setup import MemoryOptions
from .runs import Progress, RunPlan, execute
from .trainer import Clip, TrainResult

OOM_SEAM_ENV = "DREAMRELATION_TEST_OOM_ATTEMPTS"


def is_out_of_memory(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _injected_oom(should_cancel: Callable[[], bool] | None, attempt: int) -> Callable[[], bool] | None:
    """The test seam (module docstring): `should_cancel` is asked just before each step."""
    try:
        failing = int(os.environ.get(OOM_SEAM_ENV, "0") or 0)
    except ValueError:
        failing = 0
    if attempt >= failing:
        return should_cancel

    def cancel() -> bool:
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_SEAM_ENV} for attempt {attempt + 1})")

    return cancel


def _release_device_memory() -> None:
    """What a failed attempt held goes back to the device (its frames are gone by now)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_message(e_line: str, step: int, choice: Choice | None, fixed: set[str],
                          tried: Sequence[str] = ()) -> str:
    """One line: where it ran out, with which options, what was tried, what is left to lower."""
    opts = choice.options if choice is not None else None
    text = f"out of GPU memory at step {step}"
    if opts is not None:
        text += f" with {opts.label()}"
    if tried:
        text += f" at the bottom of the memory ladder (tried: {'; '.join(tried)})"
    advice = memory_advice(opts, fixed, choice.blocks if choice is not None else 0)
    return f"{text}: {advice}. [{e_line}]"


def execute_with_fallback(
    plan: RunPlan,
    clips: Sequence[Clip] | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[Any], None] | None = None,
    on_memory: Callable[[Choice], None] | None = None,
    on_retry: Callable[[str, MemoryOptions], None] | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """`runs.execute(plan)` with the memory fallback of the module docstring. The model is loaded
    from `plan.config.transformer` for every attempt (a failed attempt's model is set up for the
    device and cannot be reused)."""
    fixed = user_fixed(plan.config)
    tried: list[str] = []
    attempt = 0
    state: dict[str, Any] = {}  # of the attempt in progress

    def memory(choice: Choice) -> None:
        state["choice"] = choice
        if on_memory is not None:
            on_memory(choice)

    def stepped(info) -> None:
        state["stepped"] = True
        if progress is not None:
            progress(info)

    while True:
        state.update(choice=None, stepped=False)
        try:
            return execute(plan, clips=clips, progress=stepped, should_cancel=_injected_oom(should_cancel, attempt),
                           on_checkpoint=on_checkpoint, max_steps=max_steps, on_memory=memory)
        except BaseException as e:  # noqa: B036 - only an out-of-memory is handled; the rest goes on
            if not is_out_of_memory(e) or state["choice"] is None:
                raise
            line, choice, at = first_line(e), state["choice"], plan.step + 1
            if state["stepped"]:  # it ran before: the ladder is for the first step only
                raise TrainingError(out_of_memory_message(line, at, choice, fixed) + " (after the first step)") from e
        _release_device_memory()  # the exception and its frames are gone: the attempt's tensors with them
        rung = next_rung(choice.options, fixed, choice.blocks)
        if rung is None:
            raise TrainingError(out_of_memory_message(line, at, choice, fixed, tried))
        options, what = rung
        tried.append(what)
        if on_retry is not None:
            on_retry(f"Out of GPU memory at step {at} with {choice.options.label()}: retrying with {what} "
                     f"({options.label()}), from the {'last checkpoint' if plan.checkpoint else 'start'}.", options)
        plan = dataclasses.replace(plan, config=with_memory_options(plan.config, options))
        attempt += 1
