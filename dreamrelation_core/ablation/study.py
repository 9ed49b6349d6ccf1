"""The ablation study (docs/ablation.md): every variant through the real trainer, its LoRA files,
the generation loader (subject LoRAs dropped) and the sampler, judged exactly.

Per variant and seed: train on the exemplars (TrainConfig switches make the variant), export,
read the relation-only file back, put it on a fresh copy of the base, sample every new subject
pair with several noise seeds, and judge relation, text alignment and leakage. The same noise
seeds serve every variant, so variants compare clip for clip."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import DreamRelationError
from ..fileio import atomic_path
from ..generate import add_relation_lora, generate_latents
from ..lora.files import load_lora_file
from ..training.config import TrainConfig
from ..training.trainer import Trainer
from . import denoising, judge
from .base import Base, get_base
from .recipe import Recipe
from .world import RELATIONS, Subject, caption, exemplars, new_pairs

log = logging.getLogger("dreamrelation")

# variant -> TrainConfig switches (None: the base without a LoRA), and the paper's relation accuracy
VARIANTS: dict[str, dict | None] = {
    "full": {},
    "no_hybrid_masks": {"hybrid_masks": False},
    "no_contrastive": {"rcl_weight": 0.0},
    "no_subject_loras": {"subject_loras": False},
    "relation_on_v": {"relation_placement": "v"},
    "relation_on_q": {"relation_placement": "q"},
    "plain_lora": {"relation_placement": "qkv", "subject_loras": False, "hybrid_masks": False, "rcl_weight": 0.0},
    "base": None,
}
# not the paper's: the method with a lower mask weight λ_m (docs/ablation.md "Mask weight"); run
# with --variants, not by default
EXTRA_VARIANTS: dict[str, dict] = {
    "full_mask_weight_5": {"mask_weight": 5.0}, "full_mask_weight_1": {"mask_weight": 1.0},
    # three times the steps: the relation adapter trains only on the relation branch's third of them,
    # so this gives it as many steps as plain LoRA's adapters get (docs/ablation.md "Training steps")
    "full_steps_x3": {"steps_factor": 3},
}
PAPER_RELATION_ACCURACY = {
    "full": 0.4452, "no_hybrid_masks": 0.3574, "no_contrastive": 0.3416, "no_subject_loras": 0.3769,
    "relation_on_v": 0.3444, "relation_on_q": 0.3921, "plain_lora": 0.3258, "base": 0.2623,
}
METRICS = ("relation_accuracy", "relation_distance", "smooth_tracks", "text_alignment", "leakage", "relation_auc", "relation_gain_auc", "error_change",
           "leakage_auc")
# Student's t, two-sided 95 %, by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


class StudyError(DreamRelationError):
    """The study cannot give a trustworthy answer (e.g. the judge fails its check)."""


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t; 0 for one value)."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return float(x.mean()), 0.0
    half = _T95.get(len(x) - 1, 1.96) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def train_config(r: Recipe, switches: dict, seed: int, run_dir: Path) -> TrainConfig:
    """The method's TrainConfig at the world's scale, with a variant's switches (`steps_factor`, not a
    TrainConfig field, multiplies the recipe's training steps)."""
    switches = dict(switches)
    steps = r.train_steps * int(switches.pop("steps_factor", 1))
    return TrainConfig(
        output_dir=str(run_dir), rank=r.rank, alpha=float(r.rank), num_steps=steps, learning_rate=r.train_lr,
        warmup_steps=r.warmup_steps, batch_size=r.train_batch, checkpoint_every=steps, keep_checkpoints=1,
        save_dtype="fp32", device="cpu", mixed_precision="no", seed=seed, **switches,
    )


def _generate(model: torch.nn.Module, base: Base, prompts: list[tuple[Subject, Subject, str]], seeds: list[int],
              r: Recipe) -> list[dict]:
    """Sample every prompt with every seed and judge each clip."""
    y, ym = base.encode([caption(s1, rel, s2) for s1, s2, rel in prompts])
    out = []
    for i, (s1, s2, rel) in enumerate(prompts):
        for seed in seeds:
            z = generate_latents(model, y[i:i + 1], ym[i:i + 1], r.shape, steps=r.sample_steps, cfg=r.cfg, seed=seed)[0]
            out.append({"relation": rel, "judged": judge.classify(z, s1, s2), "text": judge.text_alignment(z, s1, s2),
                        "leak": judge.leakage(z, s1, s2), "smooth": judge.smooth_tracks(z, s1, s2),
                        "distance": judge.relation_distance(z, s1, s2, rel)})
    return out


def _summary(clips: list[dict]) -> dict:
    return {
        "relation_accuracy": float(np.mean([c["judged"] == c["relation"] for c in clips])),
        "relation_distance": float(np.mean([c["distance"] for c in clips])),
        "text_alignment": float(np.mean([c["text"] for c in clips])),
        "leakage": float(np.mean([c["leak"] for c in clips])),
        "smooth_tracks": float(np.mean([c["smooth"] for c in clips])),
        "judged": dict(Counter(c["judged"] for c in clips)),
        "distances": [round(c["distance"], 3) for c in clips],  # per clip: near misses at any threshold
    }


def _train(r: Recipe, base: Base, switches: dict, seed: int, run_dir: Path, clips) -> tuple[Path, dict]:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: the trainer would otherwise only add to it
    cfg = train_config(r, switches, seed, run_dir)
    t0 = time.perf_counter()
    result = Trainer(cfg, clips=clips, model=base.transformer(), run_dir=run_dir).train()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the LoRA files stay; optimizer states go
    last = result.history[-1]
    return result.relation_path, {"train_seconds": time.perf_counter() - t0, "final_loss": last["total"]}


def base_sanity(base: Base, r: Recipe) -> dict:
    """The base on the relations it was pretrained on, with the new subject pairs: does it know the world?"""
    model = base.transformer()
    pairs = new_pairs(r.pairs)
    acc = {}
    for rel in RELATIONS:
        if rel == r.target:
            continue
        summary = _summary(_generate(model, base, [(s1, s2, rel) for s1, s2 in pairs], [0], r))
        acc[rel] = {k: summary[k] for k in ("relation_accuracy", "relation_distance", "smooth_tracks")}
    return acc


def run_study(out_dir: str | Path, r: Recipe, seeds: int, cache_dir: Path | None = None,
              variants: list[str] | None = None, report: Callable[[str], None] = log.info,
              command: str = "") -> dict:
    """Run the study and write out_dir/ablation.json; returns its content."""
    t_start = time.perf_counter()
    torch.set_num_threads(r.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = judge.judge_check(r.shape, r.judge_clips)
    report(format_check(check))
    if not check["trustworthy"]:
        raise StudyError("the judge failed its check (see above); no study with an untrustworthy judge")
    report(f"base {r.base_hash()}: loading or pretraining ({r.pretrain_steps} steps)")
    base = get_base(r, cache_dir, lambda s, n, loss: report(f"pretrain {s}/{n} loss {loss:.4f}") if s % 200 == 0 else None)
    report(f"base ready ({'cached' if base.cached else 'pretrained'}; pretraining took {base.pretrain_seconds:.0f} s)")
    known = base_sanity(base, r)
    report("base on the relations it knows (new pairs; relation accuracy / distance / smooth tracks): " + ", ".join(
        f"{rel} {v['relation_accuracy']:.2f} / {v['relation_distance']:.2f} / {v['smooth_tracks']:.2f}"
        for rel, v in known.items()))
    pooling = denoising.temporal_pooling(base.transformer(), base.encode, r)
    report("base's temporal pooling (still subject found per frame, model / one noisy frame / noisy frames "
           "averaged): " + ", ".join(f"sigma {s}: {v['model']:.2f} / {v['one_frame']:.2f} / {v['frames_pooled']:.2f}"
                                   for s, v in pooling.items()))
    ex = exemplars(r.target, r.exemplars, r.shape, r.exemplar_seed, r.layouts)
    y, ym = base.encode([c.caption for c in ex])
    for c, f, m in zip(ex, y, ym):
        c.y_feat, c.y_mask = f, m
    prompts = [(s1, s2, r.target) for s1, s2 in new_pairs(r.pairs)]
    scored = denoising.held_out(r)  # the same rendered clips and draws for every variant
    base_errors = denoising.clip_errors(base.transformer(), base.encode, r, scored)
    results: dict[str, dict] = {}
    for name in variants or list(VARIANTS):
        switches = VARIANTS[name] if name in VARIANTS else EXTRA_VARIANTS[name]
        per_seed = []
        for seed in range(seeds):
            extra: dict = {}
            if switches is None:
                model = base.transformer()
            else:
                path, extra = _train(r, base, switches, seed, out_dir / "runs" / name / f"seed{seed}", ex)
                model = add_relation_lora(base.transformer(), load_lora_file(path))
            gen_seeds = [1000 * seed + g for g in range(r.gen_seeds)]
            row = {"seed": seed, **_summary(_generate(model, base, prompts, gen_seeds, r)),
                   **denoising.scores(model, base.encode, r, scored, base_errors), **extra}
            per_seed.append(row)
            report(f"{name} seed {seed}: relation {row['relation_accuracy']:.3f} distance "
                   f"{row['relation_distance']:.2f} text {row['text_alignment']:.3f} "
                   f"leakage {row['leakage']:.3f} judged {row['judged']}; denoising: relation AUC "
                   f"{row['relation_auc']:.3f} gain AUC {row['relation_gain_auc']:.3f} error change "
                   f"{row['error_change']:+.3f} leakage AUC {row['leakage_auc']:.3f}")
        stats = {m: mean_ci([s[m] for s in per_seed]) for m in METRICS}
        results[name] = {
            "switches": switches, "paper_relation_accuracy": PAPER_RELATION_ACCURACY.get(name), "seeds": per_seed,
            "mean": {m: v[0] for m, v in stats.items()}, "ci95": {m: v[1] for m, v in stats.items()},
        }
    out = {
        "command": command, "recipe": r.to_dict(), "seeds": seeds, "judge_check": check,
        "base": {"hash": r.base_hash(), "cached": base.cached, "pretrain_seconds": base.pretrain_seconds,
                 "final_loss": base.final_loss, "known_relations": known,
                 "temporal_pooling": pooling},
        "exemplars": [c.caption for c in ex], "prompts": [caption(s1, s2=s2, relation=rel) for s1, s2, rel in prompts],
        "variants": results, "orderings": orderings(results), "seconds": time.perf_counter() - t_start,
    }
    with atomic_path(out_dir / "ablation.json") as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    return out


def orderings(results: dict[str, dict]) -> dict[str, dict]:
    """The paper's orderings, checked on the means (and whether the 95 % intervals are apart)."""
    def cmp(a: str, b: str, metric: str, higher: bool) -> dict | None:
        if a not in results or b not in results or any(metric not in results[v]["mean"] for v in (a, b)):
            return None  # a variant, or a metric of an older result file, not there
        ma, mb = results[a]["mean"][metric], results[b]["mean"][metric]
        ca, cb = results[a]["ci95"][metric], results[b]["ci95"][metric]
        tie = 1e-6  # float32 shares computed twice are not bit-equal: a tie is not an ordering
        holds = ma > mb + tie if higher else ma < mb - tie
        apart = (ma - ca > mb + cb + tie) if higher else (ma + ca < mb - cb - tie)
        return {"metric": metric, "a": ma, "b": mb, "holds": bool(holds), "intervals_apart": bool(holds and apart)}

    checks = {
        "full > no_contrastive": cmp("full", "no_contrastive", "relation_accuracy", True),
        "full > no_hybrid_masks": cmp("full", "no_hybrid_masks", "relation_accuracy", True),
        "full (Q/K) > relation_on_v": cmp("full", "relation_on_v", "relation_accuracy", True),
        "full (Q/K) > relation_on_q": cmp("full", "relation_on_q", "relation_accuracy", True),
        "full > plain_lora": cmp("full", "plain_lora", "relation_accuracy", True),
        "full > base": cmp("full", "base", "relation_accuracy", True),
        "full leaks less than plain_lora": cmp("full", "plain_lora", "leakage", False),
        # the same on how near the samples come to the relation (cells; lower is nearer)
        "distance: full < no_contrastive": cmp("full", "no_contrastive", "relation_distance", False),
        "distance: full < no_hybrid_masks": cmp("full", "no_hybrid_masks", "relation_distance", False),
        "distance: full (Q/K) < relation_on_v": cmp("full", "relation_on_v", "relation_distance", False),
        "distance: full (Q/K) < relation_on_q": cmp("full", "relation_on_q", "relation_distance", False),
        "distance: full < plain_lora": cmp("full", "plain_lora", "relation_distance", False),
        "distance: full < base": cmp("full", "base", "relation_distance", False),
        # the same orderings on the denoising scores (docs/ablation.md "Denoising scores")
        "relation AUC: full > no_contrastive": cmp("full", "no_contrastive", "relation_auc", True),
        "relation AUC: full > no_hybrid_masks": cmp("full", "no_hybrid_masks", "relation_auc", True),
        "relation AUC: full (Q/K) > relation_on_v": cmp("full", "relation_on_v", "relation_auc", True),
        "relation AUC: full (Q/K) > relation_on_q": cmp("full", "relation_on_q", "relation_auc", True),
        "relation AUC: full > plain_lora": cmp("full", "plain_lora", "relation_auc", True),
        "relation AUC: full > base": cmp("full", "base", "relation_auc", True),
        "gain AUC: full > no_contrastive": cmp("full", "no_contrastive", "relation_gain_auc", True),
        "gain AUC: full > no_hybrid_masks": cmp("full", "no_hybrid_masks", "relation_gain_auc", True),
        "gain AUC: full (Q/K) > relation_on_v": cmp("full", "relation_on_v", "relation_gain_auc", True),
        "gain AUC: full (Q/K) > relation_on_q": cmp("full", "relation_on_q", "relation_gain_auc", True),
        "gain AUC: full > plain_lora": cmp("full", "plain_lora", "relation_gain_auc", True),
        "leakage AUC: full leaks less than plain_lora": cmp("full", "plain_lora", "leakage_auc", False),
    }
    return {k: v for k, v in checks.items() if v is not None}


def format_check(check: dict) -> str:
    acc = ", ".join(f"{k} {v:.2f}" for k, v in check["ground_truth_accuracy"].items())
    return (f"judge check ({check['clips_per_relation']} clips per relation): ground truth {acc}; "
            f"jittered ground truth {check['jittered_accuracy_mean']:.3f}; "
            f"shuffled frames accepted {check['shuffled_acceptance_mean']:.3f}, frozen actor accepted "
            f"{check['frozen_actor_acceptance_mean']:.3f}: {'trustworthy' if check['trustworthy'] else 'NOT trustworthy'}")


def table(result: dict) -> str:
    """Markdown table: per variant the means ± 95 % intervals beside the paper's relation accuracy."""
    lines = ["| variant | relation accuracy | distance (cells) | smooth tracks | text alignment | leakage | relation AUC | gain AUC "
             "| error change | leakage AUC | paper (relation accuracy) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        m, c = v["mean"], v["ci95"]
        cells = " | ".join(f"{m[k]:.3f} ± {c[k]:.3f}" for k in METRICS)
        paper = v["paper_relation_accuracy"]
        lines.append(f"| {name} | {cells} | {'—' if paper is None else f'{paper:.4f}'} |")
    return "\n".join(lines)
