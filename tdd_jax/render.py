"""The one render path: seeds -> initial noise -> γ-sampler -> VAE decode -> images, traceable under one jit.

The batch-sampling pipeline, the trainer's validation grid and the evaluation all render through ``render``, so
an image depends on the same things everywhere: (its seed, its conditioning, the sampler settings, the model).
Each seed gives two keys: one draws the initial latents, the other the renoise stream (``sampler.sample``), so
an image never depends on its batch neighbours or its position in the batch. img2img (``init_images``) follows
diffusers' StableDiffusionXLImg2ImgPipeline: the images go through the VAE encoder (one posterior draw, from a
key folded from the seed's noise key), are noised to the first timestep that runs (``SamplerSettings.strength``)
with the seed's initial noise, and the sampler runs the remaining steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdd_jax import control as control_lib
from tdd_jax.conditioning import Cond, unet_output
from tdd_jax.diffusion.sampler import SamplerSettings, sample
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models.vae import AutoencoderKL

OUTPUT_TYPES = ("uint8", "float", "latent")


def seed_keys(seeds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(initial-noise keys, renoise keys), one typed key each per seed (B,)."""
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(seeds)
    return keys[:, 0], keys[:, 1]


def initial_latents(noise_keys: jax.Array, latent_shape: tuple[int, int, int]) -> jax.Array:
    """x_T (B, h, w, C) float32: one standard normal draw per key."""
    return jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(noise_keys)


def posterior_keys(noise_keys: jax.Array) -> jax.Array:
    """img2img: the keys of the VAE posterior draws, one per seed, apart from its initial-noise key."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(noise_keys)


def encode(vae: AutoencoderKL, images: jax.Array, keys: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] -> UNet-space latents: one VAE posterior draw per key (diffusers' img2img
    ``retrieve_latents``), then (z − shift) · scaling_factor."""
    mean, logvar = vae.encode(images.astype(jnp.float32) * 2.0 - 1.0)
    z = jax.vmap(AutoencoderKL.sample)(keys, mean.astype(jnp.float32), logvar.astype(jnp.float32))
    return (z - vae.shift_factor) * vae.scaling_factor


def decode(vae: AutoencoderKL, latents: jax.Array, output_type: str = "uint8") -> jax.Array:
    """UNet-space latents -> images (B, H, W, 3): uint8, floats in [0, 1], or the latents themselves."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
    if output_type == "latent":
        return latents
    decoded = vae.decode(latents / vae.scaling_factor + vae.shift_factor).astype(jnp.float32)
    images = jnp.clip(decoded / 2 + 0.5, 0.0, 1.0)
    return jnp.round(images * 255).astype(jnp.uint8) if output_type == "uint8" else images


def render(unet, vae: AutoencoderKL, schedule: NoiseSchedule, settings: SamplerSettings, seeds: jax.Array,
           latent_shape: tuple[int, int, int], cond: Cond, uncond: Cond | None = None, *,
           x_T: jax.Array | None = None, init_images: jax.Array | None = None,
           output_type: str = "uint8", control: control_lib.Control | None = None) -> jax.Array:
    """Sample with ``unet`` (whatever model it is: base, student, merged LoRA) and decode with ``vae``.

    seeds (B,) uint32 fix the initial noise (unless ``x_T`` is given) and the renoise stream. ``uncond`` is the
    unconditional branch for CFG; None means SDXL's zero embeddings (``Cond.unconditional``). init_images
    (B, H, W, 3) in [0, 1]: img2img, the initial noise (``x_T``) is added to their encoding at the first
    timestep that runs. ``control``: ControlNets whose residuals condition every UNet call, both CFG branches on
    the same control images (as diffusers does without guess_mode), at each step's scales.
    """
    noise_keys, renoise_keys = seed_keys(seeds)
    if x_T is None:
        x_T = initial_latents(noise_keys, latent_shape)
    if init_images is not None:
        init_latents = encode(vae, init_images, posterior_keys(noise_keys))
        x_T = schedule.add_noise(init_latents, x_T, settings.timesteps(schedule.num_train_timesteps)[0])
    if settings.uses_cfg and uncond is None:
        uncond = cond.unconditional()

    uncond = uncond if settings.uses_cfg else None
    if control is None:
        def model_fn(x, t, c):
            return unet_output(unet, x, t, c)

        latents = sample(model_fn, schedule, settings, x_T, renoise_keys, cond, uncond)
    else:
        def model_fn(x, t, c_images, scales):  # the images ride along with the conditioning through cfg_pair
            c, images = c_images
            return unet_output(unet, x, t, c, control_lib.residuals(control.nets, x, t, c, images, scales))

        images = tuple(control.images)
        latents = sample(model_fn, schedule, settings, x_T, renoise_keys, (cond, images),
                         None if uncond is None else (uncond, images), per_step=control.scales)
    return decode(vae, latents, output_type)
