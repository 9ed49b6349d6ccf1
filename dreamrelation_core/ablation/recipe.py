"""The study's recipe: world, base model, pretraining, LoRA training, generation (docs/ablation.md).

One dataclass; `quick()` is small enough for CI, `full()` is the committed study. The base model
is cached by a hash of the fields that make it (`base_fields`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .world import AMPLITUDE


@dataclass(frozen=True)
class Recipe:
    # world
    shape: tuple[int, int, int] = (7, 8, 16)  # latent (T, h, w): 37 frames at 64x128 pixels in Mochi's terms
    target: str = "approach_touch"  # the relation the LoRAs learn; the base sees it rarely
    target_share: float = 0.02  # share of pretraining clips of the target relation (rare: the base knows its words)
    target_from_stage: int = 4  # the target's clips enter from this pretrain_more stage on (0: from the start)
    layouts: int = 0  # fixed motion layouts per relation (0: every clip's motion drawn afresh)
    # base: diffusers MochiTransformer3DModel + tiny T5, pretrained together on the world
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 32  # T5 width
    text_len: int = 16
    rope_max: float = 3.0  # RoPE angular speeds, radians per frame / per patch, fixed (0: diffusers' learned zeros)
    rope_min: float = 0.5
    rope_at_more: bool = False  # start them only for the pretrain_more stage (the first stage keeps the zeros)
    qk_scale: float = 1.5  # initial weight of the query / key RMSNorms (diffusers: 1): how sharp attention can be
    norm_decay: bool = False  # weight decay on 1-d parameters (norms, biases) too, as the first bases had
    pretrain_sigma: str = "logit_normal"  # noise levels of the first stage: uniform or logit_normal
    pretrain_steps: int = 6000
    pretrain_batch: int = 8
    pretrain_lr: float = 1e-3
    pretrain_more: int = 6000  # then this many more steps from that base (own cache entry), lr pretrain_lr / 2
    more_sigma: str = "logit_normal"  # noise levels of the pretrain_more stage: uniform or logit_normal
    more_stages: int = 4  # pretrain_more stages one after the other, each from the one before (own cache entries)
    base_seed: int = 0
    # exemplars
    exemplars: int = 6
    exemplar_seed: int = 1
    # LoRA training (through the trainer; the TrainConfig fields not named here keep their defaults)
    rank: int = 8
    train_steps: int = 400
    train_lr: float = 1e-3
    train_batch: int = 2
    warmup_steps: int = 20
    # generation
    pairs: int = 6  # new subject pairs
    gen_seeds: int = 2  # sampling seeds per pair
    sample_steps: int = 20
    cfg: float = 6.0  # the reference's sampling guidance
    # judge check
    judge_clips: int = 30  # ground-truth clips per relation
    threads: int = 1  # torch threads: more threads on a loaded 2-core machine are many times slower

    def before_stage(self, stage: int) -> Recipe:
        """The recipe of the base that stage `stage` starts from (0: the first stage): the earlier
        stages, without the target's clips if they enter later."""
        r = dataclasses.replace(self, more_stages=max(1, stage))
        if stage == 0:
            r = dataclasses.replace(r, pretrain_more=0, more_sigma="uniform")
            if self.rope_at_more:  # the first stage has diffusers' zero (learned) frequencies
                r = dataclasses.replace(r, rope_max=0.0, rope_at_more=False)
        if self.target_from_stage and stage < self.target_from_stage:
            r = dataclasses.replace(r, target_share=0.0, target_from_stage=0)
        return r

    @classmethod
    def full(cls) -> Recipe:
        return cls()

    @classmethod
    def quick(cls) -> Recipe:
        return cls(layers=1, heads=2, head_dim=16, pretrain_steps=40, pretrain_batch=4, pretrain_more=0,
                   rope_at_more=False, more_sigma="uniform", more_stages=1, target_from_stage=0, exemplars=5,
                   train_steps=6, train_batch=1, warmup_steps=2, pairs=2, gen_seeds=1, sample_steps=4, judge_clips=6)

    def base_fields(self) -> dict:
        names = ("shape", "target", "target_share", "layers", "heads", "head_dim", "text_dim", "text_len",
                 "pretrain_steps", "pretrain_batch", "pretrain_lr", "base_seed", "pretrain_more",
                 "rope_max", "rope_min", "rope_at_more", "layouts",
                 "more_sigma", "qk_scale", "norm_decay", "pretrain_sigma", "more_stages", "target_from_stage")
        return {n: getattr(self, n) for n in names}

    def base_hash(self) -> str:
        fields = self.base_fields()
        if not fields["pretrain_more"]:
            del fields["pretrain_more"]  # hashes of bases made before the field existed stay valid
        if not fields["rope_max"]:
            del fields["rope_max"], fields["rope_min"]  # likewise
        if not fields["rope_at_more"]:
            del fields["rope_at_more"]
        if not fields["layouts"]:
            del fields["layouts"]
        # fields left at the value the earlier bases were made with are left out: their hashes stay valid
        for name, old in (("more_sigma", "uniform"), ("qk_scale", 1.0), ("norm_decay", True), ("pretrain_sigma", "uniform"),
                          ("more_stages", 1), ("target_from_stage", 0)):
            if fields[name] == old:
                del fields[name]
        text = json.dumps({"version": 2, "amplitude": AMPLITUDE, **fields}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["base_hash"] = self.base_hash()
        return d
