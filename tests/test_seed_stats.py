"""The win rule over training seeds against scipy's paired and one-sample t-tests, on known inputs."""

import math

import numpy as np
import pytest
from scipy import stats

from tdd_jax.evaluation.seed_stats import claim_verdict, format_mean_std, mean_std, paired_difference


def test_mean_std_is_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, np.std([1.0, 2.0, 4.0], ddof=1)))
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)


def test_clear_win_names_the_better_row():
    a, b = [10.0, 10.1, 9.9], [12.0, 12.2, 11.9]  # a lower by ~2 on every seed
    d = paired_difference(a, b, "lower")
    assert d["resolved"] and d["winner"] == "a" and d["n"] == 3
    assert d["mean"] == pytest.approx(-2.0333333) and d["std"] == pytest.approx(np.std([-2, -2.1, -2], ddof=1))
    assert d["threshold"] == pytest.approx(stats.t.ppf(0.975, 2) * d["std"] / math.sqrt(3))
    assert paired_difference(a, b, "higher")["winner"] == "b"  # e.g. prompt accuracy: higher is better
    assert paired_difference(a, b, None) | {"winner": None} == d | {"winner": None}


def test_tie_is_not_resolved():
    d = paired_difference([10.0, 11.0, 12.0], [10.5, 10.5, 11.5])  # d = -0.5, 0.5, 0.5
    assert not d["resolved"] and d["winner"] is None
    assert abs(d["mean"]) < d["threshold"]


def test_two_seeds_need_t_of_one_degree_of_freedom():
    # t_{0.975,1} = 12.706: a mean difference of 7.8 standard errors is still not enough with n = 2
    wide = paired_difference([1.0, 1.2], [0.0, 0.0])
    assert wide["threshold"] == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert not wide["resolved"]
    assert paired_difference([1.0, 1.02], [0.0, 0.0])["resolved"]


def test_one_seed_is_never_resolved():
    d = paired_difference([3.0], [1.0])
    assert not d["resolved"] and math.isnan(d["threshold"]) and d["winner"] is None


def test_agrees_with_scipy_paired_and_one_sample_tests():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 6))
        a = rng.normal(size=n)
        b = a + rng.normal(rng.choice([0.0, 0.5, 2.0]), 1.0, size=n)
        assert paired_difference(a, b)["resolved"] == (stats.ttest_rel(a, b).pvalue < 0.05), (a, b)
        constant = float(rng.normal())  # a teacher control: one value for every seed
        assert paired_difference(a, constant)["resolved"] == (stats.ttest_1samp(a, constant).pvalue < 0.05)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="better"):
        paired_difference([1.0, 2.0], [1.0, 2.0], "smaller")
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([], [])


def test_format_mean_std():
    assert format_mean_std(12.345, 0.5, "{:.2f}") == "12.35 ± 0.50"
    assert format_mean_std(12.345, math.nan, "{:.2f}") == "12.35"


def test_claim_verdict_rules():
    assert claim_verdict(["a", "a", "a"])["verdict"] == "held"
    assert claim_verdict(["a", None, "a"]) == {"verdict": "not resolved", "a": 2, "b": 0, "n": 3}
    assert claim_verdict(["a", "b", "a"])["verdict"] == "not held"  # one loss sinks it, wins elsewhere or not
    assert claim_verdict([None, None], "no_loss")["verdict"] == "held"
    assert claim_verdict([None, "b"], "no_loss") == {"verdict": "not held", "a": 0, "b": 1, "n": 2}
    assert claim_verdict([None, None], "no_loss", testable=False)["verdict"] == "not resolved"  # one seed
    with pytest.raises(ValueError, match="kind 'beats'"):
        claim_verdict(["a"], "beats")
    with pytest.raises(ValueError, match="at least one"):
        claim_verdict([])
