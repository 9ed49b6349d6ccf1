"""Preparing many clips: seconds per clip of `prepare_dataset` (tiny VAE and T5, synthetic clips),
and the time 1,000 clips would take at that rate, with the progress bar `prepare` shows.

What it measures is the pack's own work per clip around the encoders (dataset scan, video and mask
reading, fitting, latent masks, the cache write with its fingerprint), not the real VAE: with the
full-size Mochi VAE the encoder dominates. A second pass over the same folder measures the
up-to-date check that skips unchanged clips.

    python benchmarks/prepare_many.py [--clips 100] [--frames 7] [--size 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--frames", type=int, default=7)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from dreamrelation_core.data.cache import Encoders, prepare_dataset
    from dreamrelation_core.data.synthetic import write_synthetic_dataset
    from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_vae

    size = (args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp) / "data", num_videos=args.clips, num_frames=args.frames, size=size)
        vae, te, tok = tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)
        rates = []
        for label in ("encode", "up to date"):
            bar = tqdm(total=args.clips, desc=f"prepare ({label})", unit="clip")

            def progress(done: int, total: int, name: str, bar=bar) -> None:
                bar.update(done - bar.n)

            t0 = time.perf_counter()
            prepare_dataset(data, Path(tmp) / "cache", Encoders.from_models(vae, te, tok), args.frames, size,
                            max_text_len=16, progress=progress)
            rates.append((time.perf_counter() - t0) / args.clips)
            bar.close()
    for label, per_clip in zip(("encode", "up to date"), rates):
        print(f"{label}: {per_clip * 1000:.1f} ms/clip; 1,000 clips: {per_clip * 1000 / 60:.1f} min")


if __name__ == "__main__":
    main()
