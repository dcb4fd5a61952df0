"""Periodic validation grid: the student's few-step samples for fixed prompts and seeds, as one PNG.

Loss curves of consistency distillation say little about image quality, so every ``validation.every`` steps
the trainer renders ``validation.prompts`` (rows) at each of ``validation.steps`` (columns) with the current
LoRA, from the same initial noise every time, so grids of successive steps are directly comparable. Prompts are
encoded once; each step count is one compiled function (sampler loop + VAE decode) reused for the whole run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from tdd_jax import conditioning
from tdd_jax.diffusion.sampler import SamplerSettings, sample
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models.loading import read_config
from tdd_jax.training import sharding
from tdd_jax.training.frozen import FrozenPipeline


def sampler_settings(cfg, num_steps: int) -> SamplerSettings:
    """The sampler the distilled LoRA is meant for, on the training solver grid."""
    return SamplerSettings(num_steps=num_steps, gamma=cfg.validation.gamma,
                           guidance_scale=cfg.validation.guidance_scale, grid_steps=cfg.solver.num_steps,
                           k_min=cfg.target.k_min, k_max=cfg.target.k_max).validate()


def to_grid(images: np.ndarray) -> np.ndarray:
    """(rows, cols, H, W, 3) uint8 -> one (rows·H, cols·W, 3) image."""
    rows, cols, h, w, c = images.shape
    return images.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


class Validator:
    """Renders the validation grid of a LoRA; call it on every process (the arrays are global)."""

    def __init__(self, cfg, frozen: FrozenPipeline, schedule: NoiseSchedule):
        if not frozen.has_encoders:
            raise ValueError("validation needs the text encoders and the VAE (load_frozen(..., encoders=True))")
        self._cfg = cfg
        self._frozen = frozen
        self._schedule = schedule
        prompts = list(cfg.validation.prompts)
        ids = [conditioning.tokenize(tok, prompts) for tok in conditioning.load_tokenizers(cfg.pipeline_dir)]
        replicated = sharding.replicated(frozen.mesh)
        embeds, pooled = jax.jit(frozen.encode_prompts, out_shardings=replicated)(frozen.params, *ids)
        size = cfg.resolution
        ids_6 = np.tile(conditioning.time_ids((size, size), (0, 0), (size, size)), (len(prompts), 1))
        self._cond = {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": ids_6}
        vae_factor = 2 ** (len(read_config(Path(cfg.pipeline_dir) / "vae")["block_out_channels"]) - 1)
        channels = read_config(Path(cfg.pipeline_dir) / "unet")["in_channels"]
        self._latent_shape = (size // vae_factor, size // vae_factor, channels)
        self._fns = {n: jax.jit(functools.partial(self._render, sampler_settings(cfg, n)),
                                out_shardings=replicated) for n in cfg.validation.steps}

    def _render(self, settings: SamplerSettings, params: dict, lora: nnx.State, cond: dict) -> jax.Array:
        """Sample and decode; the noise comes from fixed seeds (prompt i: validation.seed + i)."""
        seed = self._cfg.validation.seed
        x_T = jnp.stack([jax.random.normal(jax.random.key(seed + i), self._latent_shape)
                         for i in range(len(self._cfg.validation.prompts))])
        key = jax.random.key(seed)
        unet = self._frozen.unet(params, lora)

        def model_fn(x, t, c):
            return unet(x, t, c["prompt_embeds"], {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]})

        uncond = jax.tree.map(jnp.zeros_like, cond)
        uncond["time_ids"] = cond["time_ids"]
        latents = sample(model_fn, self._schedule, settings, x_T, key, cond, uncond)
        vae = nnx.merge(self._frozen.graphdefs["vae"], params["vae"])
        z = latents / self._frozen.vae_scaling_factor + self._frozen.vae_shift_factor
        images = vae.decode(z).astype(jnp.float32)
        return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)

    def __call__(self, params: dict, lora: nnx.State) -> np.ndarray:
        """The grid as a (rows·H, cols·W, 3) uint8 array: rows = prompts, columns = step counts."""
        columns = [np.asarray(jax.device_get(fn(params, lora, self._cond)))
                   for fn in self._fns.values()]
        return to_grid(np.stack(columns, axis=1))


def save_png(grid: np.ndarray, workdir: epath.Path, step: int) -> epath.Path:
    """workdir/validation/step_<step>.png (workdir may be a gs:// path)."""
    path = workdir / "validation" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    return path
