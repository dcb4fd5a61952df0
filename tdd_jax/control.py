"""ControlNet conditioning of the sampler, with diffusers' StableDiffusionXLControlNetPipeline semantics.

Host side: ``control_image`` turns a control image into (H, W, 3) floats in [0, 1] at the output size, as diffusers'
control image processor does (no [-1, 1] normalisation); ``step_scales`` gives each step's conditioning scale per
ControlNet (``controlnet_conditioning_scale`` times diffusers' keep mask from ``control_guidance_start/end``).
Traced side: ``Control`` carries the ControlNets, their images and that (steps, K) table into ``render``, and
``residuals`` sums the ControlNets' scaled outputs (diffusers' MultiControlNetModel), skipping a ControlNet's
forward on steps where its scale is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tdd_jax.conditioning import Cond
from tdd_jax.models.controlnet import ControlNetModel
from tdd_jax.models.unet_blocks import resize_nearest


def control_image(image: Any, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float32 in [0, 1], the image diffusers' ControlNet pipelines feed the ControlNet.

    A path or PIL image is resized with PIL's Lanczos filter when its size differs and converted to RGB (diffusers'
    PIL path); a uint8 array is read as a PIL image. A float array (H, W, 3) in [0, 1] is resized with torch's
    nearest-neighbour rule, as diffusers resizes numpy input.
    """
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"control image not found: {image}")
        image = Image.open(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        image = image.resize((width, height), resample=Image.LANCZOS).convert("RGB")
        return np.asarray(image, np.float32) / 255.0
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"control image array has shape {image.shape}; expected (H, W, 3)")
    return np.asarray(resize_nearest(image[None], (height, width))[0])


def step_scales(num_steps: int, scales: Sequence[float], starts: Sequence[float],
                ends: Sequence[float]) -> np.ndarray:
    """(num_steps, K) float32: ControlNet k's conditioning scale at step i, 0 outside its guidance window, with
    diffusers' rule: step i is kept unless i/N < start or (i + 1)/N > end."""
    for name, values in (("control_guidance_start", starts), ("control_guidance_end", ends)):
        if len(values) != len(scales):
            raise ValueError(f"{name} has {len(values)} entries for {len(scales)} ControlNets")
    for start, end in zip(starts, ends):
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"control_guidance_start={start} and control_guidance_end={end} must satisfy "
                             "0 <= start < end <= 1")
    keep = [[1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(starts, ends)]
            for i in range(num_steps)]
    return (np.asarray(keep, np.float64) * np.asarray(scales, np.float64)).astype(np.float32)


class Control(NamedTuple):
    """What ``render`` needs to condition the UNet on ControlNets: the models, one image batch (B, H, W, 3) in
    [0, 1] per model, and the per-step scales (num_steps, K) from ``step_scales``."""

    nets: Sequence[ControlNetModel]
    images: tuple[jax.Array, ...]
    scales: jax.Array


def residuals(nets: Sequence[ControlNetModel], x: jax.Array, t: jax.Array, cond: Cond,
              images: Sequence[jax.Array], scales: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """The summed (down residuals, mid residual) of ``nets`` at (x, t), net k scaled by ``scales[k]``; a net whose
    scale is 0 at this step is not run (its residuals are exactly 0, as diffusers' scaled-by-0 outputs are)."""
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    total = None
    for k, (net, image) in enumerate(zip(nets, images)):
        def run(scale, net=net, image=image):
            return net(x, t, cond.prompt_embeds, image, scale, added)

        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(run, scales[k]))
        out = jax.lax.cond(scales[k] != 0, run, lambda scale: zeros, scales[k])
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    return total
