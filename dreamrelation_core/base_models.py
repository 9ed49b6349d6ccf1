"""The base models the core trains on, by name, and which one a file, a model or a LoRA path is.

`TrainConfig.base_model` names one (`auto`: detected from the transformer file; the built-in
`tiny` test model is Mochi unless a base model is named). Specs come from each model's own
package (`mochi/spec.py`, `wan/spec.py`); see `basemodel.BaseModelSpec` for what they answer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .basemodel import BaseModelSpec
from .errors import ModelFileError


def _mochi() -> BaseModelSpec:
    from .mochi.spec import MOCHI

    return MOCHI


def _wan21() -> BaseModelSpec:
    from .wan.spec import WAN21

    return WAN21


def _wan22_5b() -> BaseModelSpec:
    from .wan.spec import WAN22_5B

    return WAN22_5B


# name -> spec factory (aliases included); imported on first use. Wan before Mochi: detection
# asks in this order, and both have `blocks.N.` keys.
_FACTORIES = {
    "wan2.1": _wan21,
    "wan2.1-1.3b": _wan21,
    "wan2.1-14b": _wan21,
    "wan2.2-a14b": _wan21,  # each expert is a Wan 2.1 14B architecture on the Wan 2.1 VAE
    "wan2.2-5b": _wan22_5b,
    "wan2.2-ti2v-5b": _wan22_5b,
    "mochi": _mochi,
    "mochi-1-preview": _mochi,
}
# adapter placements some base model knows (TrainConfig.lora_placement; each spec checks its own)
PLACEMENTS = ("default", "self_attention")
# relation adapter placements some base model knows (TrainConfig.relation_placement: "qk" is the
# method's, the others are ablations, docs/ablation.md; each spec checks its own)
RELATION_PLACEMENTS = ("qk", "q", "k", "v", "kv", "qkv")
# what TrainConfig.base_model and --base-model accept
NAMES = ("auto", "mochi", "mochi-1-preview", "wan2.1", "wan2.1-1.3b", "wan2.1-14b", "wan2.2-a14b", "wan2.2-5b")


def all_specs() -> list[BaseModelSpec]:
    out: list[BaseModelSpec] = []
    for f in _FACTORIES.values():
        s = f()
        if all(s is not o for o in out):
            out.append(s)
    return out


def get_spec(name: str = "mochi", placement: str | None = None) -> BaseModelSpec:
    """The spec of a base model name (see NAMES), with an adapter placement (None: its default);
    ValueError naming the known ones."""
    f = _FACTORIES.get(str(name).lower())
    if f is None:
        raise ValueError(f"base model {name!r} is not known; choose one of {sorted(set(NAMES) - {'auto'})} or auto")
    return f() if placement is None else f().with_placement(placement)


def file_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a .safetensors file (header only), or of a diffusers folder's weights."""
    from safetensors import safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    keys: list[str] = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys += list(h.keys())
        except Exception as e:
            raise ModelFileError(f"{f}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
    return keys


def detect_spec(path: str | os.PathLike, default: BaseModelSpec | None = None) -> BaseModelSpec:
    """The base model of a transformer file or diffusers folder, from its keys; `default` (if given)
    for a path that is missing, unreadable or of no known base model."""
    if default is not None:
        try:
            return detect_spec(path)
        except (ModelFileError, OSError, ValueError):
            return default
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        import json

        cls = json.loads((p / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
        for spec in all_specs():
            if spec.diffusers_class == cls:
                return spec
    keys = file_keys(p)
    for spec in all_specs():
        if spec.detect(keys):
            return spec.variant_of_file(p)
    raise ModelFileError(
        f"{path}: cannot tell which base model this is (first key {keys[0] if keys else None!r}); "
        f"set base_model to one of {sorted(set(NAMES) - {'auto'})}"
    )


def resolve_spec(base_model: str, transformer: str = "tiny", placement: str | None = None) -> BaseModelSpec:
    """`base_model` of a TrainConfig (auto: detected from `transformer`; tiny is Mochi)."""
    if base_model != "auto":
        spec = get_spec(base_model)
    elif transformer == "tiny":
        spec = get_spec("mochi")
    else:
        spec = detect_spec(transformer, default=get_spec("mochi"))  # Mochi's loader explains a bad file
    return spec if placement is None else spec.with_placement(placement)


def spec_of_model(model: torch.nn.Module) -> BaseModelSpec:
    """The spec of a diffusers transformer (by its class)."""
    for spec in all_specs():
        if spec.is_model(model):
            return spec
    raise TypeError(f"{type(model).__name__} is not a transformer of a known base model "
                    f"({', '.join(s.diffusers_class for s in all_specs())})")


def spec_of_module_path(path: str) -> BaseModelSpec:
    """The spec whose LoRA targets include this module path."""
    for spec in all_specs():
        try:
            spec.parse_module_path(path)
            return spec
        except ValueError:
            continue
    raise ValueError(f"not a LoRA target module path of any known base model: {path!r}")
