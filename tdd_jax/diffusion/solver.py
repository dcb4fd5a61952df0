"""The teacher's ODE solver: DDIM on a coarse N-step grid of the T training timesteps, with LCM-form CFG.

Grid conventions follow the official TDD/LCM/PCM code: the grid is ``[1..N]·(T//N) − 1`` (ascending, ends at
T−1); a solver step from grid index n goes from ``t_{n+k} = grid[n]`` down to ``t_n = prev_grid[n]``
(``max(t_{n+k} − T//N, 0)``); inference schedules are taken from the reversed grid at evenly spaced indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tdd_jax.diffusion.schedule import NoiseSchedule, expand_like


def _check_grid(num_steps: int, num_train_timesteps: int, field: str) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"{field}={num_steps} must be in [1, num_train_timesteps={num_train_timesteps}]")


def solver_timesteps(num_steps: int = 250, num_train_timesteps: int = 1000) -> np.ndarray:
    """Ascending solver grid ``[1..N]·(T//N) − 1`` (N=250: 3, 7, ..., 999)."""
    _check_grid(num_steps, num_train_timesteps, "num_solver_steps")
    return np.arange(1, num_steps + 1, dtype=np.int64) * (num_train_timesteps // num_steps) - 1


def solver_prev_timesteps(num_steps: int = 250, num_train_timesteps: int = 1000) -> np.ndarray:
    """Where a DDIM step from each grid point lands: ``[0] + grid[:-1]`` (= max(grid − T//N, 0))."""
    grid = solver_timesteps(num_steps, num_train_timesteps)
    return np.concatenate([[0], grid[:-1]])


def equidistant_timesteps(num_steps: int, grid_steps: int = 250, num_train_timesteps: int = 1000) -> np.ndarray:
    """Descending K-step schedule: reversed grid at indices floor(linspace(0, N, K, endpoint=False)).

    K=4 on the 250 grid gives 999, 751, 499, 251. The TDD target set and the sampler both use it.
    """
    _check_grid(grid_steps, num_train_timesteps, "grid_steps")
    if not 1 <= num_steps <= grid_steps:
        raise ValueError(f"num_steps={num_steps} must be in [1, grid_steps={grid_steps}]")
    reversed_grid = solver_timesteps(grid_steps, num_train_timesteps)[::-1]
    return reversed_grid[np.floor(np.linspace(0, grid_steps, num_steps, endpoint=False)).astype(np.int64)]


def ddim_step(schedule: NoiseSchedule, x0: jax.Array, eps: jax.Array, t_prev) -> jax.Array:
    """Deterministic DDIM jump to t_prev: √ᾱ_{t_prev}·x̂0 + √(1−ᾱ_{t_prev})·ε̂ (t_prev = CLEAN returns x̂0)."""
    t_prev = jnp.asarray(t_prev, jnp.int32)
    return expand_like(schedule.alpha(t_prev), x0) * x0 + expand_like(schedule.sigma(t_prev), x0) * eps


def guide(cond_out: jax.Array, uncond_out: jax.Array, w) -> jax.Array:
    """LCM-form CFG ``c + w·(c − u)`` (= usual scale 1 + w); w is a scalar or per-sample (B,), w = 0 means no CFG."""
    w = expand_like(jnp.asarray(w, cond_out.dtype), cond_out)
    return cond_out + w * (cond_out - uncond_out)


def sample_guidance_weight(key: jax.Array, batch: int, w_min: float, w_max: float) -> jax.Array:
    """Per-sample teacher guidance w ~ U[w_min, w_max] (w_min = w_max gives the official fixed w)."""
    if w_min > w_max:
        raise ValueError(f"guidance w_min={w_min} must be <= w_max={w_max}")
    return jax.random.uniform(key, (batch,), jnp.float32, w_min, w_max)
