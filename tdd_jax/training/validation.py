"""Validation grid: the student's few-step samples beside the teacher's, for fixed prompts and seeds, as a PNG.

Loss curves of consistency distillation say little about image quality, so every ``validation.every`` steps
(and after the last step) the trainer renders ``validation.prompts`` (rows) from the same initial noise every
time, in these columns: the teacher with ``validation.teacher_steps`` steps (LoRA off, deterministic DDIM,
``validation.teacher_guidance_scale``; omitted when 0), then for each of ``validation.steps`` the base model
with that few steps (same teacher sampler) next to the student with its own γ-sampler. The teacher and base
columns do not change during training: they are rendered once. The last grid is also written as
``workdir/comparison.png``: the side-by-side that shows what distillation bought. Prompts are encoded once;
each column is one compiled function (sampler loop + VAE decode).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from tdd_jax import conditioning
from tdd_jax.diffusion.sampler import SamplerSettings
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.image_grid import labelled_grid
from tdd_jax.models.loading import read_config
from tdd_jax.render import render
from tdd_jax.training import sharding
from tdd_jax.training.frozen import FrozenPipeline


def sampler_settings(cfg, num_steps: int) -> SamplerSettings:
    """The sampler the distilled LoRA is meant for, on the training solver grid."""
    return SamplerSettings(num_steps=num_steps, gamma=cfg.validation.gamma,
                           guidance_scale=cfg.validation.guidance_scale, grid_steps=cfg.solver.num_steps,
                           k_min=cfg.target.k_min, k_max=cfg.target.k_max).validate()


def teacher_settings(cfg, num_steps: int) -> SamplerSettings:
    """How the base model is sampled for reference: deterministic DDIM (γ = 0) with the teacher's CFG."""
    return SamplerSettings(num_steps=num_steps, gamma=0.0, guidance_scale=cfg.validation.teacher_guidance_scale,
                           grid_steps=cfg.solver.num_steps).validate()


COMPARISON = "comparison.png"


class Validator:
    """Renders the validation grid of a LoRA on ``mesh``; call it on every process (the arrays are global)."""

    def __init__(self, cfg, frozen: FrozenPipeline, schedule: NoiseSchedule, mesh: Mesh):
        if not frozen.has_encoders:
            raise ValueError("validation needs the text encoders and the VAE (load_frozen(..., encoders=True))")
        self._cfg = cfg
        self._frozen = frozen
        self._schedule = schedule
        prompts = list(cfg.validation.prompts)
        ids = [conditioning.tokenize(tok, prompts) for tok in conditioning.load_tokenizers(cfg.pipeline_dir)]
        replicated = sharding.replicated(mesh)  # the mesh ``frozen`` was loaded onto
        options = sharding.compiler_options(cfg.mesh, mesh)  # the train step's, e.g. mesh.windowed_einsum
        embeds, pooled = jax.jit(sharding.traced_on(mesh, frozen.encode_prompts), out_shardings=replicated,
                                 compiler_options=options)(frozen.params, *ids)
        size = cfg.resolution
        ids_6 = np.tile(conditioning.time_ids((size, size), (0, 0), (size, size)), (len(prompts), 1))
        self._cond = conditioning.Cond(embeds, pooled, jnp.asarray(ids_6))
        self._seeds = jnp.asarray(cfg.validation.seed + np.arange(len(prompts)), jnp.uint32)
        vae_factor = 2 ** (len(read_config(Path(cfg.pipeline_dir) / "vae")["block_out_channels"]) - 1)
        channels = read_config(Path(cfg.pipeline_dir) / "unet")["in_channels"]
        self._latent_shape = (size // vae_factor, size // vae_factor, channels)
        student = cfg.target.kind.upper()
        teacher_steps = int(cfg.validation.teacher_steps)
        columns = [(f"teacher {teacher_steps}", teacher_settings(cfg, teacher_steps), False)] if teacher_steps else []
        for n in cfg.validation.steps:
            columns += [(f"base {n}", teacher_settings(cfg, n), False),
                        (f"{student} {n}", sampler_settings(cfg, n), True)]
        self.column_labels = [label for label, _, _ in columns]
        self._columns = [(jax.jit(sharding.traced_on(mesh, functools.partial(self._render, settings, use_lora)),
                                  out_shardings=replicated, compiler_options=options), use_lora)
                         for _, settings, use_lora in columns]
        self._fixed: dict[int, np.ndarray] = {}  # column -> images of the columns without LoRA, rendered once

    def _render(self, settings: SamplerSettings, use_lora: bool, params: dict, lora: nnx.State,
                cond: conditioning.Cond) -> jax.Array:
        """Sample and decode from fixed seeds (prompt i: validation.seed + i) with the student (``use_lora``) or the
        teacher, whose graph has no LoRA slots."""
        unet = self._frozen.unet(params, lora) if use_lora else self._frozen.teacher(params)
        vae = nnx.merge(self._frozen.graphdefs["vae"], params["vae"])
        return render(unet, vae, self._schedule, settings, self._seeds, self._latent_shape, cond)

    def __call__(self, params: dict, lora: nnx.State) -> np.ndarray:
        """uint8 images (prompts, columns, H, W, 3), columns as in ``column_labels``."""
        columns = []
        for i, (fn, use_lora) in enumerate(self._columns):
            images = self._fixed.get(i)
            if images is None:
                images = np.asarray(jax.device_get(fn(params, lora, self._cond)))
                if not use_lora:
                    self._fixed[i] = images
            columns.append(images)
        return np.stack(columns, axis=1)

    def picture(self, images: np.ndarray) -> np.ndarray:
        """The grid as one labelled uint8 picture (prompt above each row, column titles on top); small images
        are enlarged (nearest) to about 128 px so that they stay legible."""
        zoom = max(1, 128 // images.shape[2])
        return np.asarray(labelled_grid(images, list(self._cfg.validation.prompts),
                                        column_labels=self.column_labels, zoom=zoom))


def save_png(picture: np.ndarray, path: epath.Path) -> epath.Path:
    """Write a PNG atomically enough for a viewer (``path`` may be a gs:// path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(picture).save(f, format="PNG")
    return path


def grid_path(workdir: epath.Path, step: int) -> epath.Path:
    return workdir / "validation" / f"step_{step:08d}.png"
