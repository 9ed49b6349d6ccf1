"""A run folder and what `train` does with it: new run, resume, or "already finished" - and says so.

`plan_run(config, resume)` decides from the run folder (`config.output_dir`) alone, before any
model is loaded:
- no checkpoint there: a new run (with `resume` on the report says that no run was found);
- a run there and `resume` off: refused (`overwrite` starts over instead);
- a run there and `resume` on: the new settings are compared with the saved run's. Settings
  that only change how the rest of the run is carried out are applied and reported
  (APPLIED_ON_RESUME: num_steps, checkpoint_every, ...); any other difference - rank, alpha,
  learning rate, seed, the data, the base model, ... - refuses the resume with one message
  listing every differing field with its saved and its new value;
- a run that already reached num_steps: "already finished at step N" with its LoRA files, and
  nothing is trained.

The newest checkpoint that cannot be read (truncated, garbage) is skipped: the plan walks back to
the newest readable one, says which file it skipped, and `execute` keeps the skipped file aside
as `<name>.broken` (renamed, never deleted). `overwrite` never reads the old checkpoints. Files in
`checkpoints/` with other names are ignored, with a note.

`run_training(config, ...)` is the one way the CLI (`train`, `train --resume`, `resume`) and the
worker run a request: under the run folder's lock (training.lock) it removes temporary files of
killed writes, plans, reports the plan, and executes it.

`execute(plan)` carries it out. A run that fails (or is cancelled) before its first checkpoint
leaves nothing behind: what it created in the run folder is removed again.

Under torchrun (several processes) rank 0 alone runs `run_training` (lock, plan, files); it hands
the plan, and a resumed run's checkpoint state, to the other processes (`Handoff`, broadcast: no
shared file system needed), which train the same steps with `execute_follower` and write nothing.

The identity of the data (the prepared cache's clips and their source fingerprints) and of the
base model file are stored in `run.json` when a run starts, so a resume with a re-prepared
dataset under the same folder name is noticed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..fileio import human_size, remove_stale_temps, write_text
from . import distributed
from .config import TrainConfig
from .lock import RunLock, holds_lock
from .protocol import HISTORY_FILE, Action, Status, write_history
from .trainer import (
    BROKEN_SUFFIX,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    RELATION_FILE,
    TRIPLET_FILE,
    Clip,
    StepInfo,
    Trainer,
    TrainResult,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    unexpected_files,
)

log = logging.getLogger("dreamrelation")

RUN_INFO = "run.json"

# Settings a resumed run takes from the new request, with what the change means. Everything else
# must match the saved run. (Memory-only options belong here too: they do not change the result.)
APPLIED_ON_RESUME: dict[str, str] = {
    "num_steps": "the run continues to the new step count; the cosine learning-rate decay now ends there",
    "checkpoint_every": "checkpoints from now on at the new interval",
    "keep_checkpoints": "older checkpoints are pruned to the new count",
    "save_dtype": "LoRA files are written in the new dtype",
    "device": "training continues on the new device",
    "gradient_checkpointing": "memory/speed only; the result is the same",
    "blocks_to_swap": "memory/speed only; the result is the same",
    "offload_activations": "memory/speed only; the result is the same",
    "shard_base": "memory/speed only; the result is the same",
    "base_dtype": "the frozen base weights are stored in the new precision from now on",
}
# Compared through run.json (content identity) instead of by path; by path where run.json is missing.
_BY_IDENTITY = {"cache_dir": "data", "transformer": "transformer"}
_NOT_COMPARED = ("output_dir",)  # the run folder is the run's name

Progress = Callable[[StepInfo], None]


@dataclass(frozen=True)
class SettingChange:
    field: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: saved {self.saved!r}, new {self.new!r}"


@dataclass
class RunPlan:
    """What a training request will do with its run folder (see module docstring)."""

    action: str  # one of protocol.ACTIONS: Action.NEW, Action.RESUME, Action.FINISHED
    run_dir: Path
    config: TrainConfig  # the settings the run uses: the saved ones plus the applied changes
    step: int  # the step training starts from (the saved step when resuming or finished)
    checkpoint: Path | None  # the checkpoint resumed from
    identity: dict[str, str]  # data and base-model identity, stored in run.json
    applied: list[SettingChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    overwrite: bool = False  # a new run replacing an existing one
    history: list[dict[str, Any]] = field(default_factory=list)  # the saved run's (finished runs)
    skipped: list[Path] = field(default_factory=list)  # newer unreadable checkpoints, set aside by execute

    def report(self) -> str:
        return " ".join(self.notes)

    @property
    def lora_paths(self) -> tuple[Path, Path]:
        return self.run_dir / TRIPLET_FILE, self.run_dir / RELATION_FILE


# ---------------------------------------------------------------------------------------------
# identities


def _short_hash(parts: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_identity(cache_dir: str | os.PathLike) -> str:
    """'<n> clip(s) #<hash>' of a prepared cache: its clip files and their source fingerprints
    (prepare stores one per clip: sources, settings, encoders), file sizes where there is none."""
    from safetensors import safe_open

    cache_dir = Path(cache_dir)
    files = sorted(cache_dir.glob("*.safetensors")) if cache_dir.is_dir() else []
    if not files:
        return f"no prepared clips in {cache_dir}"
    parts = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                meta = sf.metadata() or {}
        except Exception:  # unreadable: the trainer will say so; identity by size
            meta = {}
        parts.append((f.name, meta.get("fingerprint") or f.stat().st_size))
    return f"{len(files)} clip(s) #{_short_hash(parts)}"


def clips_identity(clips: Sequence[Clip]) -> str:
    """Identity of in-memory clips: names, shapes and the values of their tensors."""
    h = hashlib.sha256()
    for c in clips:
        h.update(str(getattr(c, "name", "?")).encode())
        for name in ("mean", "logvar", "y_feat", "y_mask", "mask1", "mask2"):
            t = getattr(c, name, None)
            if isinstance(t, torch.Tensor):
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(t.detach().cpu().to(torch.float32).numpy().tobytes())
    return f"{len(clips)} clip(s) #{h.hexdigest()[:12]}"


def transformer_identity(source: str) -> str:
    """A base-model file by name and size (so a moved ComfyUI folder still matches), else the path."""
    p = Path(source)
    if p.is_file():
        return f"{p.name} ({p.stat().st_size} bytes)"
    return source


def run_identity(config: TrainConfig, clips: Sequence[Clip] | None = None) -> dict[str, str]:
    data = clips_identity(clips) if clips is not None else dataset_identity(config.cache_dir)
    return {"data": data, "transformer": transformer_identity(config.transformer)}


# ---------------------------------------------------------------------------------------------
# planning


def _saved_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's config, step and history; tensors memory-mapped, not read."""
    try:
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = load_checkpoint(ckpt)  # raises a TrainingError naming the file
    if not isinstance(state, dict) or state.get("format") != "dreamrelation.checkpoint":
        raise TrainingError(f"{ckpt}: not a DreamRelation training checkpoint")
    try:
        return {"config": dict(state["config"]), "step": int(state["step"]),
                "history": list(state.get("history", []))}
    except (KeyError, TypeError, ValueError) as e:
        raise TrainingError(f"{ckpt}: a training checkpoint without a readable config / step ({e!r})") from e


def newest_readable(run_dir: Path, checkpoint: Path | None = None) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """The newest checkpoint that can be read (or `checkpoint`), its saved state, and the newer
    ones skipped as unreadable with the reason. TrainingError when none can be read."""
    if checkpoint is not None:
        return checkpoint, _saved_state(checkpoint), []
    ckpts = list_checkpoints(run_dir)
    skipped: list[tuple[Path, str]] = []
    for c in reversed(ckpts):
        try:
            return c, _saved_state(c), skipped
        except TrainingError as e:
            skipped.append((c, str(e)))
    raise TrainingError(
        f"{run_dir}: none of its {len(ckpts)} checkpoint(s) can be read - " + "; ".join(r for _, r in skipped)
        + ". Start over with overwrite (CLI: train --overwrite), or choose another run name"
    )


def saved_config(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> TrainConfig:
    """The settings of the run in `run_dir` (from its newest readable checkpoint, or `checkpoint`),
    with output_dir pointing at the folder: what `resume DIR` continues with."""
    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is None and not list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir / CHECKPOINT_DIR}: no checkpoint_<step>.pt to resume from")
    path, state, _ = newest_readable(run_dir, ckpt)
    config = TrainConfig.from_dict(state["config"], source=str(path))
    config.output_dir = str(run_dir)
    return config


def _read_identity(run_dir: Path) -> tuple[dict[str, str] | None, str | None]:
    """run.json's identity, and a note when it is missing or malformed (then the data and the
    base model are compared by path instead of by content: the explicit fallback)."""
    path = run_dir / RUN_INFO
    fallback = "the data (cache_dir) and base model (transformer) are compared by path instead of by content"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} is missing: {fallback}."
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e}): {fallback}; it is written again."
    identity = data.get("identity") if isinstance(data, dict) else None
    if not (isinstance(identity, dict) and identity and all(isinstance(k, str) and isinstance(v, str)
                                                            for k, v in identity.items())):
        return None, (f"{path} has no valid identity (expected {{\"identity\": {{\"data\": ..., \"transformer\": "
                      f"...}}}}, found {json.dumps(data)[:120]}): {fallback}; it is written again.")
    return identity, None


def compare_settings(
    saved: TrainConfig, new: TrainConfig, saved_identity: dict[str, str] | None, new_identity: dict[str, str]
) -> list[SettingChange]:
    """Every setting in which `new` differs from `saved` (identity-compared fields by content)."""
    changes: list[SettingChange] = []
    a, b = saved.to_dict(), new.to_dict()
    for name in a:
        if name in _NOT_COMPARED or (name in _BY_IDENTITY and saved_identity is not None):
            continue
        if a[name] != b[name]:
            changes.append(SettingChange(name, a[name], b[name]))
    if saved_identity is not None:
        for key in _BY_IDENTITY.values():
            if key in saved_identity and saved_identity[key] != new_identity.get(key):
                changes.append(SettingChange(key, saved_identity[key], new_identity.get(key)))
    return changes


def plan_run(
    config: TrainConfig, resume: bool, overwrite: bool = False, clips: Sequence[Clip] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> RunPlan:
    """Decide what training `config` does with its run folder (module docstring). Reads files only.

    Raises TrainingError when a run exists and `resume` is off, when the new settings differ
    from the saved run in fields that cannot change mid-run (all listed), and when num_steps is
    below the step the run already reached."""
    run_dir = Path(config.output_dir)
    identity = run_identity(config, clips)
    ckpts = list_checkpoints(run_dir)
    notes = _unexpected_note(run_dir)
    if not ckpts:
        note = (f"No run found at {run_dir}: starting a new run." if resume
                else f"Starting a new run in {run_dir}.")
        return RunPlan(Action.NEW, run_dir, config, 0, None, identity, notes=[note, *notes])
    if overwrite:  # the old checkpoints are not read: they may be the broken ones
        return RunPlan(Action.NEW, run_dir, config, 0, None, identity, overwrite=True, notes=[
            f"Replacing the run at step {checkpoint_step(ckpts[-1])} in {run_dir} with a new run (overwrite; its "
            "checkpoints are not read).", *notes])
    ckpt, saved, skipped = newest_readable(run_dir, Path(checkpoint) if checkpoint else None)
    step = saved["step"]
    for bad, reason in skipped:
        notes.append(f"Skipped {bad.name}, which cannot be read ({reason}); it is kept aside as "
                     f"{bad.name}{BROKEN_SUFFIX}.")
    if not resume:
        raise TrainingError(
            f"{run_dir} already holds a run (step {step} of {saved['config'].get('num_steps')}): turn resume on "
            "to continue it (CLI: train --resume), or choose another run name / output_dir"
        )
    saved_config = TrainConfig.from_dict(saved["config"], source=str(ckpt))
    saved_identity, identity_note = _read_identity(run_dir)
    if identity_note:
        notes.append(identity_note)
    changes = compare_settings(saved_config, config, saved_identity, identity)
    refused = [c for c in changes if c.field not in APPLIED_ON_RESUME]
    if refused:
        raise TrainingError(
            f"cannot resume the run in {run_dir} (step {step}): {len(refused)} setting(s) differ from the saved "
            f"run - {'; '.join(map(str, refused))}. Set them back to continue this run, or choose another run "
            "name to train with the new settings"
        )
    if config.num_steps < step:
        raise TrainingError(
            f"the run in {run_dir} is already at step {step}, past num_steps {config.num_steps}: "
            f"set num_steps to {step} or more (or choose another run name)"
        )
    effective = dataclasses.replace(
        saved_config, **{c.field: c.new for c in changes}, output_dir=config.output_dir, cache_dir=config.cache_dir,
        transformer=config.transformer,
    )
    plan = RunPlan(Action.RESUME, run_dir, effective, step, ckpt, identity, applied=changes,
                   skipped=[p for p, _ in skipped])
    if step >= effective.num_steps:
        plan.action, plan.history = Action.FINISHED, saved["history"]
        triplet, relation = plan.lora_paths
        plan.notes.append(f"Run {run_dir.name} already finished at step {step}: nothing to train. "
                          f"LoRA: {relation} (triplet: {triplet}).")
        if changes:
            plan.notes.append("Changed settings have no effect on a finished run: "
                              + "; ".join(str(c) for c in changes) + ".")
        plan.notes += notes
        return plan
    plan.notes.append(f"Resuming run {run_dir.name} at step {step} of {effective.num_steps} "
                      f"(checkpoint {ckpt.name}).")
    for c in changes:
        plan.notes.append(f"Applied {c.field}: {c.saved!r} -> {c.new!r} ({APPLIED_ON_RESUME[c.field]}).")
    plan.notes += notes
    return plan


def _unexpected_note(run_dir: Path) -> list[str]:
    odd = unexpected_files(run_dir)
    if not odd:
        return []
    names = ", ".join(repr(p.name) for p in odd[:5]) + (" ..." if len(odd) > 5 else "")
    log.warning("%s: ignored %d file(s) that are not checkpoint_<step>.pt: %s", run_dir / CHECKPOINT_DIR, len(odd), names)
    return [f"Ignored {len(odd)} file(s) in {CHECKPOINT_DIR}/ that are not checkpoint_<step>.pt: {names}."]


# ---------------------------------------------------------------------------------------------
# carrying a plan out


def _write_run_info(run_dir: Path, identity: dict[str, str]) -> None:
    write_text(run_dir / RUN_INFO, json.dumps({"format": "dreamrelation.run", "identity": identity}, indent=2))


def _clear_run(run_dir: Path) -> None:
    """Remove the files of an earlier run (overwrite): checkpoints, LoRAs, config, run info."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    for name in (TRIPLET_FILE, RELATION_FILE, CONFIG_FILE, RUN_INFO, HISTORY_FILE):
        (run_dir / name).unlink(missing_ok=True)


class _Leftovers:
    """Removes what a run created in its folder when it ends without any checkpoint."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.existed = run_dir.exists()
        self.before = set(run_dir.iterdir()) if self.existed and run_dir.is_dir() else set()

    def remove_if_no_checkpoint(self) -> bool:
        if list_checkpoints(self.run_dir) or not self.run_dir.exists():
            return False
        if not self.existed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return True
        for p in set(self.run_dir.iterdir()) - self.before:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return True


def execute(
    plan: RunPlan,
    clips: Sequence[Clip] | None = None,
    model: torch.nn.Module | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    max_steps: int | None = None,
    on_memory: Callable[[Any], None] | None = None,
) -> TrainResult:
    """Carry out a plan: train (new or resumed) or hand back a finished run's files.
    `on_memory` receives the resolved memory options before the model is set up (see Trainer).

    Status of the result: one of protocol.STATUSES ("finished", "stopped" (max_steps), "cancelled",
    "already finished").
    A run that fails or is cancelled before it wrote its first checkpoint leaves no files. Runs
    under the run folder's lock (taken here unless the caller holds it)."""
    if not holds_lock(plan.run_dir):
        with RunLock(plan.run_dir):
            return execute(plan, clips, model, progress, should_cancel, on_checkpoint, max_steps, on_memory)
    _set_aside(plan)
    if plan.action == Action.FINISHED:
        result = _finished(plan, clips, model)
        write_history(plan.run_dir, result.history)
        return result
    leftovers = _Leftovers(plan.run_dir)
    try:
        if plan.overwrite:
            _clear_run(plan.run_dir)
        trainer = Trainer(plan.config, clips=clips, model=model, run_dir=plan.run_dir, on_memory=on_memory)
        if plan.action == Action.RESUME:
            trainer.load_state_dict(load_checkpoint(plan.checkpoint), source=str(plan.checkpoint))
        trainer.checkpoint_saved = on_checkpoint
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_info(plan.run_dir, plan.identity)
        cancelled_at_start = _agreed_stop_before_start(should_cancel)
        if cancelled_at_start and plan.action == Action.NEW:
            raise _CancelledBeforeStart
        result = trainer.train(progress=progress, should_cancel=should_cancel, max_steps=max_steps)
    except _CancelledBeforeStart:
        leftovers.remove_if_no_checkpoint()
        return TrainResult(plan.run_dir, 0, Status.CANCELLED, None, None, None, [])
    except BaseException:
        if leftovers.remove_if_no_checkpoint():
            log.info("run failed before its first checkpoint: removed what it wrote in %s", plan.run_dir)
        raise
    write_history(plan.run_dir, result.history)
    return result


class _CancelledBeforeStart(Exception):
    pass


def _agreed_stop_before_start(should_cancel: Callable[[], bool] | None) -> bool:
    """A stop asked before the first step, agreed by every training process (one collective, at the
    same point in `execute` and `execute_follower`)."""
    return distributed.any_rank(should_cancel is not None and bool(should_cancel()))


# ---------------------------------------------------------------------------------------------
# several processes: rank 0 plans, the others follow


@dataclass
class Handoff:
    """What rank 0 hands the other training processes once it has planned (broadcast, so that no
    file system shared between machines is needed): the plan, and the checkpoint's state when the
    run resumes. `plan` None: rank 0 stopped before it could plan (its error event says why)."""

    plan: RunPlan | None
    state: dict[str, Any] | None = None
    rebuild: bool = False  # a finished run whose LoRA files rank 0 writes again: every process builds the model


def handoff(plan: RunPlan | None) -> Handoff:
    """Rank 0's handoff for `plan` (the checkpoint read here when the plan resumes, or when a
    finished run's LoRA files must be written again)."""
    if plan is not None and plan.action == Action.RESUME:
        return Handoff(plan, load_checkpoint(plan.checkpoint))
    if plan is not None and plan.action == Action.FINISHED and _lora_missing(plan):
        return Handoff(plan, load_checkpoint(plan.checkpoint), rebuild=True)
    return Handoff(plan)


def execute_follower(h: Handoff, should_cancel: Callable[[], bool] | None = None) -> TrainResult | None:
    """A rank other than 0 carries out rank 0's plan: the same Trainer, the same state, the same
    steps (the Trainer shares each batch out and agrees the stop with the others); it writes
    nothing. None when there is nothing to train (rank 0 failed, or the run had finished). A
    finished run whose LoRA files rank 0 writes again is built here too: setting the model up may
    involve every process (the memory options agreed on CUDA, a sharded base)."""
    plan = h.plan
    if plan is None or (plan.action == Action.FINISHED and not h.rebuild):
        return None
    trainer = Trainer(plan.config, run_dir=plan.run_dir)
    if plan.action == Action.FINISHED:
        trainer.load_state_dict(h.state, source=f"rank 0's {plan.checkpoint}")
        trainer.export()  # rank 0 writes; here only the paths
        return None
    if plan.action == Action.RESUME:
        trainer.load_state_dict(h.state, source=f"rank 0's {plan.checkpoint}")
    if _agreed_stop_before_start(should_cancel) and plan.action == Action.NEW:
        return TrainResult(plan.run_dir, 0, Status.CANCELLED, None, None, None, [])
    return trainer.train(should_cancel=should_cancel)


def _set_aside(plan: RunPlan) -> None:
    """Rename the unreadable newer checkpoints the plan skipped to `<name>.broken` (kept, not deleted)."""
    for p in plan.skipped:
        if not p.is_file():
            continue
        target, n = p.with_name(p.name + BROKEN_SUFFIX), 1
        while target.exists():
            n += 1
            target = p.with_name(f"{p.name}.{n}{BROKEN_SUFFIX}")
        p.rename(target)
        log.warning("%s cannot be read: kept aside as %s", p, target.name)


def run_training(
    config: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    *,
    checkpoint: str | os.PathLike | None = None,
    clips: Sequence[Clip] | None = None,
    model: torch.nn.Module | None = None,
    on_plan: Callable[[RunPlan], None] | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    max_steps: int | None = None,
    executor: Callable[..., TrainResult] | None = None,
) -> tuple[RunPlan, TrainResult]:
    """One training request, as the CLI and the worker run it: take the run folder's lock (a
    RunLockedError at once when another trainer holds it), remove temporary files of killed
    writes, plan, hand the plan to `on_plan` (to report it), execute (`executor(plan, clips=,
    progress=, should_cancel=, on_checkpoint=, max_steps=)`: `execute` by default, the memory
    fallback for the CLI and the worker). The lock is released on every exit."""
    run_dir = Path(config.output_dir)
    with RunLock(run_dir) as lock:
        removed = remove_stale_temps(run_dir) + remove_stale_temps(run_dir / CHECKPOINT_DIR)
        plan = plan_run(config, resume, overwrite, clips, checkpoint)
        if lock.took_over:
            plan.notes.insert(0, f"The run folder's lock was held by {lock.took_over}, which is no longer running: "
                                 "taken over.")
        if removed:
            size = human_size(sum(n for _, n in removed))
            plan.notes.append(f"Removed {len(removed)} temporary file(s) left by interrupted writes ({size}).")
            log.info("removed stale temporary files: %s", ", ".join(p.name for p, _ in removed))
        if on_plan is not None:
            on_plan(plan)
        run = executor or (lambda p, **kw: execute(p, model=model, **kw))
        return plan, run(plan, clips=clips, progress=progress, should_cancel=should_cancel,
                         on_checkpoint=on_checkpoint, max_steps=max_steps)


def _lora_missing(plan: RunPlan) -> bool:
    triplet, relation = plan.lora_paths
    return not (triplet.is_file() and relation.is_file())


def _finished(plan: RunPlan, clips: Sequence[Clip] | None, model: torch.nn.Module | None) -> TrainResult:
    triplet, relation = plan.lora_paths
    if _lora_missing(plan):
        # The LoRA files were removed (or the run stopped between checkpoint and export): write them
        # again from the last checkpoint; this loads the model but trains nothing.
        trainer = Trainer(plan.config, clips=clips, model=model, run_dir=plan.run_dir)
        trainer.load_state_dict(load_checkpoint(plan.checkpoint), source=str(plan.checkpoint))
        triplet, relation = trainer.export()
        plan.notes.append("Its LoRA files were missing and were written again from the last checkpoint.")
    return TrainResult(plan.run_dir, plan.step, Status.ALREADY_FINISHED, plan.checkpoint, triplet, relation,
                       list(plan.history))
