"""`ablation`: the synthetic-world study (docs/ablation.md): does the relation LoRA learn a relation
and leave appearance to the subject LoRAs? Judge check, base pretraining (cached), every variant
through the trainer, the LoRA files and the sampler; writes DIR/ablation.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path


def cmd_ablation(args: argparse.Namespace) -> int:
    import torch

    from ..ablation import judge, study
    from ..ablation.recipe import Recipe

    recipe = Recipe.quick() if args.quick else Recipe.full()
    if args.pretrain_steps:
        recipe = dataclasses.replace(recipe, pretrain_steps=args.pretrain_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.judge_check:
        torch.set_num_threads(recipe.threads)
        check = judge.judge_check(recipe.shape, recipe.judge_clips)
        print(study.format_check(check))
        (out / "judge_check.json").write_text(json.dumps(check, indent=1))
        return 0 if check["trustworthy"] else 1
    command = "python -m dreamrelation_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = study.run_study(out, recipe, args.seeds, Path(args.cache_dir) if args.cache_dir else None,
                             args.variants, report=lambda m: print(m, flush=True), command=command)
    print(study.table(result))
    print(f"wrote {out / 'ablation.json'} ({result['seconds']:.0f} s)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ablation",
        help="the paper's ablation in a synthetic world with an exact judge (CPU)",
        description="Check the exact judge, pretrain (or load the cached) small Mochi-class base on every relation "
        "but the target, train each ablation variant on the exemplars through the real trainer, sample new subject "
        "pairs and judge relation accuracy, text alignment and appearance leakage. Writes DIR/ablation.json.",
    )
    p.add_argument("--out", required=True, help="output folder (ablation.json, the variants' LoRA files)")
    p.add_argument("--quick", action="store_true", help="the whole chain at a tiny size (seconds; for CI)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per variant (default 3)")
    p.add_argument("--judge-check", action="store_true", help="only check the judge on ground truth and negatives; "
                   "exit 1 if it is not trustworthy")
    p.add_argument("--cache-dir", help="where the pretrained base is cached (default $DREAMRELATION_CACHE/ablation "
                   "or ~/.cache/dreamrelation/ablation)")
    p.add_argument("--pretrain-steps", type=int, default=0, help="pretraining steps of the base's first stage "
                   "(default: the recipe's; the second stage follows; each count is its own cache entry)")
    p.add_argument("--variants", nargs="+", choices=list(_variants()), help="run only these variants (default: the paper's, all but full_mask_weight_* and full_steps_x3)")
    p.set_defaults(func=cmd_ablation)


def _variants() -> list[str]:
    from ..ablation.study import EXTRA_VARIANTS, VARIANTS

    return [*VARIANTS, *EXTRA_VARIANTS]
