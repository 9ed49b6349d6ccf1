"""The built-in demo: the whole pipeline on a tiny random Mochi (or Wan) and a synthetic clip, on the CPU.

synthetic two-subject clips (exact masks) -> prepare (tiny VAE + T5 / umT5) -> train the triplet
with hybrid mask training and the relational contrastive loss -> checkpoint, triplet,
relation-only export -> sample with the relation-only LoRA (subjects dropped) -> loss plot and
animated GIF. With `--base-model wan2.1` it also writes the tiny base model in ComfyUI's Wan key
layout (`base_model.safetensors`, loadable by ComfyUI's stock UNETLoader) and the relation LoRA in
ComfyUI's Wan LoRA keys (`relation_comfy.safetensors`, for LoraLoaderModelOnly).
The model is random and tiny: the point is that every part runs, not a pretty video.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .progress import training_bar

DEMO_PROMPT = "A bear is shaking hands with a raccoon in a meadow."


def save_gif(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """uint8 [F, H, W, 3] -> looping animated GIF."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


@torch.no_grad()
def decode(vae, latents: torch.Tensor, spec=None) -> np.ndarray:
    """Normalised latents [1, C, T, h, w] -> uint8 frames [F, H, W, 3]."""
    from ..base_models import get_spec

    spec = spec or get_spec()
    video = vae.decode(spec.denormalize_latents(latents)).sample[0]  # [3, F, H, W] in [-1, 1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


def run_demo(out_dir: str | Path = "demo_output", steps: int = 200, seed: int = 0, sample_steps: int = 16,
             base_model: str = "mochi") -> dict[str, Path]:
    from ..base_models import get_spec
    from ..data.cache import Encoders, load_prepared, prepare_dataset
    from ..data.encode import encode_captions
    from ..data.synthetic import write_synthetic_dataset
    from ..generate import add_relation_lora, generate_latents
    from ..lora import files as lora_files
    from ..training.config import TrainConfig
    from ..training.plots import plot_losses
    from ..training.trainer import Trainer

    # diffusers' Mochi asks for float32 autocast of its RoPE, which CPU autocast cannot do: harmless
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    out = Path(out_dir)
    t0 = time.perf_counter()
    spec = get_spec(base_model)
    mochi = spec.family == "mochi"
    # Mochi: 6k + 1 frames, 16 T5 tokens; Wan: 4k + 1 frames, 512 umT5 rows as ComfyUI feeds them
    num_frames, size, text_len = (25, (64, 64), 16) if mochi else (17, (64, 64), spec.text_len)
    data = write_synthetic_dataset(out / "data", num_videos=2, num_frames=num_frames, size=size, seed=seed, spec=spec)
    print(f"[demo] {spec.display_name}: synthetic dataset (2 clips, {num_frames} frames {size[0]}x{size[1]}, "
          f"exact masks): {data}")
    vae, text_encoder, tokenizer = spec.tiny_encoders(seed, text_len)
    cache = out / "cache"
    prepare_dataset(data, cache, Encoders.from_models(vae, text_encoder, tokenizer, spec), num_frames, size,
                    max_text_len=text_len)
    clips = load_prepared(cache)
    print(f"[demo] prepared {len(clips)} clips -> {cache} (latents {tuple(clips[0].mean.shape)})")

    config = TrainConfig(
        transformer="tiny", output_dir=str(out / "run"), cache_dir=str(cache), num_steps=steps,
        warmup_steps=max(1, steps // 10), learning_rate=5e-3, rank=16, alpha=16.0, checkpoint_every=max(1, steps // 2),
        save_dtype="fp32", seed=seed, device="cpu", base_model=spec.name,
    )
    trainer = Trainer(config, clips=clips)
    before = trainer.evaluate()
    bar, update = training_bar(steps)
    result = trainer.train(progress=update)
    bar.close()
    after = trainer.evaluate()
    plot = plot_losses(result.history, out / "loss_curve.png",
                       f"DreamRelation demo (tiny random {spec.display_name}, synthetic clip)")

    lora = lora_files.load_lora_file(result.relation_path)
    model = add_relation_lora(spec.load_transformer("tiny", seed=seed), lora)
    y, ym = encode_captions(text_encoder, tokenizer, [DEMO_PROMPT], text_len)
    latent_shape = tuple(clips[0].mean.shape[1:])
    latents = generate_latents(model, y, ym, latent_shape, steps=sample_steps, cfg=6.0, seed=seed)
    gif = save_gif(decode(vae, latents, spec), out / "sample.gif")

    files = {
        "checkpoint": result.checkpoint, "triplet": result.triplet_path, "relation_only": result.relation_path,
        "loss_curve": plot, "sample": gif,
    }
    if not mochi:
        files.update(_comfy_files(spec, model, lora, out, seed))
    print(
        f"[demo] trained {result.step} steps; loss on fixed held-out noise (relation branch): masked "
        f"{before['masked']:.4f} -> {after['masked']:.4f}, total {before['total']:.3f} -> {after['total']:.3f}"
    )
    print(f"[demo] sampled '{DEMO_PROMPT}' with the relation-only LoRA ({sample_steps} steps, CFG 6)")
    for k, v in files.items():
        print(f"[demo] {k:14s} {v}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    return files


def _comfy_files(spec, model, lora, out: Path, seed: int) -> dict[str, Path]:
    """Wan: the tiny base in ComfyUI's key layout (stock UNETLoader) and the ComfyUI LoRA export."""
    from ..fileio import save_safetensors
    from ..lora.comfy_export import save_comfy_lora
    from ..wan.dit_keys import diffusers_to_comfy

    base = spec.load_transformer("tiny", seed=seed)  # the same random weights, without the LoRA layers
    sd = {k: v.contiguous() for k, v in diffusers_to_comfy(base.state_dict(), prefix="model.diffusion_model.").items()}
    base_path = save_safetensors(out / "base_model.safetensors", sd, {"base_model": spec.name, "source": "demo tiny"})
    comfy = save_comfy_lora(out / "relation_comfy.safetensors", lora, source=str(out / "run" / "relation_only.safetensors"))
    return {"base_model": base_path, "relation_comfy": comfy}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline on a tiny random model and a synthetic clip (CPU, about a minute)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 200 on Mochi, 100 on Wan, whose 512 text rows cost more per step)")
    p.add_argument("--sample-steps", type=int, default=16, help="sampling steps (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--base-model", choices=("mochi", "wan2.1", "wan2.2-5b"), default="mochi",
                   help="tiny random Mochi (default), Wan 2.1, or Wan 2.2 TI2V 5B (its 48-channel VAE)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    steps = args.steps or (200 if args.base_model == "mochi" else 100)
    run_demo(args.out, steps, args.seed, args.sample_steps, args.base_model)
    return 0
