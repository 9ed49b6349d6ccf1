"""Training configuration: one dataclass, the reference recipe's defaults (docs/method.md "Training recipe"), YAML in and out."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TrainConfig:
    """Every option of a relation-LoRA training run. Defaults are the reference recipe's."""

    # data and output
    cache_dir: str = ""  # prepared dataset (see `prepare`); empty: use the in-memory clips given to the trainer
    output_dir: str = "runs/relation"
    # base model: a diffusers folder, a single Mochi .safetensors (then transformer_config is a local
    # diffusers config folder), or "tiny" for the built-in random test model
    transformer: str = "tiny"
    transformer_config: str = ""
    # which base model (base_models.NAMES): auto detects it from the transformer file ("tiny": Mochi)
    base_model: str = "auto"
    # where the triplet sits on Wan (docs/method.md "Wan 2.1 / 2.2"): default = relation on self- and
    # cross-attention Q, K, subjects on both V, shared on both output projections; self_attention =
    # the same on the self-attention only. Mochi has one placement (default).
    lora_placement: str = "default"
    # noise levels trained, sigma ~ U(lo, hi): [0, 1] everything; one Wan 2.2 A14B expert its own range
    # (high noise [0.875, 1], low noise [0, 0.875]: the boundary of Wan 2.2 T2V, docs/method.md "Wan 2.1 / 2.2")
    sigma_range: tuple[float, float] = (0.0, 1.0)
    # Relation LoRA triplet
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # hybrid mask training
    mask_weight: float = 50.0
    # relational contrastive loss
    rcl_weight: float = 0.01
    rcl_temperature: float = 0.07
    positive_bank_size: int = 10
    negative_bank_size: int = 64
    positives_per_anchor: int = 4
    negatives: int = 10
    # ablation switches (docs/ablation.md); the defaults are the method
    relation_placement: str = "qk"  # modules of the relation LoRA: qk (method), q, k, v, kv or qkv
    subject_loras: bool = True  # false: no subject branches; every step trains relation + ffn
    hybrid_masks: bool = True  # false: no branch draw and no masked loss; every step trains all adapters on the MSE
    # optimisation
    num_steps: int = 3000
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 200
    grad_clip: float = 0.0  # 0: no clipping (reference)
    batch_size: int = 1
    caption_dropout: float = 0.1
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "no"
    device: str = "auto"  # auto: cuda if available
    seed: int = 0
    # checkpoints and exports
    checkpoint_every: int = 200
    keep_checkpoints: int = 3  # 0 keeps all
    save_dtype: str = "bf16"  # dtype of exported LoRA files: bf16 or fp32
    # memory (`python -m dreamrelation_core memory` predicts a setting's peak GPU memory). "auto":
    # on CUDA the fastest setting that fits the free GPU memory; on the CPU weights as loaded,
    # no swap, no checkpointing, no offload.
    base_dtype: str = "auto"  # frozen Linear weights: auto, bf16, fp8 (per-tensor scaled e4m3) or fp32
    blocks_to_swap: int | str = "auto"  # blocks whose frozen weights stream from CPU memory: auto or 0..num_layers
    gradient_checkpointing: bool | str = "auto"  # auto (on for CUDA), true or false
    offload_activations: bool | str = "auto"  # checkpointed block inputs in CPU memory: auto, true or false
    # the frozen block weights sharded over the processes of `train --nproc N` (FSDP2): each GPU holds
    # 1/N of them plus the blocks in flight. auto: only where nothing else fits; true with one
    # process: nothing to share with, the base stays whole (noted in the log). Excludes block swap.
    shard_base: bool | str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # YAML gives lists
        self.sigma_range = tuple(float(v) for v in self.sigma_range)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"config: {msg}")

        from ..base_models import NAMES, PLACEMENTS, RELATION_PLACEMENTS

        need(self.base_model in NAMES, f"base_model must be one of {list(NAMES)}, got {self.base_model!r}")
        need(self.lora_placement in PLACEMENTS, f"lora_placement must be one of {list(PLACEMENTS)}, got {self.lora_placement!r}")
        need(len(self.sigma_range) == 2 and 0.0 <= self.sigma_range[0] < self.sigma_range[1] <= 1.0,
             f"sigma_range must be [lo, hi] with 0 <= lo < hi <= 1, got {list(self.sigma_range)}")
        need(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        need(0 <= self.warmup_steps, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0 <= self.caption_dropout <= 1, f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.mixed_precision in ("auto", "bf16", "no"), f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        need(self.save_dtype in ("bf16", "fp32"), f"save_dtype must be bf16 or fp32, got {self.save_dtype!r}")
        need(self.positives_per_anchor >= 1, f"positives_per_anchor must be >= 1, got {self.positives_per_anchor}")
        need(self.rcl_temperature > 0, f"rcl_temperature must be > 0, got {self.rcl_temperature}")
        need(self.relation_placement in RELATION_PLACEMENTS,
             f"relation_placement must be one of {list(RELATION_PLACEMENTS)}, got {self.relation_placement!r}")
        for name in ("subject_loras", "hybrid_masks"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        self._validate_memory(need)

    def _validate_memory(self, need) -> None:
        need(self.base_dtype in ("auto", "bf16", "fp8", "fp32"), f"base_dtype must be auto, bf16, fp8 or fp32, got {self.base_dtype!r}")
        swap = self.blocks_to_swap
        need(swap == "auto" or (isinstance(swap, int) and not isinstance(swap, bool) and swap >= 0),
             f"blocks_to_swap must be auto or an integer >= 0, got {swap!r}")
        for name in ("gradient_checkpointing", "offload_activations"):
            v = getattr(self, name)
            need(v == "auto" or isinstance(v, bool), f"{name} must be auto, true or false, got {v!r}")
        need(not (self.offload_activations is True and self.gradient_checkpointing is False),
             "offload_activations needs gradient_checkpointing (it offloads the checkpointed block inputs)")
        need(self.shard_base == "auto" or isinstance(self.shard_base, bool),
             f"shard_base must be auto, true or false, got {self.shard_base!r}")
        need(not (self.shard_base is True and swap not in ("auto", 0)),
             f"blocks_to_swap: {swap} and shard_base: true exclude each other (a sharded base keeps 1/N of each "
             "block on every GPU already); set blocks_to_swap to 0 (or auto) or shard_base to false")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["sigma_range"] = list(self.sigma_range)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**data)

    def save_yaml(self, path: str | os.PathLike) -> Path:
        from ..fileio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return Path(path)

    @classmethod
    def load_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))
