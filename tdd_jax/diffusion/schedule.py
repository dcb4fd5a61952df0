"""The discrete VP noise schedule of a diffusers pipeline: ᾱ_t, α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ_t = log(α_t/σ_t).

Timesteps are integers in [0, T). The extra timestep ``CLEAN = -1`` stands for the data itself (ᾱ = 1, α = 1,
σ = 0, λ = +inf): the TDD sampler's last step and any target "all the way to x0" land there, which diffusers'
schedulers cannot express (their lowest level is ᾱ_0 < 1). All methods take per-sample timesteps of shape
(B,) (or a scalar) and broadcast them over the trailing axes of NHWC arrays, and are traceable under jax.jit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

CLEAN = -1
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# diffusers' defaults for fields a scheduler_config.json may leave out.
_CONFIG_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                    "beta_schedule": "linear", "prediction_type": "epsilon"}


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's squaredcos_cap_v2: β_i = 1 − ᾱ(t_{i+1})/ᾱ(t_i) for ᾱ(t) = cos²((t + 0.008)/1.008 · π/2), capped."""
    edges = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((edges + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _betas(cfg: dict) -> np.ndarray:
    """β_t in float64 (diffusers uses float32; float64 agrees with it to ~1e-6 relative and is the exact value)."""
    num = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], np.float64)
    kind = cfg["beta_schedule"]
    if kind == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], num, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, num, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return _cosine_betas(num)
    raise ValueError(f"scheduler config field beta_schedule={kind!r} is not supported; "
                     f"expected one of {BETA_SCHEDULES}")


def expand_like(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape per-sample values (B,) or () so they broadcast over x's trailing (H, W, C) axes."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


@struct.dataclass
class NoiseSchedule:
    """ᾱ_t table plus the model's output parameterisation. A frozen pytree: pass it to or close it over jax.jit."""

    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @classmethod
    def from_config(cls, cfg: dict) -> NoiseSchedule:
        """Build from diffusers scheduler_config.json fields (missing fields take diffusers' defaults)."""
        cfg = {**_CONFIG_DEFAULTS, **dict(cfg)}
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"scheduler config field prediction_type={cfg['prediction_type']!r} is not supported; "
                             f"expected one of {PREDICTION_TYPES}")
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config field rescale_betas_zero_snr=True is not supported "
                             "(σ_T = 0 breaks ε-parameterised x0 recovery)")
        alphas_cumprod = np.cumprod(1.0 - _betas(cfg))
        return cls(jnp.asarray(alphas_cumprod, jnp.float32), cfg["prediction_type"])

    @classmethod
    def from_pretrained(cls, pipeline_dir: str | Path) -> NoiseSchedule:
        """Read ``<pipeline_dir>/scheduler/scheduler_config.json`` of a diffusers pipeline folder."""
        path = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no scheduler config at {path} (expected a diffusers pipeline folder)")
        return cls.from_config(json.loads(path.read_text()))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_cumprod(self, t) -> jax.Array:
        """ᾱ_t, with ᾱ = 1 at t = CLEAN."""
        t = jnp.asarray(t, jnp.int32)
        return jnp.where(t == CLEAN, 1.0, self.alphas_cumprod[jnp.clip(t, 0, None)])

    def alpha(self, t) -> jax.Array:
        return jnp.sqrt(self.alpha_cumprod(t))

    def sigma(self, t) -> jax.Array:
        return jnp.sqrt(1.0 - self.alpha_cumprod(t))

    def lam(self, t) -> jax.Array:
        """Half log-SNR λ_t = log α_t − log σ_t (+inf at CLEAN)."""
        return jnp.log(self.alpha(t)) - jnp.log(self.sigma(t))

    def to_x0_eps(self, model_out: jax.Array, x_t: jax.Array, t) -> tuple[jax.Array, jax.Array]:
        """(x̂0, ε̂) implied by a model output at (x_t, t), for the schedule's prediction type."""
        t = jnp.asarray(t, jnp.int32)
        a, s = expand_like(self.alpha(t), x_t), expand_like(self.sigma(t), x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * model_out) / a, model_out
        if self.prediction_type == "v_prediction":
            return a * x_t - s * model_out, a * model_out + s * x_t
        return model_out, (x_t - a * model_out) / s

    def add_noise(self, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
        """Forward process q(x_t | x0): α_t·x0 + σ_t·noise."""
        t = jnp.asarray(t, jnp.int32)
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * noise
