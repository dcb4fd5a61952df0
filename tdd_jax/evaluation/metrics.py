"""FID and KID on feature sets, and reference statistics as ``.npz`` files the way the FID tools store them.

FID (Heusel et al. 2017): ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½). The trace of the square root is taken as
Σᵢ √λᵢ over the eigenvalues of the *symmetric* PSD matrix Σ₁^½ Σ₂ Σ₁^½ (similar to Σ₁Σ₂, so same spectrum),
each square root from ``eigh``. Why not ``scipy.linalg.sqrtm(Σ₁Σ₂)`` as pytorch-fid does: the product is not
symmetric, so sqrtm works in complex Schur form, returns imaginary parts that must be discarded, and fails on the
singular covariances of small sample sets (fewer samples than feature dimensions) unless ε·I is added, which
biases the number; ``eigh`` of symmetric matrices is real, backward stable and exact for rank-deficient inputs
(tiny negative eigenvalues from rounding are clipped to 0).

KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³, averaged
over random subsets as torch-fidelity and clean-fid do (defaults 100 subsets of min(1000, n) without
replacement); mean and standard deviation over subsets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) in float64; Σ is the unbiased covariance (``np.cov(rowvar=False)``, as pytorch-fid)."""
    features = _as_features(features, "features")
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors, got {len(features)}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (see the module docstring for the square root)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt, 0.0))


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (N, D), (M, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _as_features(features, name: str) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be (N, D) feature vectors, got shape {features.shape}")
    return features


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two equal-size sets under k(a, b) = (aᵀb/d + 1)³ (diagonals of K_xx, K_yy left out)."""
    m, d = len(x), x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial MMD² over ``num_subsets`` random subsets of
    ``min(subset_size, N, M)`` vectors from each set, drawn without replacement within a subset."""
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def save_statistics(path: str | Path, features: np.ndarray) -> Path:
    """``mu`` and ``sigma`` as pytorch-fid's ``--save-stats`` writes them, plus the ``features`` (KID needs them)."""
    mu, sigma = feature_statistics(features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, mu=mu, sigma=sigma, features=np.asarray(features, np.float32))
    return path


def load_statistics(path: str | Path) -> dict[str, np.ndarray]:
    """{'mu', 'sigma'[, 'features']} from an ``.npz`` (pytorch-fid's files have no features: then no KID)."""
    with np.load(path) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: reference statistics need arrays {sorted(missing)} (has {data.files})")
        return {k: data[k] for k in data.files if k in ("mu", "sigma", "features")}
