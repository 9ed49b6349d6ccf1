"""FVD: the Fréchet distance against the published formulas (pytorch-fid / StyleGAN-V, scipy's
sqrtm) on fixed random features, the protocol's preprocessing, and tiny random feature networks
saved as TorchScript and as a state dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamrelation_core.errors import EvaluationError, ModelFileError, ModelFileNotFoundError
from dreamrelation_core.evaluation.fvd import (
    FVD_FRAMES,
    FVD_SIZE,
    SmallVideoNet,
    check_clip_lengths,
    frechet_distance,
    fvd,
    fvd_from_features,
    gaussian_stats,
    load_feature_network,
    preprocess_clip,
    video_features,
)
from fixtures.eval_models import StyleGanVLikeI3D, moving_square, save_torchscript


def _features(seed: int, n: int = 64, d: int = 12, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def _published_fvd(feats_fake: np.ndarray, feats_real: np.ndarray) -> float:
    """The formula of compute_fvd(feats_fake, feats_real) (universome/fvd-comparison, copied from
    StyleGAN-V) and pytorch-fid, as published:
    np.cov statistics, scipy.linalg.sqrtm of the product, real part of the trace."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu_f, sig_f = feats_fake.mean(axis=0), np.cov(feats_fake, rowvar=False)
    mu_r, sig_r = feats_real.mean(axis=0), np.cov(feats_real, rowvar=False)
    s = _sqrtm(scipy_linalg, np.dot(sig_f, sig_r))
    return float(np.real(np.square(mu_f - mu_r).sum() + np.trace(sig_f + sig_r - s * 2)))


def _sqrtm(scipy_linalg, m: np.ndarray) -> np.ndarray:
    out = scipy_linalg.sqrtm(m)  # scipy < 1.18 may return (sqrtm, error estimate)
    return out[0] if isinstance(out, tuple) else out


def _stylegan_v_training_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StyleGAN-V's FeatureStats.get_mean_cov: raw sums over N, cov = E[x xᵀ] - μ μᵀ (divides by N)."""
    x = x.astype(np.float64)
    mean = x.sum(0) / len(x)
    return mean, x.T @ x / len(x) - np.outer(mean, mean)


# The published formula (above) evaluated with scipy 1.17 on these fixed features: the check stands
# where scipy is not installed, and the live comparison below runs where it is.
PUBLISHED = {(0, 1, 0.0): 6.71638373984795, (2, 3, 0.7): 14.50871783791648, (4, 5, -2.0): 55.282276139863946}


@pytest.mark.parametrize("seed_a,seed_b,shift", sorted(PUBLISHED))
def test_frechet_distance_matches_published_formula(seed_a, seed_b, shift) -> None:
    a, b = _features(seed_a), _features(seed_b, n=80, shift=shift)
    ours = fvd_from_features(a, b)
    assert ours == pytest.approx(PUBLISHED[(seed_a, seed_b, shift)], rel=1e-6, abs=1e-6)
    theirs = _published_fvd(a, b)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)
    # StyleGAN-V's metric statistics (FeatureStats: divide by N) = our ddof=0
    scipy_linalg = pytest.importorskip("scipy.linalg")
    (ma, sa), (mb, sb) = _stylegan_v_training_stats(a), _stylegan_v_training_stats(b)
    s = _sqrtm(scipy_linalg, sa @ sb)
    theirs0 = float(np.real(np.square(ma - mb).sum() + np.trace(sa + sb - 2 * s)))
    assert fvd_from_features(a, b, ddof=0) == pytest.approx(theirs0, rel=1e-6, abs=1e-6)
    mu, sig = gaussian_stats(a)
    assert np.allclose(sig, np.cov(a, rowvar=False)) and np.allclose(mu, a.mean(0))


def test_frechet_distance_properties() -> None:
    a, b = _features(0), _features(1)
    assert fvd_from_features(a, a) == pytest.approx(0.0, abs=1e-7)
    assert fvd_from_features(a, b) == pytest.approx(fvd_from_features(b, a), rel=1e-9)
    # a pure shift c of the same set: the covariance term vanishes, FVD = ‖c‖²
    c = np.linspace(-1, 1, a.shape[1])
    assert fvd_from_features(a, a + c) == pytest.approx(float(c @ c), rel=1e-7)
    grows = [fvd_from_features(a, a + k * c) for k in (0.5, 1.0, 2.0)]
    assert grows[0] < grows[1] < grows[2]
    # singular covariances (fewer clips than dimensions) stay finite and non-negative
    few = _features(3, n=5, d=12)
    assert fvd_from_features(few, few) == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(fvd_from_features(few, _features(4, n=6, d=12)))
    # closed form for diagonal Gaussians: Σ (σ1 - σ2)² per dimension
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), s1, np.ones(3), s2) == pytest.approx(3 + 1 + 0 + 4, abs=1e-9)


def test_frechet_distance_errors() -> None:
    with pytest.raises(EvaluationError, match="one D"):
        fvd_from_features(np.zeros((4, 3)), np.zeros((4, 5)))
    with pytest.raises(EvaluationError, match="at least 2"):
        fvd_from_features(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(EvaluationError, match="NaN"):
        fvd_from_features(np.full((4, 3), np.nan), np.zeros((4, 3)))
    with pytest.raises(EvaluationError, match="two Gaussians"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_preprocess_follows_the_protocol() -> None:
    frames = moving_square(20, size=(48, 80))
    x = preprocess_clip(frames, FVD_FRAMES)
    assert x.shape == (3, FVD_FRAMES, FVD_SIZE, FVD_SIZE) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    flat = np.zeros((16, 10, 10, 3), np.uint8)
    flat[..., 0] = 255  # pure red: +1 in R, -1 in G and B after scaling
    y = preprocess_clip(flat, 16, size=32)
    assert torch.allclose(y[0], torch.ones_like(y[0])) and torch.allclose(y[1:], -torch.ones_like(y[1:]))
    strided = preprocess_clip(frames, 4, stride=5, size=32)
    assert torch.allclose(strided[:, 1], preprocess_clip(frames[5:6], 1, size=32)[:, 0])


def test_clip_length_checks() -> None:
    assert check_clip_lengths({"a": 20, "b": 16}, 16) == 16
    with pytest.raises(EvaluationError, match=r"shorter than the 16 frames.*b: 10"):
        check_clip_lengths({"a": 20, "b": 10}, 16)
    with pytest.raises(EvaluationError, match=r"different lengths \[12, 20\]"):
        check_clip_lengths({"a": 20, "b": 12}, None)
    assert check_clip_lengths({"a": 12, "b": 12}, None) == 12
    with pytest.raises(EvaluationError, match="31 frames needed for 16 frames at stride 2"):
        check_clip_lengths({"a": 30}, 16, stride=2)
    with pytest.raises(EvaluationError, match="shorter"):
        preprocess_clip(moving_square(8), 16)


def _clips(seed0: int, n: int, brightness: int = 0) -> list[tuple[str, np.ndarray]]:
    out = []
    for i in range(n):
        f = moving_square(16, size=(24, 32), seed=seed0 + i).astype(np.int16) + brightness
        out.append((f"clip{i}", np.clip(f, 0, 255).astype(np.uint8)))
    return out


def test_torchscript_network_with_stylegan_v_interface(tmp_path) -> None:
    torch.manual_seed(0)
    module = StyleGanVLikeI3D(feature_dim=12)
    path = save_torchscript(module, tmp_path / "i3d_torchscript.pt")
    net = load_feature_network(path)
    assert net.kwargs == dict(rescale=False, resize=False, return_features=True)
    clips = _clips(0, 6)
    feats = video_features(net, clips, 16, size=64)
    assert feats.shape == (6, 12) and feats.dtype == np.float64
    x = torch.stack([preprocess_clip(f, 16, size=64) for _, f in clips])
    with torch.no_grad():
        expect = module(x, rescale=False, resize=False, return_features=True).double().numpy()
    assert np.allclose(feats, expect, atol=1e-5)
    assert fvd(net, clips, clips, size=64) == pytest.approx(0.0, abs=1e-6)
    near = fvd(net, clips, _clips(0, 6, brightness=20), size=64)
    far = fvd(net, clips, _clips(0, 6, brightness=120), size=64)
    assert 0.0 < near < far


def test_plain_torchscript_and_state_dict_networks(tmp_path) -> None:
    torch.manual_seed(0)
    small = SmallVideoNet((3, 4, 8), (3, 3), feature_dim=10)
    plain = load_feature_network(save_torchscript(small, tmp_path / "small.pt"))
    assert plain.kwargs == {}
    from safetensors.torch import save_file

    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    torch.save(small.state_dict(), tmp_path / "small_sd.pt")
    clips = _clips(10, 3)
    base = video_features(plain, clips, 8, size=32)
    for name in ("small.safetensors", "small_sd.pt"):
        net = load_feature_network(tmp_path / name)
        assert isinstance(net.module, SmallVideoNet) and tuple(net.module.head.weight.shape) == (10, 8)
        assert np.allclose(video_features(net, clips, 8, size=32), base, atol=1e-6)


def test_feature_network_errors(tmp_path) -> None:
    with pytest.raises(ModelFileNotFoundError, match="FVD feature network not found"):
        load_feature_network(tmp_path / "i3d_torchscript.pt")
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a SmallVideoNet state dict"):
        load_feature_network(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="neither TorchScript nor a readable state dict"):
        load_feature_network(tmp_path / "junk.pt")
    net = load_feature_network(save_torchscript(SmallVideoNet((3, 4), (3,), 6), tmp_path / "ok.pt"))
    with pytest.raises(EvaluationError, match="shorter"):
        video_features(net, [("long", moving_square(16)), ("short", moving_square(9))], 16, size=32)
