"""Analysis nodes (V3 schema): the Q/K/V subspace similarity of a model file (paper Figure 5) and a
relation LoRA's picture, each shown as an IMAGE with a text summary.

Both read the weights tensor by tensor from the file on disk (no model is loaded into ComfyUI's
memory management); the SVDs run on ComfyUI's torch device. The full report (JSON, CSV, PNG) is
also written to `output/dreamrelation_analysis/<name>/` when `save_report` is on.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from comfy_api.latest import io, ui

CATEGORY = "DreamRelation/analysis"
REPORT_FOLDER = "dreamrelation_analysis"


def _choices(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(folder)


def _stamp(folder: str, name: str) -> str:
    """Re-run when the file changes, not only when its name does."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    return f"{name}|{os.path.getmtime(path) if path and os.path.exists(path) else 'missing'}"


def _progress():
    import comfy.utils

    bar: list = []

    def update(done: int, total: int, _label: str) -> None:
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)  # also where a user's cancel surfaces

    return update


def _out_dir(save: bool, name: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    import folder_paths

    if save:
        return Path(folder_paths.get_output_directory()) / REPORT_FOLDER / name, None
    tmp = tempfile.TemporaryDirectory(prefix="dreamrelation_analysis_")
    return Path(tmp.name), tmp


def _device() -> str:
    import comfy.model_management as mm

    return str(mm.get_torch_device())


class DreamRelationQKVAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationQKVAnalysis",
            display_name="DreamRelation Q/K/V Analysis",
            category=CATEGORY,
            description="Subspace similarity phi(i, j) between the Q, K and V weights of every attention layer of a "
            "video model file (Mochi, Wan, HunyuanVideo), averaged over layers: the paper's Figure 5.",
            is_output_node=True,
            inputs=[
                io.Combo.Input("model_name", options=_choices("diffusion_models"),
                               tooltip="A model file in models/diffusion_models (bf16, fp16, fp32 or fp8-scaled), read "
                               "one tensor at a time, never loaded whole."),
                io.Int.Input("rank", default=64, min=1, max=4096,
                             tooltip="The i = j at which phi is reported per branch and pair (the paper: 64)."),
                io.Combo.Input("side", options=["left", "right"], default="left",
                               tooltip="'left': output-space singular vectors of each [out, in] weight (the paper's "
                               "choice). 'right': input space (which features each projection reads)."),
                io.Boolean.Input("save_report", default=True,
                                 tooltip="Also write qkv_similarity.json/.csv/.png to "
                                 "output/dreamrelation_analysis/<model>/."),
            ],
            outputs=[
                io.Image.Output("heat_map", tooltip="Heat maps of phi(i, j), one row per branch, one panel per pair."),
                io.String.Output("summary", tooltip="Layer-averaged phi(rank, rank) per branch and pair."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str, rank: int, side: str, save_report: bool) -> str:
        return f"{_stamp('diffusion_models', model_name)}|{rank}|{side}|{save_report}"

    @classmethod
    def execute(cls, model_name: str, rank: int, side: str, save_report: bool) -> io.NodeOutput:
        import folder_paths

        from dreamrelation_core.analysis.plots import png_to_image_tensor
        from dreamrelation_core.analysis.sweep import analyze_qkv, write_qkv_report

        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        analysis = analyze_qkv(path, rank=rank, side=side, device=_device(), progress=_progress())
        out, tmp = _out_dir(save_report, Path(model_name).stem)
        try:
            paths = write_qkv_report(analysis, out)
            image = png_to_image_tensor(paths["png"])
        finally:
            if tmp is not None:
                tmp.cleanup()
        lines = [f"{Path(model_name).name}: {analysis.family} ({side} singular vectors)"]
        for branch, r in analysis.branches.items():
            vals = ", ".join(f"{p} {v:.3f}" if v is not None else f"{p} -" for p, v in analysis.summary()[branch].items())
            lines.append(f"{branch}: {len(r.layers)} layers, phi({r.rank},{r.rank}) {vals} (random ~{r.rank / r.dim:.3f})")
        if save_report:
            lines.append(f"report: {out}")
        return io.NodeOutput(image, "\n".join(lines), ui=ui.PreviewImage(image, cls=cls))


class DreamRelationLoraAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationLoraAnalysis",
            display_name="DreamRelation LoRA Analysis",
            category=CATEGORY,
            description="A relation LoRA's picture: per block the norm of each adapter's weight change and how much "
            "of it lies in the base model's Q, K and V subspaces (where relation vs subject learning went).",
            is_output_node=True,
            inputs=[
                io.Combo.Input("lora_name", options=_choices("loras"),
                               tooltip="A relation LoRA in models/loras: our triplet or relation-only file, a reference "
                               "checkpoint, or a genmo-key Mochi LoRA."),
                io.Combo.Input("model_name", options=_choices("diffusion_models"),
                               tooltip="The Mochi base model file the LoRA was trained on."),
                io.Int.Input("rank", default=64, min=1, max=4096,
                             tooltip="Number of base singular vectors each adapter's weight change is compared with."),
                io.Combo.Input("side", options=["left", "right"], default="left",
                               tooltip="'left': output space (the default). 'right': input space."),
                io.Boolean.Input("save_report", default=True,
                                 tooltip="Also write lora_report.json/.csv/.png to output/dreamrelation_analysis/<lora>/."),
            ],
            outputs=[
                io.Image.Output("picture", tooltip="Adapter norms per block and mean similarity to the base Q/K/V."),
                io.String.Output("summary", tooltip="Per adapter: modules, mean norm, mean phi to the base q, k and v."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, model_name: str, rank: int, side: str, save_report: bool) -> str:
        return f"{_stamp('loras', lora_name)}|{_stamp('diffusion_models', model_name)}|{rank}|{side}|{save_report}"

    @classmethod
    def execute(cls, lora_name: str, model_name: str, rank: int, side: str, save_report: bool) -> io.NodeOutput:
        import folder_paths

        from dreamrelation_core.analysis.lora_report import analyze_lora, write_lora_report
        from dreamrelation_core.analysis.plots import png_to_image_tensor

        lora = folder_paths.get_full_path_or_raise("loras", lora_name)
        base = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        report = analyze_lora(lora, base, rank=rank, side=side, device=_device(), progress=_progress())
        out, tmp = _out_dir(save_report, Path(lora_name).stem)
        try:
            image = png_to_image_tensor(write_lora_report(report, out)["png"])
        finally:
            if tmp is not None:
                tmp.cleanup()
        lines = [f"{Path(lora_name).name} on {Path(model_name).name} ({side} singular vectors, base rank {rank})"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        for adapter, s in report.summary().items():
            phi = s["mean_phi"]
            lines.append(f"{adapter}: {s['modules']} modules, mean |dW| {s['mean_norm']:.4g} "
                         f"({100 * s['mean_rel_norm']:.2f}% of base), phi q {fmt(phi['q'])} k {fmt(phi['k'])} "
                         f"v {fmt(phi['v'])} own {fmt(phi['self'])}")
        lines.append(f"random subspaces: ~{report.random_baseline():.3f}")
        if save_report:
            lines.append(f"report: {out}")
        return io.NodeOutput(image, "\n".join(lines), ui=ui.PreviewImage(image, cls=cls))


NODES: list[type[io.ComfyNode]] = [DreamRelationQKVAnalysis, DreamRelationLoraAnalysis]
