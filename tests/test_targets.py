"""Target-timestep rules: the official TDD set, per-draw rule checks, uniformity, and the baselines."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdd_jax.diffusion.solver import solver_prev_timesteps
from tdd_jax.diffusion.targets import TargetRule, pcm_edges, sample_targets, tdd_target_set

# REFERENCE.md: the official "merged timesteps" for K = 4..8 on the 250-step grid.
OFFICIAL_MERGED = [0, 127, 143, 167, 199, 251, 287, 335, 375, 399, 431, 499, 571, 599, 627, 667, 715, 751, 799,
                   835, 859, 875]
PREV_GRID = solver_prev_timesteps(250, 1000)
sample_jit = jax.jit(sample_targets, static_argnums=0)


def _key(seed: int) -> jax.Array:
    """PRNG keys for tests: RBG, because the threefry kernel alone takes seconds to compile on a busy CPU."""
    return jax.random.key(seed, impl="rbg")


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper 0.1 % point of χ²(df) by the Wilson–Hilferty cube-root normal approximation (within ~1 % for df ≥ 2).

    With fixed seeds the tests are deterministic; p = 0.001 keeps the bar loose enough that a correct sampler
    would fail it for only one seed in a thousand, while a biased pick (e.g. an off-by-one range) fails by a lot.
    """
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(draws: np.ndarray, categories: np.ndarray) -> float:
    assert np.isin(draws, categories).all()
    counts = np.array([(draws == c).sum() for c in categories])
    expected = len(draws) / len(categories)
    return float(((counts - expected) ** 2 / expected).sum())


def _grid_t_n(n: int, seed: int = 0) -> jnp.ndarray:
    """t_n as the trainer draws it: prev_grid[index], index ~ U{0..249}."""
    return jnp.asarray(np.random.default_rng(seed).choice(PREV_GRID, n), jnp.int32)


def test_tdd_set_equals_official_merged_list():
    rule = TargetRule()
    assert tdd_target_set(rule).tolist() == OFFICIAL_MERGED
    assert rule.resolved_bound == 260
    assert TargetRule(bound=300).resolved_bound == 300


@pytest.mark.parametrize("change, field", [
    ({"k_min": 9}, "k_min"), ({"eta": 1.5}, "eta"), ({"kind": "ctm"}, "kind"), ({"bound": -1}, "bound"),
    ({"num_solver_steps": 2000}, "num_solver_steps"), ({"pcm_phases": 0}, "pcm_phases"),
])
def test_validate_names_field(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TargetRule(), **change).validate()


def test_tdd_targets_obey_rule():
    rule = TargetRule()
    merged = np.asarray(OFFICIAL_MERGED)
    # Grid values plus arbitrary integers: the rule is defined for any t_n >= 0.
    t_n = np.concatenate([np.asarray(_grid_t_n(15000)), np.random.default_rng(1).integers(0, 999, 5000)])
    tau = np.asarray(sample_jit(rule, _key(0), jnp.asarray(t_n, jnp.int32)))
    assert tau.dtype == np.int32 and tau.shape == t_n.shape
    np.testing.assert_array_equal(tau, np.asarray(sample_jit(rule, _key(0), jnp.asarray(t_n, jnp.int32))))
    assert (tau >= 0).all() and (tau <= t_n).all()
    ub = merged[np.searchsorted(merged, t_n, side="right") - 1]
    lb = np.maximum(ub - 260, 0)
    # Some candidate pick in [lb, ub] must explain τ: ⌊(1 − η)·pick⌋ <= τ <= pick.
    m = merged[None, :]
    ok = (m >= lb[:, None]) & (m <= ub[:, None]) & (np.floor((1 - rule.eta) * m) <= tau[:, None]) & (tau[:, None] <= m)
    assert ok.any(axis=1).all()
    assert (tau < ub).mean() > 0.5  # the offset is really applied


@pytest.mark.parametrize("t_n, candidates", [
    (900, [627, 667, 715, 751, 799, 835, 859, 875]),   # ub = 875, lb = 615
    (300, [127, 143, 167, 199, 251, 287]),             # ub = 287, lb = 27
    (130, [0, 127]),                                    # ub = 127, lb = 0
])
def test_tdd_choice_is_uniform(t_n, candidates):
    rule = TargetRule(eta=0.0)  # no offset, so τ is the pick itself
    draws = np.asarray(sample_jit(rule, _key(4), jnp.full((20000,), t_n, jnp.int32)))
    stat = chi2_statistic(draws, np.asarray(candidates))
    assert stat < chi2_critical(len(candidates) - 1), stat


def test_pcm_edges_and_targets():
    rule = TargetRule(kind="pcm")
    np.testing.assert_array_equal(pcm_edges(rule), [0, 247, 499, 747])
    # Official index form: for solver index n (t_n = prev_grid[n]) the target is prev_grid[largest edge index <= n].
    edge_idx = np.floor(np.linspace(0, 250, 4, endpoint=False)).astype(int)
    official = PREV_GRID[edge_idx[np.searchsorted(edge_idx, np.arange(250), side="right") - 1]]
    off_grid = np.array([246, 498, 746, 998])
    tau = np.asarray(sample_jit(rule, _key(0), jnp.asarray(np.concatenate([PREV_GRID, off_grid]))))
    np.testing.assert_array_equal(tau[:250], official)
    np.testing.assert_array_equal(tau[250:], [0, 247, 499, 747])


def test_lcm_targets_are_zero():
    tau = sample_jit(TargetRule(kind="lcm"), _key(0), _grid_t_n(20000))
    np.testing.assert_array_equal(np.asarray(tau), 0)


def test_tcd_targets_uniform_on_grid_below_t_n():
    rule = TargetRule(kind="tcd", eta=0.0)
    t_n = _grid_t_n(20000, 5)
    tau = np.asarray(sample_jit(rule, _key(6), t_n))
    assert np.isin(tau, PREV_GRID).all() and (tau <= np.asarray(t_n)).all()
    candidates = PREV_GRID[PREV_GRID <= 399]  # 0, 3, 7, ..., 399: TCD's end index ~ U{0..n}
    draws = np.asarray(sample_jit(rule, _key(7), jnp.full((20000,), 399, jnp.int32)))
    assert chi2_statistic(draws, candidates) < chi2_critical(len(candidates) - 1)
    offset = np.asarray(sample_jit(TargetRule(kind="tcd", eta=0.3), _key(8), t_n))
    assert (offset >= 0).all() and (offset <= np.asarray(t_n)).all() and not np.isin(offset, PREV_GRID).all()
