"""The TDD few-step sampler (official tdd_scheduler: single-step DPM-Solver++(1) with γ-renoising) as one jitted loop.

Step i at t_i: one model call (cond and uncond batched as 2B when CFG is on) → (x̂0, ε̂), optional dynamic
thresholding of x̂0, DDIM jump to s_i = ⌊(1−γ)·t_{i+1}⌋, then renoise s_i → t_{i+1} with fresh noise z:
x = √(ᾱ_{t_{i+1}}/ᾱ_s)·x_s + √(1 − ᾱ_{t_{i+1}}/ᾱ_s)·z. The last step jumps to CLEAN (σ = 0, returns x̂0 exactly,
official TDD) or to ᾱ_0 (final_step='tcd', diffusers' TCDScheduler). The steps run as a lax.scan over static
per-step tables, so the model is traced and compiled once whatever the number of steps.
"""

from __future__ import annotations

import dataclasses
import logging
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tdd_jax.conditioning import cfg_pair, split_cfg_pair
from tdd_jax.diffusion.schedule import CLEAN, NoiseSchedule
from tdd_jax.diffusion.solver import ddim_step, equidistant_timesteps, guide

FINAL_STEPS = ("clean", "tcd")

# model_fn(x [B,H,W,C], t [B] int32, cond pytree with leading axis B[, this step's row of per_step]) -> model
# output like x. per_step (``sample``): model inputs that change with the step, e.g. ControlNet scales.
ModelFn = Callable[..., jax.Array]


def sampler_timesteps(num_steps: int, *, grid_steps: int = 250, num_train_timesteps: int = 1000,
                      non_equidistant: bool = False, k_min: int = 4, k_max: int = 8) -> tuple[int, ...]:
    """Descending inference timesteps on the solver grid.

    Equidistant: ``equidistant_timesteps`` (N=4: 999, 751, 499, 251). Non-equidistant: keep the k_min-step
    anchors and add the k_max-step schedule's other points from the highest-noise gap down, which reproduces the
    official special jumps (N=5: 999, 875, 751, 499, 251; N=7: ..., 499, 375, 251) and gives the k_max schedule
    at N = k_max. It puts the extra steps where the student's targets are densest in noise level. Outside
    [k_min, k_max] it falls back to the equidistant schedule, as the official sampler does (logged).
    """
    if not non_equidistant:
        return tuple(int(t) for t in equidistant_timesteps(num_steps, grid_steps, num_train_timesteps))
    if not k_min <= num_steps <= k_max:  # the official sampler's behaviour: other N are equidistant
        logging.info("non_equidistant: num_steps=%d is outside [k_min=%d, k_max=%d]; using the equidistant "
                     "schedule", num_steps, k_min, k_max)
        return sampler_timesteps(num_steps, grid_steps=grid_steps, num_train_timesteps=num_train_timesteps)
    anchors = equidistant_timesteps(k_min, grid_steps, num_train_timesteps)
    extra = np.setdiff1d(equidistant_timesteps(k_max, grid_steps, num_train_timesteps), anchors)[::-1]
    chosen = np.concatenate([anchors, extra[:num_steps - k_min]])
    return tuple(int(t) for t in np.sort(chosen)[::-1])


def _setting(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None):
    """A ``SamplerSettings`` field: its default, and the help text, command-line name (default: the field's) and
    choices that ``tdd_jax.sample`` builds its flags from, so each setting is declared here only."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides a sample besides (x_T, key, prompt). Hashable, so it can be jit-static.

    guidance_scale uses diffusers' convention (1 = no CFG): guided = u + s·(c − u). w_prime (the training
    guidance w' of paper Eq. 13/14; None or 0 = off) then tunes it to (guided + w'·u)/(1 + w'): a student trained
    against LCM-form CFG learned ε_s(c) ≈ (1 + w')·ε(c) − w'·ε(∅) and ε_s(∅) ≈ ε(∅), so at s = 1 this gives back
    the teacher's unguided ε(c), and s > 1 extrapolates from there. clip_* is Imagen's dynamic thresholding of x̂0
    (diffusers semantics) on steps i < clip_steps. Each field's help text is in its metadata (``_setting``).
    """

    num_steps: int = _setting(4, "sampling steps", flag="steps")
    gamma: float = _setting(0.2, "renoise strength γ (0 = deterministic sampling)")
    guidance_scale: float = _setting(1.7, "classifier-free guidance scale (1 = off)")
    w_prime: float | None = _setting(None, "training guidance w' for the guidance-scale tuning (paper Eq. 13/14)")
    non_equidistant: bool = _setting(False, "TDD's non-equidistant timestep schedule")
    clip_steps: int = _setting(0, "dynamic-threshold x0 on the first N steps")
    clip_percentile: float = _setting(0.995, "dynamic thresholding: quantile of |x0| that sets the clip value")
    clip_max: float = _setting(1.0, "dynamic thresholding: the largest clip value")
    final_step: str = _setting("clean", "clean: the last step returns x0 (TDD); tcd: it ends at alpha_bar_0 "
                               "(diffusers' TCDScheduler)", choices=FINAL_STEPS)
    grid_steps: int = _setting(250, "solver grid the LoRA was trained on")
    strength: float = _setting(1.0, "img2img: how far the init image is noised, diffusers' strength: the last "
                               "int(steps x strength) of the steps run, from the init image noised to the first "
                               "of them (1 = all steps)")
    k_min: int = _setting(4, "non-equidistant schedule: the steps whose timesteps are always kept")
    k_max: int = _setting(8, "non-equidistant schedule: the schedule the extra steps are taken from")

    @property
    def uses_cfg(self) -> bool:
        """Whether the unconditional branch is needed (CFG or guidance-scale tuning)."""
        return self.guidance_scale != 1.0 or bool(self.w_prime)

    def validate(self) -> SamplerSettings:
        """Raise ValueError naming the offending field; returns self for chaining."""
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"sampler field gamma={self.gamma} must be in [0, 1]")
        if not self.guidance_scale >= 1.0:  # < 1 weakens the prompt, < 0 pushes away from it (NaN: refused too)
            raise ValueError(f"sampler field guidance_scale={self.guidance_scale} must be >= 1 (1 = no CFG)")
        if self.w_prime is not None and self.w_prime < 0:
            raise ValueError(f"sampler field w_prime={self.w_prime} must be >= 0 (or None)")
        if self.clip_steps < 0:
            raise ValueError(f"sampler field clip_steps={self.clip_steps} must be >= 0")
        if not 0.0 < self.clip_percentile <= 1.0:
            raise ValueError(f"sampler field clip_percentile={self.clip_percentile} must be in (0, 1]")
        if self.clip_max < 1.0:
            raise ValueError(f"sampler field clip_max={self.clip_max} must be >= 1")
        if not 0.0 < self.strength <= 1.0 or int(self.num_steps * self.strength) < 1:
            raise ValueError(f"sampler field strength={self.strength} must be in (0, 1] and run at least one of "
                             f"the {self.num_steps} steps (strength >= 1/{self.num_steps})")
        if self.final_step not in FINAL_STEPS:
            raise ValueError(f"sampler field final_step={self.final_step!r} is not one of {FINAL_STEPS}")
        return self

    def timesteps(self, num_train_timesteps: int = 1000) -> tuple[int, ...]:
        """The timesteps that run: the last int(num_steps · strength) of the schedule (diffusers' img2img
        ``get_timesteps``), all of them at strength 1."""
        full = sampler_timesteps(self.num_steps, grid_steps=self.grid_steps,
                                 num_train_timesteps=num_train_timesteps, non_equidistant=self.non_equidistant,
                                 k_min=self.k_min, k_max=self.k_max)
        return full[self.num_steps - min(int(self.num_steps * self.strength), self.num_steps):]


def dynamic_threshold(x0: jax.Array, percentile: float, max_value: float) -> jax.Array:
    """Imagen dynamic thresholding: s = clamp(quantile(|x0|, p), 1, max) per sample; x0 → clamp(x0, −s, s)/s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.clip(jnp.quantile(flat, percentile, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def guided_model_output(model_fn: ModelFn, settings: SamplerSettings, x: jax.Array, t: jax.Array, cond: Any,
                        uncond: Any, *step_inputs: Any) -> jax.Array:
    """Model output at (x, t) with CFG and guidance-scale tuning; one 2B call (``cfg_pair``) when CFG is on.
    step_inputs: passed on to model_fn after the conditioning (this step's row of ``per_step``)."""
    batch = x.shape[0]
    t = jnp.full((batch,), t, jnp.int32)
    if not settings.uses_cfg:
        return model_fn(x, t, cond, *step_inputs).astype(jnp.float32)
    x2, t2, both = cfg_pair((x, t, cond), (x, t, uncond))
    out_c, out_u = split_cfg_pair(model_fn(x2, t2, both, *step_inputs).astype(jnp.float32))
    guided = guide(out_c, out_u, settings.guidance_scale - 1.0)
    if settings.w_prime:
        guided = (guided + settings.w_prime * out_u) / (1.0 + settings.w_prime)
    return guided


def _step_tables(settings: SamplerSettings, num_train_timesteps: int) -> dict[str, np.ndarray]:
    """Static per-step (t, s, t_next, clip) tables. The last step has t_next = s, so its renoise is the identity."""
    t = np.asarray(settings.timesteps(num_train_timesteps), np.int32)
    last = CLEAN if settings.final_step == "clean" else 0
    s = np.array([math.floor((1.0 - settings.gamma) * tn) for tn in t[1:]] + [last], np.int32)
    t_next = np.concatenate([t[1:], [last]]).astype(np.int32)
    clip = np.arange(len(t)) < settings.clip_steps
    return {"t": t, "s": s, "t_next": t_next, "clip": clip}


def _denoise_loop(model_fn: ModelFn, schedule: NoiseSchedule, settings: SamplerSettings, x_T: jax.Array,
                  renoise: jax.Array | None, cond: Any, uncond: Any,
                  per_step: Any = None) -> tuple[jax.Array, jax.Array]:
    """The sampling loop with explicit renoise noise (N, *x_T.shape) (entry N−1 unused; None when γ = 0).

    Returns (final latents, the latents after every step). Explicit noise lets tests share it with diffusers.
    """
    tables = _step_tables(settings, schedule.num_train_timesteps)
    if renoise is not None:
        tables["z"] = renoise
    if per_step is not None:
        tables["model"] = per_step

    def step(x, row):
        step_inputs = () if per_step is None else (row["model"],)
        out = guided_model_output(model_fn, settings, x, row["t"], cond, uncond, *step_inputs)
        x0, eps = schedule.to_x0_eps(out, x, row["t"])
        if settings.clip_steps:
            # Clip x̂0, then re-derive ε̂ from it (the DPM-Solver++ data-prediction update implies this).
            clipped = dynamic_threshold(x0, settings.clip_percentile, settings.clip_max)
            x0 = jnp.where(row["clip"], clipped, x0)
            eps = jnp.where(row["clip"], (x - schedule.alpha(row["t"]) * x0) / schedule.sigma(row["t"]), eps)
        x = ddim_step(schedule, x0, eps, row["s"])
        if renoise is not None:
            ratio = schedule.alpha_cumprod(row["t_next"]) / schedule.alpha_cumprod(row["s"])
            x = jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * row["z"]
        return x, x

    return jax.lax.scan(step, x_T.astype(jnp.float32), tables)


def renoise_noise(key: jax.Array, num_steps: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normals (num_steps, *shape) for the renoise steps.

    One key draws the whole block; a batch of typed keys (shape (B,), one per sample) gives every sample its own
    stream, so a sample does not depend on its batch neighbours or its position in the batch.
    """
    if key.ndim == 1 and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        per_sample = jax.vmap(lambda k: jax.random.normal(k, (num_steps,) + shape[1:], jnp.float32))(key)
        return jnp.swapaxes(per_sample, 0, 1)
    return jax.random.normal(key, (num_steps,) + shape, jnp.float32)


def sample(model_fn: ModelFn, schedule: NoiseSchedule, settings: SamplerSettings, x_T: jax.Array,
           key: jax.Array, cond: Any, uncond: Any = None, *, per_step: Any = None) -> jax.Array:
    """Run the N-step sampler from x_T (float32 NHWC latents); traceable, meant to be run under one jax.jit.

    Renoise noise comes from ``key`` only (one key, or one typed key per sample: see ``renoise_noise``), so
    (x_T, key, cond, settings) fixes the result. ``uncond`` (same pytree structure as ``cond``: SDXL's zero
    embeddings or a negative prompt) is required when ``settings.uses_cfg``. ``per_step``: a pytree of arrays
    with leading axis len(settings.timesteps()) (the steps that run); step i calls model_fn(x, t, cond, its row i) (e.g. ControlNet scales).
    """
    settings.validate()
    if settings.uses_cfg and uncond is None:
        raise ValueError("uncond is required when guidance_scale != 1 or w_prime is set")
    renoise = None
    if settings.gamma > 0:
        renoise = renoise_noise(key, len(settings.timesteps(schedule.num_train_timesteps)), x_T.shape)
    final, _ = _denoise_loop(model_fn, schedule, settings, x_T, renoise, cond, uncond, per_step)
    return final


def make_sampler(model_fn: ModelFn, schedule: NoiseSchedule,
                 settings: SamplerSettings) -> Callable[[jax.Array, jax.Array, Any, Any], jax.Array]:
    """``sample`` compiled with jax.jit as f(x_T, key, cond, uncond=None) -> latents.

    Arrays that model_fn closes over become compile-time constants; for a large UNet, put ``sample`` inside your
    own jax.jit that takes the weights as an argument instead.
    """
    settings.validate()
    return jax.jit(functools.partial(sample, model_fn, schedule, settings))
