"""Relation LoRA triplet training: hybrid mask training + relational contrastive loss, resumable.

One step (docs/method.md "Hybrid mask training", "Relational contrastive loss"): draw a branch
(relation / subject1 / subject2) from the seeded generator, activate its adapters (the others
contribute nothing, get no gradient and are skipped by AdamW), draw a clip, sigma and noise,
predict u = z - eps, and minimise
    L = MSE + mask_weight * MSE_masked + rcl_weight * RCL.
All randomness of a step comes from one `torch.Generator` (plus torch's global RNG for LoRA
dropout); both are checkpointed, so a resumed run repeats an uninterrupted one step for step.

Under torchrun (training.distributed) every process draws the same numbers, computes its share of
the global batch and the contrastive loss of the whole batch; the LoRA gradients are summed over
processes: the same run as on one process (docs/distributed.md). Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..base_models import resolve_spec, spec_of_model
from ..basemodel import BaseModelSpec
from ..data.latent_masks import relation_mask
from ..errors import TrainingError
from ..fileio import is_temp_file, save_torch
from ..lora import files as lora_files
from ..lora import peft_triplet as triplet
from ..statedict import torch_load_reason
from . import distributed
from .config import TrainConfig
from .contrastive import RCLSettings, RelationalContrastiveLoss, frame_features
from .flow import masked_flow_loss, noisy
from .outside_inference import make_trainable, normal_tree, without_inference_tensors
from .protocol import Status

log = logging.getLogger("dreamrelation")

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
TRIPLET_FILE = "relation_triplet.safetensors"
RELATION_FILE = "relation_only.safetensors"


class Clip(Protocol):
    """What the trainer needs of a prepared clip (see data.cache.PreparedClip)."""

    y_feat: torch.Tensor  # [L, D]
    y_mask: torch.Tensor  # [L] bool
    mask1: torch.Tensor  # [T, h, w]
    mask2: torch.Tensor  # [T, h, w]

    def sample_latents(self, generator: torch.Generator) -> torch.Tensor: ...  # [C, T, h, w]


@dataclass
class StepInfo:
    """Reported after every step; designed for a GUI progress display."""

    step: int  # steps completed
    num_steps: int
    branch: str
    losses: dict[str, float]  # total, mse, masked, rcl (nan where not computed)
    lr: float
    step_time: float  # seconds, this step
    eta: float  # seconds to go, from the mean step time so far


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # one of protocol.STATUSES: "finished", "stopped" (max_steps), "cancelled"; runs adds "already finished"
    checkpoint: Path | None
    triplet_path: Path | None
    relation_path: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# model


def base_model_spec(config: TrainConfig) -> BaseModelSpec:
    """The base model a config trains (`base_model`; auto: detected from the transformer file)."""
    return resolve_spec(config.base_model, config.transformer)


def load_transformer(config: TrainConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The frozen base model, from local files only (or the tiny random test model). With
    `base_dtype: fp8` a bf16 file is quantised while it is read: the bf16 model is never whole in
    host memory (docs/method.md "Training memory")."""
    linear_dtype = torch.float8_e4m3fn if config.base_dtype == "fp8" else None
    return base_model_spec(config).load_transformer(
        config.transformer, config.transformer_config, dtype, config.seed, config.extra.get("tiny"), linear_dtype)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def branch_mask(clips: Sequence[Clip], branch: str) -> torch.Tensor:
    """[B, T, h, w]: relation -> M1 + M2 (2 where they overlap); subject k -> Mk."""
    if branch == "relation":
        return torch.stack([relation_mask(c.mask1.float(), c.mask2.float()) for c in clips])
    attr = "mask1" if branch == "subject1" else "mask2"
    return torch.stack([getattr(c, attr).float() for c in clips])


# ---------------------------------------------------------------------------------------------
# trainer


class Trainer:
    """Builds model, adapters, optimizer and banks from a TrainConfig; `train()` runs to num_steps.

    Safe to build and run under `torch.inference_mode()` (ComfyUI runs nodes there): the methods
    that create or update trainable state leave inference mode, and inference tensors handed in
    (model weights, clip tensors) are replaced by normal copies (see outside_inference)."""

    @torch.inference_mode(False)
    def __init__(
        self,
        config: TrainConfig,
        clips: Sequence[Clip] | None = None,
        model: torch.nn.Module | None = None,
        run_dir: str | os.PathLike | None = None,
        on_memory: Callable[[Any], None] | None = None,
    ):
        """`on_memory` is called with the resolved memory options (memory.policy.Choice) before
        the model is set up on the device."""
        self.config = config
        self.on_memory = on_memory
        self.run_dir = Path(run_dir or config.output_dir)
        self.world = distributed.world()
        self.rows = distributed.share(config.batch_size, self.world)  # this process's rows of each batch
        self.device = distributed.device_for(config.device, self.world)
        self.autocast = self.device.type == "cuda" and config.mixed_precision != "no"
        self.clips = [without_inference_tensors(c) for c in (clips if clips is not None else self._load_clips())]
        if not self.clips:
            raise TrainingError("no training clips: prepare a dataset first (python -m dreamrelation_core prepare)")
        self._check_clips()
        torch.manual_seed(config.seed)
        base_dtype = torch.bfloat16 if self.autocast else torch.float32
        self.model = make_trainable(model if model is not None else load_transformer(config, base_dtype))
        # predict(), blocks and LoRA placement of this base model (the relation adapter's modules
        # included: an ablation may move it, docs/ablation.md)
        self.spec = (spec_of_model(self.model).with_placement(config.lora_placement)
                     .with_relation_placement(config.relation_placement))
        self._check_clip_base_model()
        self._prepare_memory()
        self.model.train()
        params = [p for _, p in triplet.lora_parameters(self.model)]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup_steps, config.num_steps)
        )
        self.rcl = RelationalContrastiveLoss(
            RCLSettings(
                positive_bank_size=config.positive_bank_size, negative_bank_size=config.negative_bank_size,
                positives_per_anchor=config.positives_per_anchor, negatives=config.negatives,
                temperature=config.rcl_temperature,
            )
        )
        self.rng = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.checkpoint_saved: Callable[[Path], None] | None = None  # called with each checkpoint written

    # -- memory (training/memory): options, estimate, fp8 storage, LoRA, swap, checkpointing ------
    def _prepare_memory(self) -> None:
        """Resolve the memory options (on CUDA: refuse before moving the model when they cannot
        fit), then freeze the base in its storage dtype, add the LoRA triplet (fp32), set up block
        swap, move to the device, enable checkpointing."""
        from .memory.policy import resolve
        from .memory.setup import prepare_model

        cfg = self.config
        t, h, w = max((tuple(c.mask1.shape) for c in self.clips), key=lambda s: s[0] * s[1] * s[2])  # largest clip
        self.memory = resolve(cfg, self.device, self.model, (int(t), int(h), int(w)))
        log.info(self.memory.summary())
        if self.on_memory is not None:
            self.on_memory(self.memory)
        if self.device.type == "cuda":  # page-locked host memory: refuse now rather than fail mid-setup
            from .memory.estimate import host_estimate
            from .memory.host import check_host_memory
            from .memory.policy import model_dims

            pinned = host_estimate((int(t), int(h), int(w)), self.memory.options, model_dims(self.model),
                                   self.rows.stop - self.rows.start).pinned  # this process's clips
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: processes sharing this RAM
            if pinned:
                log.info(check_host_memory(pinned * local, "the block swap store and the offloaded block inputs"
                                           + (f" of {local} processes on this machine" if local > 1 else "")))
        prepared = prepare_model(self.model, self.memory.options, self.device, rank=cfg.rank, alpha=cfg.alpha,
                                 dropout=cfg.dropout, spec=self.spec)
        self.swap, self.offload = prepared.swap, prepared.offload

    # -- data ----------------------------------------------------------------------------------
    def _load_clips(self) -> list[Clip]:
        if not self.config.cache_dir:
            raise TrainingError("config.cache_dir is empty and no clips were given")
        from ..data.cache import load_prepared

        return list(load_prepared(self.config.cache_dir))

    def _check_clips(self) -> None:
        first = self.clips[0]
        for c in self.clips:
            name = getattr(c, "name", "?")
            t = c.mask1.shape
            if c.mask2.shape != t:
                raise TrainingError(f"clip {name}: subject masks differ in shape: {tuple(t)} vs {tuple(c.mask2.shape)}")
            if self.config.batch_size > 1 and (t != first.mask1.shape or c.y_feat.shape != first.y_feat.shape):
                raise TrainingError(
                    f"clip {name}: shape {tuple(t)} differs from {tuple(first.mask1.shape)}; batch_size > 1 needs clips of one size"
                )

    def _check_clip_base_model(self) -> None:
        for c in self.clips:
            spec = getattr(c, "spec", None)
            if spec is not None and spec.name != self.spec.name:
                raise TrainingError(
                    f"clip {getattr(c, 'name', '?')}: prepared with the {spec.name} VAE, but the transformer is "
                    f"{self.spec.name}; prepare the dataset with this base model's VAE")

    # -- one step ------------------------------------------------------------------------------
    def _draw_batch(self) -> list[Clip]:
        idx = torch.randint(len(self.clips), (self.config.batch_size,), generator=self.rng)
        return [self.clips[int(i)] for i in idx]

    def _activate_next_branch(self) -> tuple[str, float]:
        """Draw and activate this step's branch -> (branch, mask weight). Ablation switches
        (docs/ablation.md): without subject LoRAs only the relation branch exists and trains
        relation + ffn; without hybrid masks every step trains every adapter on the plain MSE."""
        cfg = self.config
        if cfg.hybrid_masks and cfg.subject_loras:
            branch = triplet.draw_branch(self.rng)
        else:
            branch = "relation"
        adapters = triplet.BRANCH_ADAPTERS[branch]
        if not cfg.subject_loras:
            adapters = tuple(a for a in adapters if a not in ("subject1", "subject2"))
        triplet.activate(self.model, adapters)
        return branch, (cfg.mask_weight if cfg.hybrid_masks else 0.0)

    @torch.inference_mode(False)
    def train_step(self) -> tuple[str, dict[str, float]]:
        cfg, rng, dev = self.config, self.rng, self.device
        branch, mask_weight = self._activate_next_branch()
        batch = self._draw_batch()
        z = torch.stack([c.sample_latents(rng) for c in batch])  # [B, C, T, h, w]
        y = torch.stack([c.y_feat.float() for c in batch])  # [B, L, D]
        ym = torch.stack([c.y_mask.bool() for c in batch])  # [B, L]
        drop = torch.rand(len(batch), generator=rng) < cfg.caption_dropout
        y[drop] = 0.0
        ym[drop] = False
        eps = torch.randn(z.shape, generator=rng)
        sigma = torch.rand(len(batch), generator=rng)
        lo, hi = cfg.sigma_range
        if (lo, hi) != (0.0, 1.0):  # one expert of Wan 2.2 A14B: its own noise levels only
            sigma = lo + (hi - lo) * sigma
        x, u = noisy(z, eps, sigma)
        mask = branch_mask(batch, branch)
        r = self.rows  # every draw above is the global batch's; the model sees this process's rows
        x, u, y, ym, sigma, mask = x[r], u[r], y[r], ym[r], sigma[r], mask[r]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.spec.predict(self.model, x.to(dev), y.to(dev), ym.to(dev), sigma.to(dev))
        rec, mse, masked = masked_flow_loss(pred, u.to(dev), mask.to(dev), mask_weight)
        # the whole batch's features [B, T, C] on every process: the banks hold what one process holds
        feats = distributed.gather_rows(frame_features(pred)) if cfg.rcl_weight > 0 else None
        rcl = self.rcl.loss_of_features(feats, rng) if feats is not None else None
        n = self.world.size
        if n > 1:
            # each rank's mean over its equal share, / n: the sum over ranks of these gradients is
            # the global mean's; the contrastive term is whole on every rank (gather_rows)
            objective = rec / n + cfg.rcl_weight * rcl if rcl is not None else rec / n
            rec, mse, masked = distributed.sum_values(torch.stack([rec, mse, masked]).detach() / n)
        total = rec + cfg.rcl_weight * rcl if rcl is not None else rec
        if n == 1:
            objective = total
        terms = {"total": total, "mse": mse, "masked": masked, "rcl": rcl}
        for name, v in terms.items():
            if v is not None and not torch.isfinite(v):
                kept = list_checkpoints(self.run_dir)
                raise TrainingError(
                    f"step {self.step + 1}: loss term {name!r} is {v.item()} (branch {branch}); training stopped "
                    f"(a lower learning_rate may help), "
                    + (f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint had been written yet")
                )
        objective.backward()
        distributed.sum_gradients(p for _, p in triplet.lora_parameters(self.model))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in triplet.lora_parameters(self.model) if p.grad is not None], cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # None grads: inactive adapters stay untouched
        if feats is not None:
            self.rcl.update_features(feats)
        self.step += 1
        return branch, {k: (float(v.detach()) if v is not None else float("nan")) for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, num_samples: int = 16, seed: int = 1234, branch: str = "relation") -> dict[str, float]:
        """Mean loss terms over a fixed set of (clip, sigma, noise) draws, without training RNG use.

        Same draws every call, so values before and after training compare directly. Sigma is kept
        in [0.05, 0.95] where the prediction is informative."""
        cfg, dev = self.config, self.device
        g = torch.Generator().manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        triplet.activate_branch(self.model, branch)
        sums = {"total": 0.0, "mse": 0.0, "masked": 0.0}
        for i in range(num_samples):
            clip = self.clips[i % len(self.clips)]
            z = clip.sample_latents(g)[None]
            eps = torch.randn(z.shape, generator=g)
            sigma = 0.05 + 0.9 * torch.rand(1, generator=g)
            x, u = noisy(z, eps, sigma)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
                pred = self.spec.predict(self.model, x.to(dev), clip.y_feat[None].float().to(dev),
                                         clip.y_mask[None].bool().to(dev), sigma.to(dev))
            rec, mse, masked = masked_flow_loss(pred, u.to(dev), branch_mask([clip], branch).to(dev), cfg.mask_weight)
            for k, v in (("total", rec), ("mse", mse), ("masked", masked)):
                sums[k] += float(v) / num_samples
        self.model.train(was_training)
        return sums

    # -- loop ----------------------------------------------------------------------------------
    @torch.inference_mode(False)
    def train(
        self,
        progress: Callable[[StepInfo], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        max_steps: int | None = None,
    ) -> TrainResult:
        """Run until num_steps (or `max_steps` more steps, or until `should_cancel()` is true).

        A checkpoint is written every `checkpoint_every` steps and when the run stops. Under
        torchrun `should_cancel` is asked on every process and the answers are combined, so all
        stop at the same step; `progress` is called on rank 0 only.
        """
        cfg = self.config
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.run_dir / CONFIG_FILE)
        stop_at = cfg.num_steps if max_steps is None else min(cfg.num_steps, self.step + max_steps)
        start, t_start, status, ckpt = self.step, time.perf_counter(), Status.FINISHED, None
        while self.step < stop_at:
            requested = should_cancel is not None and bool(should_cancel())
            if self.world.active:
                requested = distributed.any_rank(requested)
            if requested:
                status = Status.CANCELLED
                break
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            branch, losses = self.train_step()
            dt = time.perf_counter() - t0
            self.history.append({"step": self.step, "branch": branch, "lr": lr, **losses})
            if progress is not None and self.world.main:
                mean = (time.perf_counter() - t_start) / (self.step - start)
                progress(StepInfo(self.step, cfg.num_steps, branch, losses, lr, dt, mean * (stop_at - self.step)))
            if self.step % cfg.checkpoint_every == 0:
                ckpt = self.save_checkpoint()
        if self.step < cfg.num_steps and status == Status.FINISHED:
            status = Status.STOPPED
        if ckpt is None or checkpoint_step(ckpt) != self.step:
            ckpt = self.save_checkpoint()
        triplet_path, relation_path = self.export()
        return TrainResult(self.run_dir, self.step, status, ckpt, triplet_path, relation_path, list(self.history))

    # -- files ---------------------------------------------------------------------------------
    def export(self) -> tuple[Path, Path]:
        """Write the triplet and the relation-only LoRA of the current weights into run_dir (rank 0;
        the other processes get the paths)."""
        if not self.world.main:
            return self.run_dir / TRIPLET_FILE, self.run_dir / RELATION_FILE
        lora = triplet.to_lora_set(self.model)
        lora.metadata["placement"] = self.spec.placement
        dtype = torch.bfloat16 if self.config.save_dtype == "bf16" else torch.float32
        cfg = self.config.to_dict()
        t = lora_files.save_triplet(self.run_dir / TRIPLET_FILE, lora, step=self.step, config=cfg, dtype=dtype)
        r = lora_files.save_relation_only(self.run_dir / RELATION_FILE, lora, step=self.step, config=cfg, dtype=dtype)
        return t, r

    def state_dict(self) -> dict[str, Any]:
        lora = {n: p.detach().cpu().clone() for n, p in triplet.lora_parameters(self.model)}
        rng = {"generator": self.rng.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this process's device only: reading every GPU's state would
            rng["cuda"] = torch.cuda.get_rng_state(self.device)  # open a CUDA context on each (torchrun)
        return {
            "format": "dreamrelation.checkpoint", "version": 1, "step": self.step, "config": self.config.to_dict(),
            "lora": lora, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng, "rcl": self.rcl.state_dict(), "history": self.history,
        }

    @torch.inference_mode(False)
    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        state = normal_tree(state)  # loaded under inference mode, the optimizer state could not be updated
        params = dict(triplet.lora_parameters(self.model))
        missing = sorted(set(params) - set(state["lora"]))
        extra = sorted(set(state["lora"]) - set(params))
        if missing or extra:
            raise TrainingError(f"{source}: LoRA weights do not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in params.items():
                t = state["lora"][n]
                if t.shape != p.shape:
                    raise TrainingError(f"{source}: {n} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
                p.copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The next step's learning rate from this run's schedule: a resumed run may have changed
        # num_steps, warmup_steps or learning_rate (the saved rate is the old schedule's). Unchanged
        # settings give the saved values exactly (the same expression LambdaLR evaluates).
        self.scheduler.base_lrs = [self.config.learning_rate for _ in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * lr_factor(self.scheduler.last_epoch, self.config.warmup_steps, self.config.num_steps)
        self.rng.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        cuda_rng = state["rng"].get("cuda")
        if isinstance(cuda_rng, (list, tuple)):  # older checkpoints kept every device's state
            cuda_rng = cuda_rng[0] if cuda_rng else None
        if cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.rcl.load_state_dict(state["rcl"])
        self.history = list(state["history"])
        self.step = int(state["step"])

    def save_checkpoint(self) -> Path:
        """`run_dir/checkpoints/checkpoint_<step>.pt`, atomically; older ones beyond keep_checkpoints
        pruned. Written once, by rank 0 (every process holds the same state); the others get the path."""
        d = self.run_dir / CHECKPOINT_DIR
        path = d / f"checkpoint_{self.step:06d}.pt"
        if not self.world.main:
            return path
        d.mkdir(parents=True, exist_ok=True)
        save_torch(path, self.state_dict())  # atomic; a full disk is a DiskFullError, earlier ones intact
        keep = self.config.keep_checkpoints
        if keep > 0:
            for old in list_checkpoints(self.run_dir)[:-keep]:
                old.unlink()
        if self.checkpoint_saved is not None:
            self.checkpoint_saved(path)
        return path

    @classmethod
    @torch.inference_mode(False)  # optimizer state loaded here must not be inference tensors
    def resume(
        cls, run_dir: str | os.PathLike, clips: Sequence[Clip] | None = None, model: torch.nn.Module | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> Trainer:
        """Rebuild a run from its folder and load its newest readable (or the given) checkpoint.
        Newer unreadable ones are skipped with a warning and left in place (the CLI and the worker,
        through training.runs, also set them aside as `.broken`)."""
        run_dir = Path(run_dir)
        ckpt, state = (Path(checkpoint), load_checkpoint(checkpoint)) if checkpoint else newest_readable_checkpoint(run_dir)
        config = TrainConfig.from_dict(state["config"], source=str(ckpt))
        trainer = cls(config, clips=clips, model=model, run_dir=run_dir)
        trainer.load_state_dict(state, source=str(ckpt))
        log.info("resumed %s at step %d", run_dir, trainer.step)
        return trainer


_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
BROKEN_SUFFIX = ".broken"  # a checkpoint that could not be read, kept aside by resume


def checkpoint_step(path: str | os.PathLike) -> int:
    m = _CHECKPOINT_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint_<step>.pt name")
    return int(m.group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """`checkpoints/checkpoint_<step>.pt` by step; other names are not checkpoints (see unexpected_files)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _CHECKPOINT_RE.match(p.name) and p.is_file()), key=checkpoint_step)


def unexpected_files(run_dir: str | os.PathLike) -> list[Path]:
    """Files in checkpoints/ that are neither checkpoints, nor set aside as broken, nor temporary
    files of a write (e.g. 'checkpoint_000040 copy.pt'): ignored, and the caller warns about them."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if not (_CHECKPOINT_RE.match(p.name) or p.name.endswith(BROKEN_SUFFIX)
                                                or is_temp_file(p)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{Path(run_dir) / CHECKPOINT_DIR}: no checkpoint_<step>.pt to resume from")
    return found[-1]


def newest_readable_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of a run that loads, and its state; newer unreadable ones are logged.
    FileNotFoundError without checkpoints, TrainingError naming each file when none loads."""
    found = list_checkpoints(run_dir)
    if not found:
        latest_checkpoint(run_dir)  # raises the FileNotFoundError naming the folder
    reasons: list[str] = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except TrainingError as e:
            log.warning("%s: skipped (%s)", path.name, e)
            reasons.append(str(e))
            continue
        return path, state
    raise TrainingError(f"{Path(run_dir)}: none of its {len(found)} checkpoint(s) can be read - " + "; ".join(reasons))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise TrainingError(f"{path}: not a readable training checkpoint ({torch_load_reason(e)})") from e
    if not isinstance(state, dict) or state.get("format") != "dreamrelation.checkpoint":
        raise TrainingError(f"{path}: not a DreamRelation training checkpoint")
    return state
