"""Consistency-function parameterisations: the student output and the distillation target are both f(x_t, t, ·).

TDD/TCD/PCM use the first-order DPM-Solver++ (= DDIM) map to an arbitrary target timestep τ, with no
c_skip/c_out: f(x_t, t, τ) = α_τ·x̂0 + σ_τ·ε̂. At τ = t it is the identity (x̂0 and ε̂ recombine to x_t), which is
PCM's "c_skip = 1 on a phase edge" for free. LCM instead maps to x0 with boundary scalings in timestep units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdd_jax.diffusion.schedule import NoiseSchedule, expand_like
from tdd_jax.diffusion.solver import ddim_step

SIGMA_DATA = 0.5


def consistency_fn(schedule: NoiseSchedule, model_out: jax.Array, x_t: jax.Array, t, tau) -> jax.Array:
    """x_τ = α_τ·x̂0 + σ_τ·ε̂ from the model output at (x_t, t); t and τ are per-sample (B,) or scalars."""
    x0, eps = schedule.to_x0_eps(model_out, x_t, t)
    return ddim_step(schedule, x0, eps, tau)


def lcm_boundary_scalings(t, timestep_scaling: float = 10.0) -> tuple[jax.Array, jax.Array]:
    """LCM's c_skip = σ_d²/((s·t)² + σ_d²), c_out = s·t/√((s·t)² + σ_d²), t an integer timestep, s = scaling."""
    scaled = jnp.asarray(t, jnp.float32) * timestep_scaling
    denom = scaled**2 + SIGMA_DATA**2
    return SIGMA_DATA**2 / denom, scaled / jnp.sqrt(denom)


def lcm_boundary_fn(schedule: NoiseSchedule, model_out: jax.Array, x_t: jax.Array, t,
                    timestep_scaling: float = 10.0) -> jax.Array:
    """LCM's f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0, so that f(x, 0) ≈ x (the consistency boundary condition)."""
    x0, _ = schedule.to_x0_eps(model_out, x_t, t)
    c_skip, c_out = lcm_boundary_scalings(t, timestep_scaling)
    return expand_like(c_skip, x_t) * x_t + expand_like(c_out, x_t) * x0
