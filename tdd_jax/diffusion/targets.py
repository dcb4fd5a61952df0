"""Target-timestep rules (paper Eq. 5): which τ ≤ t_n the consistency function maps to during distillation.

One config (``TargetRule``) drives TDD and the baselines, all on the teacher's solver grid:
- ``tdd``: τ from the union of the K-step equidistant schedules, K ∈ [k_min, k_max] (plus 0), picked uniformly
  within ``bound`` below t_n's largest set member ub, then offset: τ̃ = ⌊(1 − U·η)·pick⌋, U ~ U[0, 1).
- ``pcm``: τ = the largest of ``pcm_phases`` phase edges ≤ t_n.
- ``lcm``: τ = 0 (plain consistency distillation; use with ``lcm_boundary_fn``).
- ``tcd``: τ uniform over the grid landing points ≤ t_n (TCD's end index ~ U{0..n}), with the same η offset.
``sample_targets`` is vectorised and jittable (the rule is static; candidate sets are baked-in constants of at
most num_solver_steps entries, searched by comparison against all of them, which suits accelerators).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tdd_jax.diffusion.solver import equidistant_timesteps, solver_prev_timesteps

KINDS = ("tdd", "pcm", "lcm", "tcd")
# Default bound = T/K_min + 4 %: the previous K_min anchor can be up to T/K_min + T/N away on the solver grid
# (index flooring: 751 → 499 is 252 on the 250 grid), and T=1000, K_min=4 gives the official 260.
BOUND_SLACK = 1.04


@dataclasses.dataclass(frozen=True)
class TargetRule:
    """Target-timestep rule. Hashable, so it can be a static argument of jax.jit."""

    kind: str = "tdd"
    k_min: int = 4
    k_max: int = 8
    bound: int | None = None  # None: round(BOUND_SLACK · T / k_min) (= 260, the official value)
    eta: float = 0.3  # offset ratio η for tdd and tcd (0 disables); ignored by pcm and lcm
    num_solver_steps: int = 250
    num_train_timesteps: int = 1000
    pcm_phases: int = 4

    @property
    def resolved_bound(self) -> int:
        if self.bound is not None:
            return self.bound
        return round(BOUND_SLACK * self.num_train_timesteps / self.k_min)

    # The trainer-config field that sets each rule field (for error messages).
    CONFIG_FIELDS = {"kind": "target.kind", "k_min": "target.k_min", "k_max": "target.k_max",
                     "bound": "target.bound", "eta": "target.eta", "pcm_phases": "target.pcm_phases",
                     "num_solver_steps": "solver.num_steps"}

    @classmethod
    def from_config(cls, cfg, num_train_timesteps: int) -> TargetRule:
        """The rule of a trainer config (``cfg.target.*``, ``cfg.solver.num_steps``), validated; a ValueError
        names the config field (``target.k_min: ...``)."""
        t = cfg.target
        rule = cls(kind=t.kind, k_min=int(t.k_min), k_max=int(t.k_max),
                   bound=None if t.bound is None else int(t.bound), eta=float(t.eta),
                   num_solver_steps=int(cfg.solver.num_steps), num_train_timesteps=int(num_train_timesteps),
                   pcm_phases=int(t.pcm_phases))
        return rule.validate(names=cls.CONFIG_FIELDS)

    def validate(self, names: dict[str, str] | None = None) -> TargetRule:
        """Raise ValueError starting with the offending field's name (``names`` maps rule fields to the names the
        caller knows them by); returns self for chaining."""
        name = (lambda f: names.get(f, f)) if names else (lambda f: f)
        T, N = self.num_train_timesteps, self.num_solver_steps
        checks = [
            (self.kind in KINDS, "kind", f"{self.kind!r} is not one of {KINDS}"),
            (1 <= N <= T and T % N == 0, "num_solver_steps",
             f"{N} must divide the num_train_timesteps={T} training timesteps"),
            (1 <= self.k_min <= self.k_max, "k_min", f"k_min={self.k_min} must be in [1, {name('k_max')}={self.k_max}]"),
            (self.k_max <= N, "k_max", f"{self.k_max} exceeds {name('num_solver_steps')}={N}"),
            (0.0 <= self.eta <= 1.0, "eta", f"{self.eta} must be in [0, 1]"),
            (self.bound is None or self.bound >= 0, "bound", f"{self.bound} must be >= 0 (or None)"),
            (1 <= self.pcm_phases <= N, "pcm_phases", f"{self.pcm_phases} must be in [1, {name('num_solver_steps')}={N}]"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ValueError(f"{name(field)}: {message}")
        return self


def tdd_target_set(rule: TargetRule) -> np.ndarray:
    """Sorted union of the K-step schedules for K ∈ [k_min, k_max], with 0 added and the start timestep dropped.

    The start (T−1, shared by every schedule) is never a target; 0 lets the last phase map to the clean end.
    For the defaults this is the official 22-value "merged timesteps" list.
    """
    steps = [equidistant_timesteps(k, rule.num_solver_steps, rule.num_train_timesteps)
             for k in range(rule.k_min, rule.k_max + 1)]
    merged = np.union1d(np.concatenate(steps), [0])
    return merged[merged != steps[0][0]]


def pcm_edges(rule: TargetRule) -> np.ndarray:
    """PCM phase edges as timesteps: DDIM landing points at grid indices floor(linspace(0, N, K, endpoint=False)).

    Official PCM compares the grid index of t_{n+k} with these edge indices and lands on ``prev_grid[edge]``;
    since t_n = prev_grid[n], "edge index ≤ n" is "edge timestep ≤ t_n". N=250, K=4: 0, 247, 499, 747.
    """
    indices = np.floor(np.linspace(0, rule.num_solver_steps, rule.pcm_phases, endpoint=False)).astype(np.int64)
    return solver_prev_timesteps(rule.num_solver_steps, rule.num_train_timesteps)[indices]


def _last_at_or_below(values: np.ndarray, t: jax.Array) -> jax.Array:
    """Index of the largest entry of the sorted ``values`` that is <= t (values[0] must be <= t)."""
    return jnp.searchsorted(values, t, side="right", method="compare_all") - 1


def _uniform_pick(key: jax.Array, candidates: np.ndarray, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """candidates[i] with i ~ U{lo..hi} per sample (a contiguous run of the sorted candidate array)."""
    return jnp.asarray(candidates, jnp.int32)[jax.random.randint(key, lo.shape, lo, hi + 1)]


def _offset(key: jax.Array, pick: jax.Array, eta: float) -> jax.Array:
    """τ̃ = ⌊(1 − U·η)·pick⌋ with U ~ U[0, 1): a target anywhere in ((1−η)·pick, pick]."""
    if eta == 0.0:
        return pick
    u = jax.random.uniform(key, pick.shape)
    return jnp.floor((1.0 - u * eta) * pick).astype(jnp.int32)


def sample_targets(rule: TargetRule, key: jax.Array, t_n: jax.Array) -> jax.Array:
    """Per-sample target timesteps τ (int32, t_n's shape) with 0 <= τ <= t_n, for t_n >= 0."""
    rule.validate()
    t_n = jnp.asarray(t_n, jnp.int32)
    if rule.kind == "lcm":
        return jnp.zeros_like(t_n)
    if rule.kind == "pcm":
        edges = pcm_edges(rule)
        return jnp.asarray(edges, jnp.int32)[_last_at_or_below(edges, t_n)]
    pick_key, offset_key = jax.random.split(key)
    if rule.kind == "tdd":
        candidates = tdd_target_set(rule)
        hi = _last_at_or_below(candidates, t_n)  # ub = candidates[hi]
        lower = jnp.maximum(jnp.asarray(candidates, jnp.int32)[hi] - rule.resolved_bound, 0)
        lo = jnp.searchsorted(candidates, lower, side="left", method="compare_all")
    else:
        candidates = solver_prev_timesteps(rule.num_solver_steps, rule.num_train_timesteps)
        hi = _last_at_or_below(candidates, t_n)
        lo = jnp.zeros_like(hi)
    return _offset(offset_key, _uniform_pick(pick_key, candidates, lo, hi), rule.eta)
