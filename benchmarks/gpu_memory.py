"""Training memory and speed on one CUDA GPU: measured peak vs the estimator, per option set.

For each option set (bf16; fp8; fp8 + N blocks swapped; fp8 + swap + offloaded activations; the
Train node's `auto` on a card capped at 16 GiB) one process trains a few steps of the real Trainer
on a random Mochi of full width (3072 / 1536, 24 heads) and reduced depth (--layers, default 8)
with one random clip of 61x480x848 token counts (17,490 video + 256 text tokens), and prints:
s/step (median after the first step), peak allocated and reserved GiB, the estimator's peak for the
same depth and options, their ratio, the memory outside the caching allocator (CUDA context,
kernels), the estimate extrapolated to Mochi's 48 blocks, the host RSS peak, and whether swap /
offload give the same losses as the plain fp8 run (relative tolerance 1e-3 on each step's loss:
flash attention's backward accumulates with atomics on CUDA, so bit-identity is not expected).
These are the figures that calibrate `estimate.Margin` and `estimate.StepTimeModel`.

Each case runs in its own process (clean peak statistics, an out-of-memory stays in its case)
under a time limit; the whole run stays within --budget seconds (default 450: under 8 minutes).
Without CUDA it refuses; `--dry-run` runs the same cases in-process on the CPU with a tiny model
(no GPU figures: it proves the script runs, and a test runs it).

    python benchmarks/gpu_memory.py [--layers 8] [--swap 4] [--steps 3] [--budget 450]
    python benchmarks/gpu_memory.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

GIB = 1024**3
CASES = {
    "bf16": dict(base_dtype="bf16"),
    "fp8": dict(base_dtype="fp8"),
    "fp8_swap": dict(base_dtype="fp8", swap=True),
    "fp8_swap_offload": dict(base_dtype="fp8", swap=True, offload=True),
    "auto16": dict(auto=True, budget_gib=16.0),
}
AGREE = [("fp8", "fp8_swap"), ("fp8", "fp8_swap_offload")]
LOSS_RTOL = 1e-3
# the dry run: a tiny Mochi and clip on the CPU (shapes only; no GPU figures)
DRY = dict(config=dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, pooled_projection_dim=32,
                       text_embed_dim=32, time_embed_dim=32, max_sequence_length=16), frames=7, size=(32, 32), text_len=16)


# ---------------------------------------------------------------------------------------------
# model and clip


def random_mochi(config: dict, storage: str, device: str):
    """MochiTransformer3DModel of `config` with random weights, every Linear a FrozenLinear stored in
    `storage` (bf16 or fp8 with a per-tensor scale) on the CPU, the rest bf16 (fp32 for a CPU run,
    which has no autocast); the random numbers are drawn on `device` (fast on a GPU) one Linear at a
    time."""
    import torch
    from diffusers import MochiTransformer3DModel
    from torch import nn

    from dreamrelation_core.mochi import fp8

    with torch.device("meta"):
        model = MochiTransformer3DModel(**config)
    rest = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    for name in [n for n, m in model.named_modules() if type(m) is nn.Linear]:
        lin = model.get_submodule(name)
        w = torch.randn(lin.weight.shape, device=device, generator=g) / math.sqrt(lin.in_features)
        bias = None if lin.bias is None else torch.zeros(lin.out_features, dtype=rest)
        dtype = torch.float8_e4m3fn if storage == "fp8" else torch.bfloat16
        new = fp8.FrozenLinear.from_weight(w, None, dtype)
        fp8._set_module(model, name, fp8.FrozenLinear(new.weight.data.cpu(), bias,
                                                      None if new.scale_weight is None else new.scale_weight.cpu()))
        del w, new
    gc = torch.Generator().manual_seed(1)
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                fill = torch.ones(p.shape) if "norm" in type(mod).__name__.lower() or pname == "weight" and p.ndim == 1 \
                    else 0.02 * torch.randn(p.shape, generator=gc)
                mod._parameters[pname] = nn.Parameter(fill.to(rest), requires_grad=False)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                mod._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype)
    return model.eval()


def random_clip(frames: int, height: int, width: int, text_len: int, text_dim: int):
    import torch

    from dreamrelation_core.data.cache import PreparedClip
    from dreamrelation_core.training.memory.estimate import latent_shape

    t, h, w = latent_shape(frames, height, width)
    g = torch.Generator().manual_seed(2)
    m1, m2 = torch.zeros(t, h, w), torch.zeros(t, h, w)
    m1[:, : h // 2, : w // 2], m2[:, h // 2:, w // 2:] = 1, 1
    return PreparedClip(name="bench", caption="", mean=torch.randn(12, t, h, w, generator=g),
                        logvar=torch.full((12, t, h, w), -4.0), y_feat=torch.randn(text_len, text_dim, generator=g),
                        y_mask=torch.ones(text_len, dtype=torch.bool), mask1=m1, mask2=m2)


# ---------------------------------------------------------------------------------------------
# one case


def _rss_peak_gib() -> float | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return None


class _CappedCard:
    """A card of `budget_gib`: the allocator capped there and the free memory the policy reads
    reduced to match (the only way to see `auto` choose for a 16 GiB card on a larger GPU)."""

    def __init__(self, budget_gib: float):
        self.budget = budget_gib * GIB

    def __enter__(self):
        import torch

        free, total = torch.cuda.mem_get_info()
        self.real, used = torch.cuda.mem_get_info, total - free
        limit = max(self.budget - used, 0)
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
        torch.cuda.mem_get_info = lambda device=None: (int(limit - torch.cuda.memory_reserved()), int(self.budget))
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.mem_get_info = self.real


def run_case(name: str, args, dry: bool) -> dict:
    import torch

    from dreamrelation_core.training.config import TrainConfig
    from dreamrelation_core.training.memory.estimate import MochiDims, estimate_latent, latent_shape
    from dreamrelation_core.training.trainer import Trainer

    spec = CASES[name]
    cuda = not dry
    device = "cuda" if cuda else "cpu"
    config = dict(DRY["config"]) if dry else dict(num_layers=48 if spec.get("auto") else args.layers)
    frames, (height, width) = (DRY["frames"], DRY["size"]) if dry else (args.frames, args.size)
    text_len = DRY["text_len"] if dry else 256
    dims = MochiDims.from_config(config)
    res: dict = {"case": name, "layers": dims.layers, "status": "error"}
    try:
        if cuda:
            torch.zeros(1, device="cuda")
            free0, total = torch.cuda.mem_get_info()
            res["gpu"], res["context_gib"] = torch.cuda.get_device_name(), (total - free0) / GIB
        t0 = time.perf_counter()
        model = random_mochi(config, "fp8" if spec.get("auto") else spec["base_dtype"], device)
        clip = random_clip(frames, height, width, text_len, dims.text_embed_dim)
        res["build_s"] = time.perf_counter() - t0
        if spec.get("auto"):
            opts = dict(base_dtype="auto", blocks_to_swap="auto", gradient_checkpointing=True, offload_activations="auto")
        else:
            swap = min(args.swap, dims.layers) if spec.get("swap") else 0
            opts = dict(base_dtype=spec["base_dtype"], blocks_to_swap=swap, gradient_checkpointing=True,
                        offload_activations=bool(spec.get("offload")))
        run_dir = Path(args.out) / f"run_{name}"
        cfg = TrainConfig(output_dir=str(run_dir), num_steps=10**6, warmup_steps=0, checkpoint_every=10**6, rank=16,
                          alpha=16.0, learning_rate=1e-4, device=device, seed=0, **opts)
        cap = _CappedCard(spec["budget_gib"]) if spec.get("auto") and cuda else None
        if cap:
            cap.__enter__()
        try:
            trainer = Trainer(cfg, clips=[clip], model=model, run_dir=run_dir)
        finally:
            if cap:
                cap.__exit__()
        del model
        res["options"] = trainer.memory.options.label()
        latent = latent_shape(frames, height, width)
        if trainer.memory.options.base_dtype in ("bf16", "fp8"):
            res["est_gib"] = estimate_latent(latent, trainer.memory.options, dims).peak_gib
            res["est48_gib"] = estimate_latent(latent, trainer.memory.options, MochiDims.from_config(
                {k: v for k, v in config.items() if k != "num_layers"})).peak_gib
        losses, times = [], []
        if cuda:
            torch.cuda.synchronize()
        for step in range(args.steps):
            if cuda and step == 1:  # peaks after a first step: AdamW's state exists, as the estimate assumes
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            _, loss = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss["total"])
        res["losses"], res["step_s"] = losses, times
        res["s_per_step"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
        if cuda:
            free, total = torch.cuda.mem_get_info()
            res["alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            res["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            res["outside_gib"] = (total - free - torch.cuda.memory_reserved()) / GIB
        res["rss_gib"] = _rss_peak_gib()
        res["status"] = "ok"
    except BaseException as e:  # noqa: B036 - one case's failure is its result
        res["status"] = "OOM" if "out of memory" in str(e).lower() else "error"
        res["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
    return res


# ---------------------------------------------------------------------------------------------
# report


def _f(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(rows: dict[str, dict], dry: bool) -> str:
    first = next((r for r in rows.values() if r.get("gpu")), {})
    out = [f"GPU: {first.get('gpu', 'none (dry run on the CPU: no GPU figures)')}; "
           f"CUDA context before work: {_f(first.get('context_gib'))} GiB", "",
           "| case | options | blocks | status | s/step | allocated | reserved | estimate | alloc/est | "
           "reserved/alloc | outside allocator | estimate @48 | host RSS |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        alloc, res_, est = r.get("alloc_gib"), r.get("reserved_gib"), r.get("est_gib")
        out.append("| " + " | ".join([
            name, r.get("options", "-"), str(r.get("layers", "-")), r["status"], _f(r.get("s_per_step")), _f(alloc),
            _f(res_), _f(est), _f(alloc / est if alloc and est else None, "{:.3f}"),
            _f(res_ / alloc if alloc and res_ else None, "{:.3f}"), _f(r.get("outside_gib")), _f(r.get("est48_gib")),
            _f(r.get("rss_gib")),
        ]) + " |")
    out.append("")
    for ref, other in AGREE:
        a, b = rows.get(ref, {}), rows.get(other, {})
        if a.get("status") != "ok" or b.get("status") != "ok":
            out.append(f"{other} vs {ref}: not comparable ({a.get('status', 'not run')} / {b.get('status', 'not run')})")
            continue
        worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["losses"], b["losses"]))
        verdict = "agree" if worst <= LOSS_RTOL else "DIFFER"
        out.append(f"{other} vs {ref}: losses {verdict} (largest relative difference {worst:.2e}, tolerance {LOSS_RTOL:g})")
    for name, r in rows.items():
        if r.get("error"):
            out.append(f"{name}: {r['error']}")
    out.append("")
    out.append("GiB. estimate: the estimator at the same depth; alloc/est calibrates it; reserved/alloc and "
               "'outside allocator' calibrate estimate.Margin (fragmentation; context + workspaces); estimate @48: "
               "Mochi's 48 blocks; s/step calibrates estimate.StepTimeModel.")
    if dry:
        out.append("DRY RUN: tiny model on the CPU; no GPU figures.")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="transformer blocks of the measured model (auto16: 48)")
    ap.add_argument("--swap", type=int, default=4, help="blocks swapped in the swap cases")
    ap.add_argument("--frames", type=int, default=61)
    ap.add_argument("--size", type=_size, default=(480, 848))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default=None, help="folder for the runs and per-case JSON (default: a temporary one)")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, in-process: proves the script runs")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, write its JSON
    args = ap.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="gpu_memory_")
    import torch

    if args.case:
        res = run_case(args.case, args, dry=False)
        Path(args.out, f"{args.case}.json").write_text(json.dumps(res))
        return 0 if res["status"] == "ok" else 1
    if args.dry_run:
        args.steps = min(args.steps, 2)
        rows = {name: run_case(name, args, dry=True) for name in args.cases}
        print(report(rows, dry=True))
        return 0 if all(r["status"] == "ok" for r in rows.values()) else 1
    if not torch.cuda.is_available():
        print("benchmarks/gpu_memory.py needs a CUDA GPU (torch sees none); --dry-run runs its cases on the CPU "
              "with a tiny model, without GPU figures", file=sys.stderr)
        return 2
    start, rows = time.monotonic(), {}
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}  # the worker's own allocator
    for name in args.cases:
        left = args.budget - (time.monotonic() - start) - 10
        if left < 40:
            rows[name] = {"case": name, "status": "skipped (time budget)"}
            continue
        cmd = [sys.executable, __file__, "--case", name, "--out", args.out, "--layers", str(args.layers),
               "--swap", str(args.swap), "--frames", str(args.frames), "--size", f"{args.size[0]}x{args.size[1]}",
               "--steps", str(args.steps)]
        print(f"== {name} (limit {min(left, 180):.0f} s)", flush=True)
        try:
            subprocess.run(cmd, env=env, timeout=min(left, 180), check=False)
        except subprocess.TimeoutExpired:
            rows[name] = {"case": name, "status": "timeout"}
            continue
        path = Path(args.out, f"{name}.json")
        rows[name] = json.loads(path.read_text()) if path.is_file() else {"case": name, "status": "crashed"}
    print(report(rows, dry=False))
    print(f"(per-case JSON in {args.out}; total {time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
