"""Attention Q/K/V weights of a video DiT, found by key pattern and read one slice at a time.

A model file (or a folder of safetensors shards) is indexed from its headers only; each weight
is read when asked for, as a row range of its tensor (`safe_open(...).get_slice(key)[r0:r1]`),
with the file opened for that read and closed after it, so mapped pages never pile up: the full
10B Mochi is analysed in a few hundred MB. Scaled fp8 files (ComfyUI's `*_fp8_scaled`) store
`<module>.scale_weight` beside each weight; the real weight is `weight.float() * scale_weight`.

Layouts recognised (after dropping ComfyUI's `model.diffusion_model.` / `diffusion_model.`):

| family | branch | q, k, v |
|---|---|---|
| Mochi, genmo / ComfyUI keys | visual, text | `blocks.N.attn.qkv_x` / `qkv_y`, rows split in thirds |
| Mochi, diffusers keys | visual, text | `transformer_blocks.N.attn1.to_q/to_k/to_v`, `add_q_proj/add_k_proj/add_v_proj` |
| Wan 2.1 / 2.2 (ComfyUI / original) | self, cross, cross_img | `blocks.N.self_attn.q/k/v`, `blocks.N.cross_attn.q/k/v`, `cross_attn.q/k_img/v_img` (i2v) |
| double/single stream (HunyuanVideo, Flux) | img, txt, single | `double_blocks.N.img_attn.qkv`, `txt_attn.qkv` (thirds), `single_blocks.N.linear1` (rows 0:H, H:2H, 2H:3H) |
| any other diffusers-style model | module path with `*` for indices | `<module>.to_q/to_k/to_v` (and `add_*_proj` as `<module>+added`) |

Mochi's last block discards its text queries (no `proj_y` / `to_add_out` there): its text `q` is
marked unused and left out of every pair with q.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import KeyLayoutError, ModelFileError, ModelFileNotFoundError

ROLES = ("q", "k", "v")
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# safetensors dtype names we can turn into float32 (fp8 included); packed formats (U8...) are not
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SCALE_SUFFIXES = ("scale_weight", "weight_scale")


@dataclass(frozen=True)
class TensorRef:
    """A weight in the file: its stored key and an optional row range [r0, r1)."""

    key: str
    rows: tuple[int, int] | None = None

    def describe(self) -> str:
        return self.key if self.rows is None else f"{self.key}[{self.rows[0]}:{self.rows[1]}]"


@dataclass(frozen=True)
class AttentionQKV:
    """Q, K and V of one attention layer of one branch."""

    branch: str
    layer: int
    name: str  # module path as the file names it (without ComfyUI prefix), for tables
    q: TensorRef
    k: TensorRef
    v: TensorRef
    unused: frozenset[str] = frozenset()  # roles whose output the model discards

    def ref(self, role: str) -> TensorRef:
        return {"q": self.q, "k": self.k, "v": self.v}[role]


@dataclass
class ModelLayout:
    family: str
    attentions: list[AttentionQKV] = field(default_factory=list)

    @property
    def branches(self) -> list[str]:
        seen: dict[str, None] = {}
        for a in self.attentions:
            seen.setdefault(a.branch, None)
        return list(seen)

    def layers(self, branch: str) -> list[AttentionQKV]:
        return [a for a in self.attentions if a.branch == branch]


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def strip_prefix(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


class WeightFile:
    """Header index of a safetensors file or folder of shards; reads weights on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = self._files(self.path)
        self.entries: dict[str, _Entry] = {}
        for f in self.files:
            self._index(f)
        # stripped name -> stored key (ComfyUI files carry a prefix)
        self.names: dict[str, str] = {strip_prefix(k): k for k in self.entries}

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if not path.exists():
            raise ModelFileNotFoundError(f"{path}: no such model file or folder")
        if path.is_dir():
            sub = path / "transformer"
            folder = sub if sub.is_dir() and not any(path.glob("*.safetensors")) else path
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelFileError(f"{path}: folder holds no .safetensors files (looked in {folder})")
            return files
        return [path]

    def _index(self, file: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    self.entries[k] = _Entry(file, tuple(int(n) for n in sl.get_shape()), sl.get_dtype())
        except Exception as e:  # not safetensors, truncated header
            raise ModelFileError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e

    def has(self, name: str) -> bool:
        return name in self.names

    def shape(self, name_or_key: str) -> tuple[int, ...]:
        return self.entries[self.names.get(name_or_key, name_or_key)].shape

    def ref_shape(self, ref: TensorRef) -> tuple[int, int]:
        shape = self.entries[ref.key].shape
        if ref.rows is None:
            return shape[0], shape[1]
        return ref.rows[1] - ref.rows[0], shape[1]

    def read(self, ref: TensorRef) -> torch.Tensor:
        return self.read_many([ref])[0]

    def read_many(self, refs: Iterable[TensorRef]) -> list[torch.Tensor]:
        """float32 weights [rows, in], scale applied; each file opened once for the batch."""
        refs = list(refs)
        out: dict[int, torch.Tensor] = {}
        by_file: dict[Path, list[int]] = {}
        for n, r in enumerate(refs):
            if r.key not in self.entries:
                raise KeyLayoutError(f"{self.path}: key {r.key!r} not in the file")
            by_file.setdefault(self.entries[r.key].file, []).append(n)
        for file, idx in by_file.items():
            with self._open(file) as f:
                for n in idx:
                    out[n] = self._read_one(f, refs[n])
        return [out[n] for n in range(len(refs))]

    @contextmanager
    def _open(self, file: Path) -> Iterator:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                yield f
        except FileNotFoundError as e:
            raise ModelFileNotFoundError(f"{file}: model file disappeared while reading ({e})") from e

    def _read_one(self, f, ref: TensorRef) -> torch.Tensor:
        entry = self.entries[ref.key]
        if entry.dtype not in FLOAT_DTYPES:
            raise ModelFileError(
                f"{entry.file}: {ref.key} is stored as {entry.dtype} {entry.shape} (a packed quantised format); "
                f"analyse a bf16 / fp16 / fp32 or fp8-scaled file"
            )
        if len(entry.shape) != 2:
            raise KeyLayoutError(f"{entry.file}: {ref.key} has shape {entry.shape}, expected a matrix [out, in]")
        sl = f.get_slice(ref.key)
        r0, r1 = ref.rows if ref.rows is not None else (0, entry.shape[0])
        w = sl[r0:r1].float()
        return w * self._scale(f, ref, entry, r0, r1)

    def _scale(self, f, ref: TensorRef, entry: _Entry, r0: int, r1: int) -> torch.Tensor | float:
        if not ref.key.endswith(".weight"):
            return 1.0
        module = ref.key[: -len(".weight")]
        for suffix in SCALE_SUFFIXES:
            key = f"{module}.{suffix}"
            if key not in self.entries:
                continue
            s = f.get_tensor(key).float()
            if s.numel() == 1:
                return s.reshape(())
            if s.numel() == entry.shape[0]:  # one scale per output row
                return s.reshape(-1)[r0:r1, None]
            raise KeyLayoutError(
                f"{entry.file}: {key} has shape {tuple(s.shape)}; expected a scalar or one value per row of "
                f"{ref.key} {entry.shape}"
            )
        return 1.0


# ---------------------------------------------------------------------------------------------
# layouts


def _thirds(wf: WeightFile, key: str) -> tuple[TensorRef, TensorRef, TensorRef]:
    rows = wf.entries[key].shape[0]
    if rows % 3:
        raise KeyLayoutError(f"{wf.path}: {key} {wf.entries[key].shape}: rows not divisible into q, k, v")
    d = rows // 3
    return TensorRef(key, (0, d)), TensorRef(key, (d, 2 * d)), TensorRef(key, (2 * d, 3 * d))


def _matches(wf: WeightFile, pattern: str) -> list[re.Match]:
    rx = re.compile(pattern)
    found = [m for n in wf.names if (m := rx.match(n))]
    return sorted(found, key=lambda m: (int(m.group(1)), m.group(0)))


def _last_without(wf: WeightFile, blocks: Iterable[int], fmt: str) -> set[int]:
    """Blocks lacking the text output projection while others have it (Mochi's last block)."""
    blocks = sorted(set(blocks))
    having = [b for b in blocks if wf.has(fmt.format(b))]
    return {b for b in blocks if b not in having} if having else set()


def _mochi_genmo(wf: WeightFile) -> list[AttentionQKV]:
    out = []
    ms = _matches(wf, r"^blocks\.(\d+)\.attn\.qkv_([xy])\.weight$")
    no_text_out = _last_without(wf, [int(m.group(1)) for m in ms], "blocks.{}.attn.proj_y.weight")
    for m in ms:
        block, xy = int(m.group(1)), m.group(2)
        q, k, v = _thirds(wf, wf.names[m.group(0)])
        unused = frozenset({"q"}) if xy == "y" and block in no_text_out else frozenset()
        out.append(AttentionQKV("visual" if xy == "x" else "text", block, m.group(0)[:-7], q, k, v, unused))
    return out


def _separate(wf: WeightFile, stem: str, names: tuple[str, str, str]) -> tuple[TensorRef, ...] | None:
    keys = [f"{stem}.{n}.weight" for n in names]
    if not all(wf.has(k) for k in keys):
        return None
    return tuple(TensorRef(wf.names[k]) for k in keys)


def _mochi_diffusers(wf: WeightFile) -> list[AttentionQKV]:
    out = []
    ms = _matches(wf, r"^transformer_blocks\.(\d+)\.attn1\.add_q_proj\.weight$")
    if not ms:
        return out
    blocks = [int(m.group(1)) for m in ms]
    no_text_out = _last_without(wf, blocks, "transformer_blocks.{}.attn1.to_add_out.weight")
    for b in blocks:
        stem = f"transformer_blocks.{b}.attn1"
        for branch, names in (("visual", ("to_q", "to_k", "to_v")), ("text", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            refs = _separate(wf, stem, names)
            if refs is not None:
                unused = frozenset({"q"}) if branch == "text" and b in no_text_out else frozenset()
                out.append(AttentionQKV(branch, b, stem, *refs, unused=unused))
    return out


def _wan(wf: WeightFile) -> list[AttentionQKV]:
    out = []
    found = _matches(wf, r"^blocks\.(\d+)\.(self_attn|cross_attn)\.q\.weight$")
    for m in sorted(found, key=lambda m: (int(m.group(1)), m.group(2) != "self_attn")):  # self first
        block, kind = int(m.group(1)), m.group(2)
        stem = f"blocks.{block}.{kind}"
        refs = _separate(wf, stem, ("q", "k", "v"))
        if refs is not None:
            out.append(AttentionQKV(kind.replace("_attn", ""), block, stem, *refs))
        img = _separate(wf, stem, ("q", "k_img", "v_img")) if kind == "cross_attn" else None
        if img is not None:
            out.append(AttentionQKV("cross_img", block, stem, *img))
    return out


def _double_single(wf: WeightFile) -> list[AttentionQKV]:
    out = []
    for m in _matches(wf, r"^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.weight$"):
        out.append(AttentionQKV(m.group(2), int(m.group(1)), m.group(0)[:-7], *_thirds(wf, wf.names[m.group(0)])))
    for m in _matches(wf, r"^single_blocks\.(\d+)\.linear1\.weight$"):
        key = wf.names[m.group(0)]
        rows, h = wf.entries[key].shape
        if rows < 3 * h:
            raise KeyLayoutError(f"{wf.path}: {key} {wf.entries[key].shape}: expected at least 3 x {h} rows (q, k, v, then the MLP)")
        q, k, v = (TensorRef(key, (n * h, (n + 1) * h)) for n in range(3))
        out.append(AttentionQKV("single", int(m.group(1)), m.group(0)[:-7], q, k, v))
    return out


_GENERIC_RE = re.compile(r"^(?P<module>.+)\.(?P<proj>to_q|add_q_proj)\.weight$")


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _generic(wf: WeightFile, claimed: set[str]) -> list[AttentionQKV]:
    """Separate to_q/to_k/to_v (and add_*_proj) projections under any module path with an index."""
    found: dict[str, list[tuple[str, tuple[TensorRef, ...]]]] = {}
    for name in sorted(wf.names, key=_natural):
        m = _GENERIC_RE.match(name)
        if m is None or wf.names[name] in claimed or not re.search(r"\.\d+(\.|$)", m.group("module")):
            continue
        module, added = m.group("module"), m.group("proj") == "add_q_proj"
        names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
        refs = _separate(wf, module, names)
        if refs is None:
            continue
        branch = re.sub(r"\.\d+(?=\.|$)", ".*", module) + ("+added" if added else "")
        found.setdefault(branch, []).append((module, refs))
    out = []
    for branch, mods in found.items():
        for n, (module, refs) in enumerate(mods):
            out.append(AttentionQKV(branch, n, module, *refs))
    return out


_FAMILIES = (
    ("mochi (genmo/ComfyUI keys)", _mochi_genmo),
    ("mochi (diffusers keys)", _mochi_diffusers),
    ("wan (ComfyUI keys)", _wan),
    ("double/single-stream DiT (HunyuanVideo/Flux keys)", _double_single),
)


def detect_layout(wf: WeightFile) -> ModelLayout:
    """Every attention layer whose Q, K and V the file exposes; ModelFileError if there is none."""
    families, attentions = [], []
    for family, find in _FAMILIES:
        found = find(wf)
        if found:
            families.append(family)
            attentions.extend(found)
    claimed = {r.key for a in attentions for r in (a.q, a.k, a.v)}
    generic = _generic(wf, claimed)
    if generic:
        families.append("generic (to_q/to_k/to_v keys)")
        attentions.extend(generic)
    if not attentions:
        sample = list(wf.names)[:5]
        raise ModelFileError(
            f"{wf.path}: no attention Q/K/V weights found among {len(wf.entries)} tensors (e.g. {sample}); "
            f"expected keys like 'blocks.0.attn.qkv_x.weight' (Mochi), 'blocks.0.self_attn.q.weight' (Wan), "
            f"'double_blocks.0.img_attn.qkv.weight' (HunyuanVideo) or '...0.attn1.to_q.weight' (diffusers)"
        )
    _check_shapes(wf, attentions)
    return ModelLayout(" + ".join(families), attentions)


def _check_shapes(wf: WeightFile, attentions: list[AttentionQKV]) -> None:
    for a in attentions:
        for role in ROLES:
            shape = wf.entries[a.ref(role).key].shape
            if len(shape) != 2:
                raise KeyLayoutError(f"{wf.path}: {a.ref(role).key} has shape {shape}, expected a matrix [out, in]")


def mochi_module_ref(wf: WeightFile, block: int, sub: str) -> TensorRef:
    """Base weight of a diffusers Mochi module path's last part (`to_q`, `add_v_proj`, `to_out.0`, ...)
    in this file, genmo or diffusers keys. KeyLayoutError naming the file if it is not there."""
    fused = {"to_q": ("x", 0), "to_k": ("x", 1), "to_v": ("x", 2),
             "add_q_proj": ("y", 0), "add_k_proj": ("y", 1), "add_v_proj": ("y", 2)}
    outs = {"to_out.0": "proj_x", "to_add_out": "proj_y"}
    diffusers = f"transformer_blocks.{block}.attn1.{sub}.weight"
    if wf.has(diffusers):
        return TensorRef(wf.names[diffusers])
    if sub in fused:
        xy, n = fused[sub]
        genmo = f"blocks.{block}.attn.qkv_{xy}.weight"
        if wf.has(genmo):
            return _thirds(wf, wf.names[genmo])[n]
    elif sub in outs:
        genmo = f"blocks.{block}.attn.{outs[sub]}.weight"
        if wf.has(genmo):
            return TensorRef(wf.names[genmo])
    else:
        genmo = f"(no genmo key for {sub!r})"
    raise KeyLayoutError(
        f"{wf.path}: no base weight for block {block} {sub}: neither {diffusers!r} nor {genmo!r}; "
        f"is this the Mochi the LoRA was trained on?"
    )
