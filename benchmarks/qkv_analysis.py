"""Q/K/V analysis: planted structure, and the time and memory of a full-size Mochi analysis.

1. Planted structure at Mochi's widths (visual W [3072, 3072], text W [3072, 1536]):
   K = Q O with O orthogonal shares Q's left singular vectors -> phi(q, k) = 1 at every i = j;
   independent random V -> phi(q, v) ~ max(i, j) / d. Prints measured / expected.
2. A full-size Mochi file in genmo/ComfyUI layout (all 879 tensors at their real shapes, 10.0B
   parameters, bf16 = 20 GB apparent size) whose attention weights qkv_x / qkv_y carry the same
   planted structure in every block. Only those tensors are written; the rest of the file is a
   hole (reads as zeros, takes no disk) because the analysis never reads it. `analyze-qkv` runs
   on it in a child process (the real CLI); wall time and the child's peak RSS are reported, and
   the JSON is checked against the planted values. `--fp8` does the same for an fp8-scaled file
   (weights e4m3fn + `scale_weight`). `--layers 0-3` analyses only those blocks of the full-size
   file (on a busy machine) and scales the time up to all blocks.

    python benchmarks/qkv_analysis.py [--blocks 48] [--layers all|0-3] [--fp8] [--dir /tmp/...] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamrelation_core.analysis.subspace import random_baseline, similarity_grid, singular_vectors  # noqa: E402
from fixtures.analysis_models import orthogonal  # noqa: E402

ST_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def planted(out: int, inp: int, g: torch.Generator, o: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    q = torch.randn(out, inp, generator=g) / inp**0.5
    k = q @ (o if o is not None else orthogonal(inp, g))
    v = torch.randn(out, inp, generator=g) / inp**0.5
    return q, k, v


def check_planted(sizes=(1, 8, 64, 256)) -> None:
    g = torch.Generator().manual_seed(0)
    print("1. planted structure (float32 SVD; ratio = measured / expected)")
    for label, (out, inp) in (("visual [3072, 3072]", (3072, 3072)), ("text   [3072, 1536]", (3072, 1536))):
        q, k, v = planted(out, inp, g)
        t = time.perf_counter()
        u = singular_vectors(torch.stack([q, k, v]), max(sizes))
        dt = time.perf_counter() - t
        qk, qv, kv = (similarity_grid(u[a], u[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
        print(f"  {label}  (batched SVD of 3: {dt:.1f} s; one matrix per value: at i = j = 1 phi(q, v) is a single "
              f"squared cosine, spread ~1.4 x its mean)")
        for i in sizes:
            base = random_baseline(i, i, out)
            print(f"    i=j={i:>3}: phi(q,k) {float(qk[i - 1, i - 1]):.6f} (expected 1)   "
                  f"phi(q,v) {float(qv[i - 1, i - 1]):.4f} ratio {float(qv[i - 1, i - 1]) / base:.2f}   "
                  f"phi(k,v) {float(kv[i - 1, i - 1]):.4f} ratio {float(kv[i - 1, i - 1]) / base:.2f}   (random {base:.4f})")
        for i, j in ((8, 64), (64, 256), (1, 256)):
            base = random_baseline(i, j, out)
            print(f"    i={i:>3}, j={j:>3}: phi(q,v) {float(qv[i - 1, j - 1]):.4f}, max(i,j)/d = {base:.4f}, "
                  f"ratio {float(qv[i - 1, j - 1]) / base:.2f}")


# ---------------------------------------------------------------------------------------------
# full-size sparse file


def mochi_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    """genmo/ComfyUI key -> shape of the full Mochi 1 DiT (from the diffusers model on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import MochiTransformer3DModel

    from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo

    with init_empty_weights():
        model = MochiTransformer3DModel(num_layers=blocks)
    return {k: tuple(v.shape) for k, v in diffusers_to_genmo(model.state_dict()).items()}


def write_sparse_mochi(path: Path, blocks: int, fp8: bool, seed: int = 0) -> tuple[int, float]:
    """Write the file; returns (apparent size, seconds). Attention q/k/v planted, the rest a hole."""
    t0 = time.perf_counter()
    shapes = mochi_shapes(blocks)
    header: dict = {"__metadata__": {"format": "pt"}}
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for k, s in shapes.items():
        wdtype = torch.float8_e4m3fn if fp8 and len(s) == 2 else torch.bfloat16
        layout[k] = (ST_DTYPE[wdtype], s)
        if fp8 and len(s) == 2:
            layout[k[: -len(".weight")] + ".scale_weight"] = ("F32", ())
    if fp8:
        layout["scaled_fp8"] = ("F8_E4M3", (0,))
    nbytes = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    offset = 0
    for k, (dt, s) in layout.items():
        n = nbytes[dt] * (int(torch.tensor(s).prod()) if s else 1)
        header[k] = {"dtype": dt, "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    g = torch.Generator().manual_seed(seed)
    o_x, o_y = orthogonal(3072, g), orthogonal(1536, g)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(base + offset)  # everything not written below stays a hole
        for b in range(blocks):
            for xy, (inp, o) in (("x", (3072, o_x)), ("y", (1536, o_y))):
                w = torch.cat(planted(3072, inp, g, o))  # [9216, inp] rows q, k, v
                key = f"blocks.{b}.attn.qkv_{xy}.weight"
                if fp8:
                    scale = w.abs().max() / 448.0
                    data = (w / scale).to(torch.float8_e4m3fn)
                    f.seek(base + header[key[:-7] + ".scale_weight"]["data_offsets"][0])
                    f.write(scale.float().reshape(()).numpy().tobytes())
                else:
                    data = w.to(torch.bfloat16)
                f.seek(base + header[key]["data_offsets"][0])
                f.write(data.contiguous().view(torch.uint8).numpy().tobytes())
    return base + offset, time.perf_counter() - t0


@dataclass
class ChildRun:
    wall: float  # seconds
    peak_rss: float  # GB, ru_maxrss: includes the pages of torch's shared libraries
    peak_anon: float  # GB, largest RssAnon seen (sampled every 50 ms): the process's own data


def run_child(cmd: list[str]) -> ChildRun:
    """Run `cmd` from the repository root; its wall time, peak RSS and peak anonymous memory."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = 0
    status_file = Path(f"/proc/{proc.pid}/status")
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}: {proc.stderr.read().decode()[-2000:]}")
    return ChildRun(wall, usage.ru_maxrss / 1024**2, peak_anon / 1024**2)  # KiB -> GB


def run_analysis(model: Path, out: Path, extra: list[str]) -> tuple[ChildRun, dict]:
    """`python -m dreamrelation_core analyze-qkv` on `model`: its ChildRun and the JSON it wrote."""
    run = run_child([sys.executable, "-m", "dreamrelation_core", "analyze-qkv", str(model), "--out", str(out), *extra])
    return run, json.loads((out / "qkv_similarity.json").read_text())


READ_ALL = """
import sys
from dreamrelation_core.analysis.weights import ROLES, WeightFile, detect_layout
wf = WeightFile(sys.argv[1])
for att in detect_layout(wf).attentions:
    ws = wf.read_many([att.ref(r) for r in ROLES])
"""


def report_json(js: dict) -> None:
    for branch, info in js["branches"].items():
        phi = info["phi"]
        base = info["random_baseline"]
        print(f"    {branch}: {info['layers']} layers, i=j={info['rank']}: phi(q,k) {phi['q-k']:.5f} (planted 1), "
              f"phi(q,v) {phi['q-v']:.4f} = {phi['q-v'] / base:.2f} x random, phi(k,v) {phi['k-v']:.4f} = "
              f"{phi['k-v'] / base:.2f} x random ({base:.4f}); layers per pair {info['layers_per_pair']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=48, help="blocks of the generated file (Mochi: 48)")
    ap.add_argument("--layers", default="all",
                    help="blocks analysed, e.g. 0-3 (default all); time is scaled up to --blocks when fewer")
    ap.add_argument("--fp8", action="store_true", help="also an fp8-scaled file")
    ap.add_argument("--dir", default="/tmp/dreamrelation_qkv_bench", help="where the files go")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--skip-planted", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    if not args.skip_planted:
        check_planted()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 1e9
    need = args.blocks * 9216 * 4608 * 2 / 1e9  # qkv_x + qkv_y per block, bf16
    print(f"\n2. full-size Mochi file, {args.blocks} blocks, in {work} ({free:.0f} GB free, ~{need:.1f} GB will be written)")
    blocks = list(range(args.blocks)) if args.layers == "all" else [b for b in _layers(args.layers) if b < args.blocks]
    extra = [] if args.layers == "all" else ["--layers", ",".join(map(str, blocks))]
    t = time.perf_counter()
    singular_vectors(torch.randn(3, 3072, 3072), 64)
    print(f"  calibration: one batched SVD of 3 x [3072, 3072] takes {time.perf_counter() - t:.1f} s on this machine now")
    variants = [("bf16", False)] + ([("fp8-scaled", True)] if args.fp8 else [])
    try:
        for label, fp8 in variants:
            model = work / f"mochi_full_{label}.safetensors"
            size, dt = write_sparse_mochi(model, args.blocks, fp8=fp8)
            print(f"  wrote {model.name}: {size / 1e9:.1f} GB apparent, {model.stat().st_blocks * 512 / 1e9:.1f} GB on "
                  f"disk (attention q/k/v only), {dt:.0f} s")
            read = run_child([sys.executable, "-c", READ_ALL, str(model)])
            print(f"  reading every q/k/v of all {args.blocks} blocks as float32 (no SVD): {read.wall:.0f} s, "
                  f"peak RSS {read.peak_rss:.2f} GB (own data {read.peak_anon:.2f} GB)")
            run, js = run_analysis(model, work / f"out_{label}", extra)
            per = run.wall / len(blocks)
            scaled = "" if len(blocks) == args.blocks else f" -> ~{per * args.blocks / 60:.0f} min for all {args.blocks} (scaled)"
            print(f"  analyze-qkv ({label}, {len(blocks)} of {args.blocks} blocks x visual+text): {run.wall:.0f} s wall, "
                  f"{per:.1f} s per block{scaled}; peak RSS {run.peak_rss:.2f} GB (own data {run.peak_anon:.2f} GB); "
                  f"load average now {os.getloadavg()[0]:.1f}")
            report_json(js)
            if not args.keep:
                model.unlink()
    finally:
        if not args.keep:
            for p in work.glob("*.safetensors"):
                p.unlink()
    base = run_child([sys.executable, "-c", "import torch"])
    print(f"\nreference: `python -c 'import torch'` alone: peak RSS {base.peak_rss:.2f} GB (own data {base.peak_anon:.2f} GB)")


def _layers(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


if __name__ == "__main__":
    main()
