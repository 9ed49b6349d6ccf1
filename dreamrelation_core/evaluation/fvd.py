"""Fréchet Video Distance (FVD) between two sets of clips, with a local I3D-style feature network.

Definition. Each clip is embedded by a video network; a Gaussian N(μ, Σ) is fitted to each set's
embeddings and

    FVD = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

Tr((Σ1 Σ2)^½) is computed as Tr((Σ1^½ Σ2 Σ1^½)^½) (the route TF-GAN's `trace_sqrt_product` takes):
the two matrices are similar, and the latter is symmetric positive semi-definite, so symmetric
eigen-decompositions in float64 give it without the complex round-off of a general matrix square
root (`scipy.linalg.sqrtm`), also when Σ is singular (fewer clips than feature dimensions).
The covariance is the unbiased one (ddof = 1, `np.cov`), as in pytorch-fid and in
`compute_fvd(feats_fake, feats_real)` of fvd-comparison (the FVD code of StyleGAN-V's author);
StyleGAN-V's own metric code (`FeatureStats.get_mean_cov`) divides by N (ddof = 0), available as
an option. tests/test_evaluation_fvd.py checks both against those published formulas.

Protocol (the common one):
- 16 consecutive frames per clip, from the first frame, as StyleGAN-V's `fvd2048_16f` (a frame
  stride can be set; the reference code takes whatever length it is given);
- every frame resized to 224x224 with bilinear interpolation, without antialiasing and without
  keeping the aspect ratio (the reference code resizes the whole frame; the resampling kernels of
  TF and PyTorch differ slightly), values scaled from [0, 255] to [-1, 1];
- input [B, 3, T, 224, 224] (channels first, then time);
- features: the I3D's 400 Kinetics logits before the softmax (the reference takes
  `RGB/inception_i3d/Mean:0`; StyleGAN-V's `i3d_torchscript.pt` returns them with
  `return_features=True`).

Feature networks accepted (`load_feature_network`):
- a TorchScript file (`torch.jit.load`), e.g. StyleGAN-V's `i3d_torchscript.pt`; when its forward
  takes `rescale`, `resize` and `return_features`, it is called with False, False, True (this
  module has already resized and rescaled);
- a state dict (`.safetensors` / `.pt`) of `SmallVideoNet` below, a small I3D-like 3D CNN.
FVD numbers are only comparable between runs that use the same network, frame count, size and a
similar number of clips (FVD is biased upwards for small sets).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EvaluationError, ModelFileError, ModelFileNotFoundError
from ..statedict import read_state_dict

FVD_FRAMES = 16
FVD_SIZE = 224
_STYLEGAN_V_KWARGS = ("rescale", "resize", "return_features")


# ---------------------------------------------------------------- Fréchet distance


def gaussian_stats(features: np.ndarray, ddof: int = 1, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D]."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise EvaluationError(f"{name}: expected features [N, D], got shape {x.shape}")
    if x.shape[0] < ddof + 1:
        raise EvaluationError(f"{name}: {x.shape[0]} clip(s); a covariance (ddof={ddof}) needs at least {ddof + 1}")
    if not np.isfinite(x).all():
        raise EvaluationError(f"{name}: features hold NaN or inf")
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - ddof)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1 Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½) for symmetric PSD Σ1, Σ2."""
    s = _sqrt_psd(sigma1)
    m = s @ sigma2 @ s
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), clipped at 0 (it is a squared distance)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EvaluationError(f"Fréchet distance: shapes μ1 {mu1.shape}, Σ1 {sigma1.shape}, μ2 {mu2.shape}, "
                              f"Σ2 {sigma2.shape} do not describe two Gaussians of one dimension")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def fvd_from_features(features_a: np.ndarray, features_b: np.ndarray, ddof: int = 1) -> float:
    """FVD of two feature sets [N1, D] and [N2, D] (the Fréchet distance of their Gaussians)."""
    a = np.asarray(features_a)
    b = np.asarray(features_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise EvaluationError(f"FVD: feature sets {a.shape} and {b.shape} must both be [N, D] with one D")
    return frechet_distance(*gaussian_stats(a, ddof, "first set"), *gaussian_stats(b, ddof, "second set"))


# ---------------------------------------------------------------- clips -> network input


def frames_needed(num_frames: int, stride: int) -> int:
    return (num_frames - 1) * stride + 1


def check_clip_lengths(lengths: dict[str, int], num_frames: int | None, stride: int = 1) -> int:
    """The frame count every clip is cut to. With num_frames None all clips must share one length;
    otherwise each needs (num_frames - 1) * stride + 1 frames. Raises EvaluationError naming clips."""
    if not lengths:
        raise EvaluationError("FVD: no clips")
    if num_frames is None:
        distinct = sorted(set(lengths.values()))
        if len(distinct) > 1:
            listing = ", ".join(f"{k}: {v}" for k, v in sorted(lengths.items())[:12])
            raise EvaluationError(f"FVD: clips have different lengths {distinct} ({listing}); set a frame count "
                                  f"(e.g. {FVD_FRAMES}) to cut every clip to the same length")
        return distinct[0] if stride == 1 else (distinct[0] - 1) // stride + 1
    if num_frames < 1 or stride < 1:
        raise EvaluationError(f"FVD: frame count {num_frames} and stride {stride} must be >= 1")
    need = frames_needed(num_frames, stride)
    short = {k: v for k, v in lengths.items() if v < need}
    if short:
        listing = ", ".join(f"{k}: {v}" for k, v in sorted(short.items())[:12])
        raise EvaluationError(f"FVD: {len(short)} clip(s) shorter than the {need} frames needed for {num_frames} "
                              f"frames at stride {stride}: {listing}")
    return num_frames


def preprocess_clip(frames: np.ndarray, num_frames: int, stride: int = 1, size: int = FVD_SIZE,
                    name: str = "clip") -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [3, num_frames, size, size] in [-1, 1] (the protocol above)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise EvaluationError(f"{name}: expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    check_clip_lengths({name: frames.shape[0]}, num_frames, stride)
    x = torch.from_numpy(np.ascontiguousarray(frames[: frames_needed(num_frames, stride) : stride]))
    x = x.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = x.clamp(0, 255) / 127.5 - 1.0
    return x.permute(1, 0, 2, 3).contiguous()  # [3, T, size, size]


# ---------------------------------------------------------------- feature networks


class SmallVideoNet(torch.nn.Module):
    """A small I3D-like 3D CNN: Conv3d + ReLU stages (stride 1 in time, 2 in space), global average
    pooling, a linear head whose output are the features (like I3D's logits before the softmax).
    `from_state_dict` rebuilds it from its weights alone."""

    def __init__(self, channels: tuple[int, ...] = (3, 16, 32), kernels: tuple[int, ...] = (3, 3),
                 feature_dim: int = 400) -> None:
        super().__init__()
        if len(kernels) != len(channels) - 1:
            raise ValueError(f"SmallVideoNet: {len(channels) - 1} stages need {len(channels) - 1} kernel sizes")
        self.stages = torch.nn.ModuleList(
            torch.nn.Conv3d(cin, cout, kernel_size=k, stride=(1, 2, 2), padding=k // 2)
            for cin, cout, k in zip(channels[:-1], channels[1:], kernels)
        )
        self.head = torch.nn.Linear(channels[-1], feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, T, H, W] -> [B, feature_dim]
        for conv in self.stages:
            x = torch.relu(conv(x))
        return self.head(x.mean(dim=(2, 3, 4)))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], source: str = "state dict") -> SmallVideoNet:
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.") and k.endswith(".weight")})
        if not idx or idx != list(range(len(idx))) or "head.weight" not in sd:
            raise ModelFileError(f"{source}: not a SmallVideoNet state dict (expected stages.N.weight [out, in, k, k, k] "
                                 f"and head.weight); use a TorchScript file for other networks")
        ws = [sd[f"stages.{i}.weight"] for i in idx]
        if any(w.ndim != 5 for w in ws):
            raise ModelFileError(f"{source}: stages.N.weight must be Conv3d weights [out, in, k, k, k]")
        channels = (int(ws[0].shape[1]), *(int(w.shape[0]) for w in ws))
        net = cls(channels, tuple(int(w.shape[2]) for w in ws), int(sd["head.weight"].shape[0]))
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise ModelFileError(f"{source}: weights do not fit a SmallVideoNet of channels {channels}: {e}") from e
        return net


class FeatureNetwork:
    """A video feature network behind one call: float [B, 3, T, S, S] in [-1, 1] -> float64 [B, D]."""

    def __init__(self, module: torch.nn.Module, source: str, device: str | torch.device = "cpu") -> None:
        self.module = module.eval().to(device)
        self.source = source
        self.device = torch.device(device)
        self.kwargs = {}
        schema = getattr(getattr(module, "forward", None), "schema", None)  # TorchScript methods carry one
        names = {a.name for a in schema.arguments} if schema is not None else set()
        if set(_STYLEGAN_V_KWARGS) <= names:  # StyleGAN-V's i3d_torchscript.pt interface
            self.kwargs = dict(rescale=False, resize=False, return_features=True)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = self.module(x.to(self.device), **self.kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelFileError(f"{self.source}: returned {shape} for a batch of {x.shape[0]} clips; expected [B, D]")
        if out.ndim > 2:  # feature maps: average over time and space, as I3D's own Mean does
            out = out.flatten(2).mean(-1)
        return out.double().cpu().numpy()


def load_feature_network(path: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureNetwork:
    """A TorchScript file, or a SmallVideoNet state dict (.safetensors / .pt / .pth)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelFileNotFoundError(f"{p}: FVD feature network not found (expected a TorchScript file such as "
                                     f"StyleGAN-V's i3d_torchscript.pt, or a SmallVideoNet state dict)")
    if p.suffix != ".safetensors":
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is how I3D files are shared
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(p), map_location="cpu")
            return FeatureNetwork(module, str(p), device)
        except RuntimeError:
            pass  # not TorchScript: a state dict
    try:
        sd = read_state_dict(p, "FVD feature network")
    except ModelFileError as e:
        raise ModelFileError(f"{p}: neither TorchScript nor a readable state dict ({e})") from e
    return FeatureNetwork(SmallVideoNet.from_state_dict(sd, str(p)), str(p), device)


# ---------------------------------------------------------------- sets of clips


Clip = tuple[str, np.ndarray]  # (name, uint8 frames [F, H, W, 3])


def video_features(
    net: FeatureNetwork,
    clips: Iterable[Clip],
    num_frames: int = FVD_FRAMES,
    stride: int = 1,
    size: int = FVD_SIZE,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Features [N, D] of clips given as (name, frames); each is cut and resized as the protocol says.
    Clips can be a generator (read one video at a time)."""
    feats: list[np.ndarray] = []
    batch: list[torch.Tensor] = []
    for name, frames in clips:
        batch.append(preprocess_clip(frames, num_frames, stride, size, name))
        if progress is not None:
            progress(name)
        if len(batch) == batch_size:
            feats.append(net(torch.stack(batch)))
            batch = []
    if batch:
        feats.append(net(torch.stack(batch)))
    if not feats:
        raise EvaluationError("FVD: no clips to embed")
    out = np.concatenate(feats)
    if not np.isfinite(out).all():
        raise EvaluationError(f"{net.source}: features hold NaN or inf")
    return out


def fvd(net: FeatureNetwork, clips_a: Iterable[Clip], clips_b: Iterable[Clip], num_frames: int = FVD_FRAMES,
        stride: int = 1, size: int = FVD_SIZE, ddof: int = 1) -> float:
    """FVD between two sets of clips (e.g. generated vs reference videos)."""
    fa = video_features(net, clips_a, num_frames, stride, size)
    fb = video_features(net, clips_b, num_frames, stride, size)
    return fvd_from_features(fa, fb, ddof)
