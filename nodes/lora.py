"""Relation LoRA on ComfyUI's native Mochi and Wan: loader and export nodes.

The loader turns our LoRA (triplet, relation-only export, reference checkpoint or a genmo-key
Mochi LoRA) into the plain LoRA state dict ComfyUI reads for that base model (Mochi: Q and K
stacked into one LoRA per fused `qkv_x` / `qkv_y`, see `dreamrelation_core.lora.genmo`; Wan: one
LoRA per `self_attn` / `cross_attn` projection, see `dreamrelation_core.lora.comfy_export`) and
hands it to ComfyUI's own `comfy.sd.load_lora_for_models`: the patches live in the ModelPatcher,
so merging into the weights, low-VRAM loading, offloading, stacking with other LoRAs and
unpatching are ComfyUI's.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

from comfy_api.latest import io, ui

from dreamrelation_core.dtypes import DTYPES
from dreamrelation_core.errors import LoraFormatError
from dreamrelation_core.lora import comfy_export
from dreamrelation_core.lora import genmo as comfy_keys
from dreamrelation_core.lora.files import load_lora_file
from dreamrelation_core.lora.layout import INFERENCE_ADAPTERS, LoraSet

log = logging.getLogger("dreamrelation")

# model_options["transformer_options"][INFO_KEY]: list of RelationLoraInfo, read by the sampler patch.
INFO_KEY = "dreamrelation_relation_loras"


class RelationLoraInfo:
    """What a loader merged into a model: fused LoRAs (scale folded) and the strength used.

    ModelPatcher.clone() deep-copies model_options; this read-only record is shared instead.
    """

    def __init__(self, source: str, fused: dict[str, comfy_keys.FusedLora], strength: float):
        self.source = source
        self.fused = fused
        self.strength = float(strength)

    def __deepcopy__(self, memo: dict) -> RelationLoraInfo:
        return self


def _is_mochi(model) -> bool:
    import comfy.model_base

    return isinstance(getattr(model, "model", None), comfy.model_base.GenmoMochi)


def _is_wan(model) -> bool:
    import comfy.model_base

    return isinstance(getattr(model, "model", None), comfy.model_base.WAN21)  # WAN22 derives from it


def _wan_fused(lora: LoraSet, model, source: str) -> tuple[dict[str, comfy_keys.FusedLora], dict]:
    """Wan: ComfyUI module stem -> FusedLora (scale folded), checked against the model's weights; and
    the state dict ComfyUI's LoRA loader reads."""
    if lora.spec.family != "wan":
        raise LoraFormatError(f"{source}: a {lora.spec.name} LoRA does not fit ComfyUI's Wan (this MODEL)")
    sd = comfy_export.comfy_state_dict(lora, source=source)
    dm = model.model.diffusion_model
    fused = {}
    for key in sd:
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[len("diffusion_model."):-len(".lora_A.weight")]
        down, up = sd[key], sd[key.replace("lora_A", "lora_B")]
        try:
            weight = dm.get_submodule(stem).weight
        except AttributeError:
            raise LoraFormatError(f"{source}: key {key} targets {stem}, which the MODEL does not have (the LoRA has "
                                  f"{lora.num_blocks()} blocks, the MODEL {len(dm.blocks)})") from None
        if tuple(weight.shape) != (up.shape[0], down.shape[1]):
            raise LoraFormatError(f"{source}: key {stem}: LoRA delta is {[up.shape[0], down.shape[1]]} but the MODEL's "
                                  f"{stem}.weight is {list(weight.shape)}: the LoRA was made for another Wan size")
        fused[stem] = comfy_keys.FusedLora(down, up)
    return fused, sd


def _weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """genmo weight key (no `diffusion_model.` prefix) -> shape, for the attention weights."""
    dm = model.model.diffusion_model
    shapes = {}
    for i, block in enumerate(dm.blocks):
        for name in ("qkv_x", "qkv_y", "proj_x", "proj_y"):
            mod = getattr(block.attn, name, None)
            if mod is not None and getattr(mod, "weight", None) is not None:
                shapes[f"blocks.{i}.attn.{name}.weight"] = tuple(mod.weight.shape)
    return shapes


def _report(lora: LoraSet, source: str, strength: float, patched: int, model) -> str:
    kept = [a for a in INFERENCE_ADAPTERS if a in lora.weights]
    dropped = [a for a in lora.adapters if a not in kept]
    lines = [f"file: {Path(source).name} (format {lora.metadata.get('format', '?')})", f"strength: {strength:g}"]
    for a in kept:
        lines.append(f"applied {a}: {len(lora.weights[a])} modules, rank {lora.rank.get(a)}, "
                     f"alpha {lora.alpha.get(a)}, scale {lora.scales.get(a, 1.0):.4g}")
    if dropped:
        lines.append(f"dropped adapters: {', '.join(dropped)} (subject appearance; not used at inference)")
    if "report" in lora.metadata:
        extra = json.loads(lora.metadata["report"]).get("dropped", [])
        if extra:
            lines.append(f"dropped from file: {len(extra)}: " + "; ".join(extra[:4]) + (" ..." if len(extra) > 4 else ""))
    lines.append(f"blocks: {lora.num_blocks()} of the model's {len(model.model.diffusion_model.blocks)}; patched weights: {patched}")
    return "\n".join(lines)


def patch_model_with_relation_lora(model, lora: LoraSet, strength: float, source: str):
    """Return (patched clone of the ComfyUI MODEL `model`, report). Errors name the file, key and shapes.

    (`dreamrelation_core.generate.add_relation_lora` is the diffusers counterpart.)"""
    import comfy.sd

    if _is_wan(model):
        fused, sd = _wan_fused(lora, model, source)
    elif _is_mochi(model):
        if lora.spec.family != "mochi":
            raise LoraFormatError(f"{source}: a {lora.spec.name} LoRA does not fit ComfyUI's Mochi (this MODEL)")
        fused = comfy_keys.fused_loras(lora, source=source)
        comfy_keys.check_against_model(fused, _weight_shapes(model), source, model_name="the MODEL")
        sd = comfy_keys.comfy_state_dict(lora, source=source)
    else:
        kind = type(getattr(model, "model", model)).__name__
        raise ValueError(f"{source}: a relation LoRA applies to ComfyUI's Mochi (GenmoMochi) or Wan (WAN21 / WAN22); "
                         f"this MODEL is {kind}")
    # ComfyUI's own LoRA path (what LoraLoaderModelOnly calls): key map, load_lora, add_patches.
    new_model, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0)
    patched = len([k for k in new_model.patches if k not in model.patches or len(new_model.patches[k]) > len(model.patches[k])])
    if patched != len(fused):
        raise LoraFormatError(f"{source}: ComfyUI accepted {patched} of {len(fused)} LoRA weights for this MODEL")
    to = new_model.model_options.setdefault("transformer_options", {})
    to[INFO_KEY] = list(to.get(INFO_KEY, [])) + [RelationLoraInfo(source, fused, strength)]
    return new_model, _report(lora, source, strength, patched, model)


def _lora_list() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


# LoRA files read lately, by path, with their modification time: re-running a workflow with
# another strength or model does not read the file again, also with several loader nodes.
# Module-level because V3 nodes have no instance; a few entries, because a LoraSet can be large.
_READ_CACHE: OrderedDict[str, tuple[float, LoraSet]] = OrderedDict()
_READ_CACHE_SIZE = 4


def read_lora_cached(path: str) -> LoraSet:
    """The LoRA file at `path`, read again only when its modification time changed."""
    mtime = Path(path).stat().st_mtime
    hit = _READ_CACHE.get(path)
    if hit is not None and hit[0] == mtime:
        _READ_CACHE.move_to_end(path)
        return hit[1]
    lora = load_lora_file(path)
    _READ_CACHE[path] = (mtime, lora)
    _READ_CACHE.move_to_end(path)
    while len(_READ_CACHE) > _READ_CACHE_SIZE:
        _READ_CACHE.popitem(last=False)
    return lora


class RelationLoraLoader(io.ComfyNode):
    """MODEL + relation LoRA file -> MODEL with the relation + ffn LoRAs patched in."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationRelationLoraLoader",
            display_name="DreamRelation Relation LoRA Loader",
            category="DreamRelation/LoRA",
            description=("Apply a DreamRelation relation LoRA (relation + ffn; subject LoRAs dropped) to ComfyUI's "
                         "Mochi or Wan."),
            inputs=[
                io.Model.Input("model", tooltip="ComfyUI's Mochi or Wan diffusion model (Load Diffusion Model with a "
                                                "mochi_preview_dit or wan2.1 / wan2.2 file)."),
                io.Combo.Input("lora_name", options=_lora_list(), tooltip=(
                    "Relation LoRA from the models/loras folder: a DreamRelation triplet or relation-only "
                    ".safetensors, a reference model_<step>.lora.pt / .safetensors, or a genmo-key Mochi LoRA. "
                    "Subject LoRAs in it are never applied.")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the relation and ffn LoRAs (1 = as trained, 0 = base model)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the relation LoRA patched in "
                                                              "(ComfyUI merges it into the weights)."),
                io.String.Output(display_name="report", tooltip="What was applied and dropped: adapters, modules, "
                                                                "rank, scale, blocks."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        import folder_paths

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        patched, report = patch_model_with_relation_lora(model, read_lora_cached(path), strength, source=path)
        return io.NodeOutput(patched, report)


class ExportRelationLora(io.ComfyNode):
    """Write a relation LoRA as a plain genmo-key Mochi LoRA for stock LoRA loaders."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationExportRelationLora",
            display_name="DreamRelation Export Relation LoRA",
            category="DreamRelation/LoRA",
            description=("Export the relation + ffn LoRAs as a standard LoRA for its base model (Mochi: genmo keys; "
                         "Wan: diffusion_model.blocks.N.self_attn.q keys) that ComfyUI's stock LoraLoaderModelOnly "
                         "loads without this pack."),
            is_output_node=True,
            inputs=[
                io.Combo.Input("lora_name", options=_lora_list(),
                               tooltip="DreamRelation triplet / relation-only file or reference checkpoint to convert."),
                io.String.Input("filename", default="relation_mochi",
                                tooltip="Output name in the first models/loras folder (.safetensors is added)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Precision written: bf16 halves the size, fp32 is exact."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[
                io.String.Output(display_name="path", tooltip="Path of the written LoRA; load it with LoraLoaderModelOnly."),
            ],
        )

    @classmethod
    def execute(cls, lora_name: str, filename: str, dtype: str, overwrite: bool) -> io.NodeOutput:
        import folder_paths

        src = folder_paths.get_full_path_or_raise("loras", lora_name)
        name = Path(filename.strip()).name
        if not name:
            raise ValueError("filename is empty")
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        out = Path(folder_paths.get_folder_paths("loras")[0]) / name
        if out.resolve() == Path(src).resolve():
            raise ValueError(f"{out}: would overwrite its own input {lora_name}")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; choose another filename or set overwrite")
        lora = load_lora_file(src)
        written = comfy_export.save_comfy_lora(out, lora, dtype=DTYPES[dtype], source=src)
        log.info("DreamRelation: exported %s -> %s", src, written)
        return io.NodeOutput(str(written), ui=ui.PreviewText(str(written)))


NODES: list[type[io.ComfyNode]] = [RelationLoraLoader, ExportRelationLora]
