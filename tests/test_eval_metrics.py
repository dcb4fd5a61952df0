"""FID and KID against independent NumPy/scipy reference formulas, and the .npz statistics round trip."""

import numpy as np
import pytest
import scipy.linalg

from tdd_jax.evaluation import metrics


def reference_fid(x, y):
    """pytorch-fid's formula: scipy sqrtm of the (non-symmetric) product, real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def reference_kid_subset(x, y):
    """MMD² written out term by term with explicit loops over the kernel matrix entries."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def random_features(seed, n, d, shift=0.0, scale=1.0):
    """n correlated Gaussian vectors; the mixing matrix depends on d only, so equal (d, shift, scale) means one
    distribution."""
    mixing = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    return shift + scale * np.random.default_rng(seed).normal(size=(n, d)) @ mixing


def test_fid_matches_scipy_sqrtm_reference():
    x, y = random_features(0, 400, 16), random_features(1, 300, 16, shift=0.3, scale=1.5)
    np.testing.assert_allclose(metrics.fid(x, y), reference_fid(x, y), rtol=1e-8)


def test_fid_of_a_set_with_itself_is_zero_even_rank_deficient():
    x = random_features(2, 400, 16)
    assert abs(metrics.fid(x, x)) < 1e-8
    few = random_features(3, 20, 64)  # 20 samples in 64 dims: singular covariance
    assert abs(metrics.fid(few, few)) < 1e-8
    # Against a different set the rank-deficient case stays finite and positive (no eps offset needed).
    other = random_features(4, 20, 64, shift=0.5)
    value = metrics.fid(few, other)
    assert np.isfinite(value) and value > 0


def test_fid_of_gaussians_matches_closed_form():
    # For diagonal covariances FID = |Δμ|² + Σ (√a − √b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    value = metrics.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    np.testing.assert_allclose(value, 3.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-12)


def test_kid_matches_loop_reference_on_one_subset():
    x, y = random_features(5, 30, 8), random_features(6, 30, 8, shift=0.4)
    mean, std = metrics.kid(x, y, num_subsets=1, subset_size=30)
    np.testing.assert_allclose(mean, reference_kid_subset(x, y), rtol=1e-10)
    assert std == 0.0


def test_kid_subsets_mean_and_sign():
    x, y = random_features(7, 200, 8), random_features(8, 200, 8)
    mean_same, std_same = metrics.kid(x, y, num_subsets=20, subset_size=50)
    far = random_features(9, 200, 8, shift=1.0)
    mean_far, _ = metrics.kid(x, far, num_subsets=20, subset_size=50)
    assert abs(mean_same) < 3 * std_same + 1e-3  # unbiased: near zero for one distribution
    assert mean_far > 10 * abs(mean_same) and mean_far > 0
    # Subsets are reproducible per seed and the mean equals the mean over the same subsets computed by hand.
    rng = np.random.default_rng(0)
    by_hand = [reference_kid_subset(x[rng.choice(200, 10, replace=False)], y[rng.choice(200, 10, replace=False)])
               for _ in range(3)]
    np.testing.assert_allclose(metrics.kid(x, y, num_subsets=3, subset_size=10, seed=0)[0], np.mean(by_hand),
                               rtol=1e-10)


def test_statistics_npz_round_trip(tmp_path):
    x = random_features(10, 100, 6)
    path = metrics.save_statistics(tmp_path / "ref.npz", x)
    stats = metrics.load_statistics(path)
    np.testing.assert_allclose(stats["mu"], x.mean(0))
    np.testing.assert_allclose(stats["sigma"], np.cov(x, rowvar=False))
    np.savez(tmp_path / "bad.npz", mean=x.mean(0))
    with pytest.raises(ValueError, match="mu"):
        metrics.load_statistics(tmp_path / "bad.npz")


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="sigma"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="dimensions"):
        metrics.kid(np.zeros((5, 3)), np.zeros((5, 4)))
