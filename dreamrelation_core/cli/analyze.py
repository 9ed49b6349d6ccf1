"""`analyze-qkv` and `analyze-lora`: the Q/K/V analysis of a base model and a relation LoRA's picture."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..dtypes import DTYPES
from .progress import progress_bar


def _int_list(text: str, what: str) -> list[int]:
    """"1,2,4" or "0-7,12" -> ints."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected numbers such as '1,2,4' or ranges such as '0-7'") from None
    return out


def _features(args: argparse.Namespace, model_file: str, lora_file: str | None, out: Path) -> dict[str, Path]:
    """Feature maps of one prepared clip, without (and with) the LoRA; model loaded from `model_file`."""
    import torch

    from ..analysis.features import feature_maps_with_lora, write_feature_report
    from ..base_models import detect_spec, get_spec
    from ..data.cache import load_clip
    from ..lora.files import load_lora_file

    clip = load_clip(args.clip)
    lora = load_lora_file(lora_file) if lora_file else None
    spec = detect_spec(model_file, default=get_spec("mochi"))  # Mochi or Wan, from the file
    model = spec.load_transformer(model_file, config_dir=args.config_dir or "", dtype=DTYPES[args.dtype]).to(args.device)
    z = clip.sample_latents(torch.Generator().manual_seed(args.seed))[None]
    maps = feature_maps_with_lora(
        model, lora, z, clip.y_feat[None], clip.y_mask[None], sigma=args.sigma, seed=args.seed, reduce=args.reduce
    )
    title = f"Q/K/V features ({args.reduce}) of {clip.name} at sigma {args.sigma:g}" + (f", LoRA {Path(lora_file).name}" if lora_file else "")
    return write_feature_report(maps, out, title=title)


def cmd_analyze_qkv(args: argparse.Namespace) -> int:
    from ..analysis.sweep import analyze_qkv, write_qkv_report

    out = Path(args.out)
    bar, update = progress_bar("analyze-qkv", "layer")
    try:
        analysis = analyze_qkv(
            args.model, rank=args.rank, sizes=_int_list(args.sizes, "--sizes"), side=args.side, device=args.device,
            branches=[b for b in args.branches.split(",") if b] if args.branches else None,
            layers=_int_list(args.layers, "--layers") if args.layers else None, progress=update,
        )
    finally:
        bar.close()
    paths = write_qkv_report(analysis, out)
    print(f"{analysis.family}: phi(i=j) averaged over layers ({args.side} singular vectors)")
    for branch, r in analysis.branches.items():
        vals = "  ".join(f"{p} {v:.3f}" if v is not None else f"{p} -" for p, v in analysis.summary()[branch].items())
        print(f"  {branch:>10} ({len(r.layers)} layers, i=j={r.rank}, random ~{r.rank / r.dim:.3f}): {vals}")
    if args.clip:
        paths.update(_features(args, args.model, None, out))
    for p in paths.values():
        print(f"wrote {p}")
    return 0


def cmd_analyze_lora(args: argparse.Namespace) -> int:
    from ..analysis.lora_report import analyze_lora, write_lora_report

    out = Path(args.out)
    bar, update = progress_bar("analyze-lora", "layer")
    try:
        report = analyze_lora(args.lora, args.base, rank=args.rank, side=args.side, device=args.device, progress=update)
    finally:
        bar.close()
    paths = write_lora_report(report, out)
    print(json.dumps(report.summary(), indent=2))
    if args.clip:
        paths.update(_features(args, args.base, args.lora, out))
    for p in paths.values():
        print(f"wrote {p}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--rank", type=int, default=64, help="i = j at which phi is reported (default 64)")
    p.add_argument("--side", choices=("left", "right"), default="left",
                   help="left: output-space singular vectors of the [out, in] weight (default, the paper's); right: input space")
    p.add_argument("--device", default="cpu", help="torch device for the SVDs (and the feature-map forward), e.g. cuda")
    g = p.add_argument_group("feature maps (one clip, one denoising step)")
    g.add_argument("--clip", help="a prepared clip (.safetensors from `prepare`): also write qkv_features.png")
    g.add_argument("--sigma", type=float, default=0.5, help="noise level of the step, 0..1 (default 0.5)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise and latent sample")
    g.add_argument("--reduce", choices=("mean", "norm"), default="mean",
                   help="per token: mean over channels (default, the paper's) or per-head L2 norm")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model precision for the forward")
    g.add_argument("--config-dir", help="local config folder for a diffusers single-file transformer")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze-qkv",
        help="subspace similarity of the Q/K/V weights of every attention layer (paper Fig. 5)",
        description="phi(i, j) = ||U_Ai^T U_Bj||_F^2 / min(i, j) between the q, k and v weights of every attention "
        "layer of a model file (Mochi, Wan, HunyuanVideo, diffusers-style models); writes qkv_similarity.json/.csv/.png.",
    )
    p.add_argument("model", help="model .safetensors (bf16 / fp16 / fp32 / fp8-scaled) or a folder of shards")
    _common(p)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512", help="i, j values of the heat map")
    p.add_argument("--branches", help="comma-separated branches to analyse (default all, e.g. visual,text)")
    p.add_argument("--layers", help="layer indices, e.g. 0-7,12 (default all)")
    p.set_defaults(func=cmd_analyze_qkv)
    p = sub.add_parser(
        "analyze-lora",
        help="a relation LoRA's picture: per block ||dW|| and its subspace similarity to the base Q/K/V",
        description="Per adapter module: ||dW||_F (dW = scale B A), relative to the base weight, and phi between "
        "dW and the base q, k, v of its block; writes lora_report.json/.csv/.png.",
    )
    p.add_argument("lora", help="our triplet / relation-only file, a reference checkpoint or a genmo-key Mochi LoRA")
    p.add_argument("--base", required=True, help="the Mochi base model file the LoRA belongs to (genmo or diffusers keys)")
    _common(p)
    p.set_defaults(func=cmd_analyze_lora)
