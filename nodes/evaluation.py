"""DreamRelation Score Clip: the evaluation metrics of one generated clip, inside ComfyUI (V3 schema).

CLIP-T and temporal consistency with a CLIP from `models/clip_vision/` (a single file such as
ComfyUI's clip_vision files, or a Hugging Face CLIP folder there); relation accuracy with a local
vision-language model folder in `models/vlm/` (registered here where missing); appearance leakage
against a folder of training exemplar videos. Everything is read from local files.

A clip_vision file holds only CLIP's image tower: turn `compute_clip_t` off to score temporal consistency
and leakage with it. A single CLIP file with a text tower uses ComfyUI's own CLIP tokenizer
(comfy/sd1_tokenizer, the BPE of OpenAI's and open_clip's CLIP).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from comfy_api.latest import io, ui

NONE = "none"
VLM_FOLDER = "vlm"
_CLIP_CACHE: dict[tuple, object] = {}  # one CLIP, kept on the CPU between runs


def _register_vlm_folder() -> None:
    import folder_paths

    if VLM_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[VLM_FOLDER] = ([os.path.join(folder_paths.models_dir, VLM_FOLDER)], {".json"})


def _hf_folders(name: str) -> list[str]:
    import folder_paths

    found = []
    for base in folder_paths.get_folder_paths(name):
        if os.path.isdir(base):
            found += sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "config.json")))
    return found


def clip_choices() -> list[str]:
    import folder_paths

    hf = _hf_folders("clip_vision")
    files = [f for f in folder_paths.get_filename_list("clip_vision") if f.replace("\\", "/").split("/")[0] not in hf]
    return [NONE, *files, *hf]


def judge_choices() -> list[str]:
    _register_vlm_folder()
    return [NONE, *_hf_folders(VLM_FOLDER)]


def _resolve(folder_name: str, name: str) -> Path:
    import folder_paths

    for base in folder_paths.get_folder_paths(folder_name):
        p = Path(base) / name
        if p.exists():
            return p
    from dreamrelation_core.errors import ModelFileNotFoundError

    raise ModelFileNotFoundError(f"{folder_name} model {name!r} not found in "
                                 f"{', '.join(folder_paths.get_folder_paths(folder_name))}")


def _clip(name: str):
    import comfy.sd1_clip

    from dreamrelation_core.evaluation.clip_metrics import load_clip

    path = _resolve("clip_vision", name)
    key = (str(path), path.stat().st_mtime)
    if key not in _CLIP_CACHE:
        _CLIP_CACHE.clear()
        # ComfyUI ships the CLIP BPE beside its SD1 text encoder
        tokenizer = Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer" if path.is_file() else None
        _CLIP_CACHE[key] = load_clip(path, tokenizer_dir=tokenizer)
    return _CLIP_CACHE[key]


def _frames(images):
    """ComfyUI IMAGE [F, H, W, C] floats in [0, 1] -> uint8 numpy [F, H, W, 3]."""
    return (images[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy()


class ScoreClip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamRelationScoreClip",
            display_name="DreamRelation Score Clip",
            category="DreamRelation/evaluation",
            description="Scores one generated clip offline: CLIP-T, temporal consistency, relation verdict of a "
            "local vision-language model, appearance leakage towards the training exemplars.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The generated clip, one IMAGE per frame (e.g. from VAE Decode)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt the clip was generated from (for CLIP-T, and the judge's question "
                                "when subject A / relation / subject B are empty)."),
                io.Combo.Input("clip_model", options=clip_choices(),
                               tooltip="CLIP from models/clip_vision: a file, or a Hugging Face CLIP folder. 'none' "
                               "skips the CLIP metrics."),
                io.Boolean.Input("compute_clip_t", default=True,
                                 tooltip="Compute CLIP-T. It needs CLIP's text tower; ComfyUI's clip_vision files have "
                                 "only the image tower, so turn this off for them."),
                io.Combo.Input("judge_model", options=judge_choices(),
                               tooltip="A vision-language model folder in models/vlm (transformers image-text-to-text, "
                               "e.g. Qwen2-VL-7B-Instruct), loaded for the run, then freed. 'none' skips relation "
                               "accuracy."),
                io.String.Input("subject_a", default="", tooltip="Subject A for the judge, e.g. 'a bear' (optional)."),
                io.String.Input("relation", default="", tooltip="The relation for the judge, e.g. 'shaking hands with' (optional)."),
                io.String.Input("subject_b", default="", tooltip="Subject B for the judge, e.g. 'a raccoon' (optional)."),
                io.Int.Input("judge_frames", default=8, min=1, max=64,
                             tooltip="Frames sampled uniformly over the clip for the judge."),
                io.String.Input("exemplars", default="",
                                tooltip="The folder of the training exemplar videos (absolute, or inside ComfyUI's input "
                                "folder). Empty skips appearance leakage."),
            ],
            outputs=[
                io.Float.Output("clip_t", tooltip="Mean text-frame CLIP cosine similarity (NaN when not computed)."),
                io.Float.Output("temporal_consistency", tooltip="Mean CLIP cosine similarity of consecutive frames."),
                io.Boolean.Output("relation_yes", tooltip="True when the judge answered yes (unclear counts as no)."),
                io.Float.Output("leakage_max", tooltip="Largest CLIP similarity of a frame to its nearest exemplar frame."),
                io.String.Output("report", tooltip="All scores as text."),
            ],
        )

    @classmethod
    def execute(cls, images, prompt, clip_model, compute_clip_t, judge_model, subject_a, relation, subject_b, judge_frames,
                exemplars) -> io.NodeOutput:
        frames = _frames(images)
        lines = [f"{len(frames)} frames {frames.shape[2]}x{frames.shape[1]}"]
        scores = {"clip_t": math.nan, "temporal_consistency": math.nan, "leakage_max": math.nan}
        if clip_model != NONE:
            _clip_scores(frames, prompt, clip_model, compute_clip_t, exemplars, scores, lines)
        elif exemplars.strip():
            lines.append("leakage: needs a clip_model")
        relation_yes = False
        if judge_model != NONE:
            relation_yes = _judge(frames, prompt, judge_model, (subject_a, relation, subject_b), judge_frames, lines)
        report = "\n".join(lines)
        return io.NodeOutput(scores["clip_t"], scores["temporal_consistency"], relation_yes, scores["leakage_max"],
                             report, ui=ui.PreviewText(report))


def _clip_scores(frames, prompt: str, name: str, want_t: bool, exemplars: str, scores: dict, lines: list) -> None:
    import comfy.model_management as mm

    from dreamrelation_core.errors import EvaluationError, ModelFileError
    from dreamrelation_core.evaluation.clip_metrics import clip_t_score, temporal_consistency_score
    from dreamrelation_core.evaluation.leakage import exemplar_features, leakage_scores
    from dreamrelation_core.evaluation.runner import find_videos

    from .paths import resolve_dataset_folder

    enc = _clip(name)
    if want_t and not enc.has_text:
        raise ModelFileError(f"{name}: holds CLIP's image tower only, so CLIP-T cannot be computed: choose a full CLIP "
                             f"(a Hugging Face CLIP folder in models/clip_vision) or turn compute_clip_t off")
    if want_t and not prompt.strip():
        raise EvaluationError("CLIP-T needs the prompt: fill in prompt or turn compute_clip_t off")
    device = mm.get_torch_device()
    enc.to(device)
    try:
        feats = enc.image_features(frames)
        if want_t:
            scores["clip_t"] = clip_t_score(feats, enc.text_features([prompt])[0])
            lines.append(f"CLIP-T {scores['clip_t']:.4f}")
        if len(frames) >= 2:
            scores["temporal_consistency"] = temporal_consistency_score(feats)
            lines.append(f"temporal consistency {scores['temporal_consistency']:.4f}")
        if exemplars.strip():
            from dreamrelation_core.data.video import read_video

            videos = find_videos(resolve_dataset_folder(exemplars))
            ex = exemplar_features(enc, ((k, read_video(p)) for k, p in videos.items()))
            lk = leakage_scores(feats, ex)
            scores["leakage_max"] = lk.max
            lines.append(f"leakage max {lk.max:.4f} mean {lk.mean:.4f} ({len(videos)} exemplar videos)")
    finally:
        enc.to(mm.unet_offload_device())


def _judge(frames, prompt: str, name: str, triple: tuple[str, str, str], judge_frames: int, lines: list) -> bool:
    import gc

    import comfy.model_management as mm

    from dreamrelation_core.evaluation.judge import RelationJudge, prompt_question, relation_question

    question = relation_question(*triple) if all(s.strip() for s in triple) else prompt_question(prompt)
    mm.unload_all_models()  # a VLM needs the memory the video model holds
    mm.soft_empty_cache()
    judge = RelationJudge.load(_resolve(VLM_FOLDER, name), mm.get_torch_device(), num_frames=judge_frames)
    try:
        ans = judge.ask(frames, question)
    finally:
        del judge
        gc.collect()
        mm.soft_empty_cache()
    lines.append(f"judge: {question} -> {ans.answer!r} ({ans.verdict.value})")
    return ans.correct


NODES = [ScoreClip]
