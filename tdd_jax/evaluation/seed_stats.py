"""Error bars over training seeds, and the rule that decides whether one row beats another.

A cell's value is its mean ± standard deviation (ddof=1) over independently trained students. Two rows are
compared paired by training seed (same seed, same sampling noises), on the differences d = a − b: the difference
is *resolved* only when a two-sided paired t-test over the seeds rejects mean(d) = 0 at 5 %, i.e.
|mean d| > t_{0.975, n−1} · std(d) / √n. Otherwise it is "not resolved", however large the mean looks: with 3 seeds
the threshold is 4.30 standard errors. A constant b (a teacher control, one sample set for all seeds) makes
this the one-sample test of a against it. A claim ("A beats B at 4-8 steps") is decided over all its comparisons
by ``claim_verdict``: held only when A wins every one, not held when B wins any.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, std with ddof=1); std is NaN for a single value (no spread measured)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def paired_difference(a: Sequence[float], b: Sequence[float] | float, better: str | None = "lower") -> dict:
    """Compare row a with row b paired by seed (b may be one number for all seeds).

    Returns {'mean', 'std', 'n', 'threshold', 'resolved', 'winner'}: mean and std (ddof=1) of d = a − b, the
    |mean d| the test needs (NaN for n < 2: not testable), whether it is exceeded, and 'a' or 'b' for the row whose
    value is better (``better``: 'lower' or 'higher'; None: the winner is not named, only 'resolved').
    """
    a = np.asarray(a, np.float64)
    b = np.broadcast_to(np.asarray(b, np.float64), a.shape)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs one value per seed, got shape {a.shape}")
    if better not in ("lower", "higher", None):
        raise ValueError(f"better={better!r} must be 'lower', 'higher' or None")
    d = a - b
    mean, std = mean_std(d)
    n = d.size
    threshold = float(stats.t.ppf(1 - ALPHA / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    resolved = bool(n > 1 and abs(mean) > threshold)
    winner = None
    if resolved and better is not None:
        winner = "a" if (mean < 0) == (better == "lower") else "b"
    return {"mean": mean, "std": std, "n": n, "threshold": threshold, "resolved": resolved, "winner": winner}


def format_mean_std(mean: float, std: float, fmt: str) -> str:
    """'12.34 ± 0.56', or just the mean when no spread was measured."""
    if math.isnan(std):
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


CLAIM_KINDS = ("wins", "no_loss")


def claim_verdict(winners: Sequence[str | None], kind: str = "wins", testable: bool = True) -> dict:
    """Decide a claim "A beats B" (``kind='wins'``) or "A is no worse than B" (``'no_loss'``) from the winners of its
    comparisons (one per pair and step count: 'a', 'b' or None for not resolved).

    'wins' is held only when A wins every comparison; 'no_loss' when B wins none. Either is 'not held' as soon as
    B wins one, and 'not resolved' otherwise (or when ``testable`` is False: fewer than two seeds, no test ran).
    Returns {'verdict', 'a', 'b', 'n'}: the verdict and how many comparisons each side won, of n.
    """
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind {kind!r} must be one of {CLAIM_KINDS}")
    if not winners:
        raise ValueError("claim_verdict needs at least one comparison")
    a, b = sum(w == "a" for w in winners), sum(w == "b" for w in winners)
    if b:
        verdict = "not held"
    elif testable and (kind == "no_loss" or a == len(winners)):
        verdict = "held"
    else:
        verdict = "not resolved"
    return {"verdict": verdict, "a": a, "b": b, "n": len(winners)}
