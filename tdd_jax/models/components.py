"""The model components of a diffusers SDXL folder and the one function that loads them.

Both the trainer's frozen pipeline (``training.frozen.load_frozen``: FSDP-sharded, some components only) and the
inference pipeline (``pipeline.TDDPipeline.from_pretrained``: replicated, all of them) load through
``load_components``; they differ only in which components they ask for and where the weights go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from tdd_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.models.vae import AutoencoderKL

# Component folder -> model class.
MODELS = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
          "text_encoder_2": CLIPTextModelWithProjection, "vae": AutoencoderKL}


def load_components(pipeline_dir: str | Path, names: Sequence[str] = tuple(MODELS), *,
                    opts: ModelOptions = ModelOptions(),
                    shardings: Any | Callable[[nnx.State], Any] = None) -> dict[str, nnx.Module]:
    """{name: model} for the components ``names`` of a diffusers SDXL folder, weights read straight from their
    safetensors (no torch, no random init) and placed as ``shardings`` says: None (default device), one
    ``jax.sharding.Sharding`` for every weight, or a function of a component's abstract state returning its
    shardings (e.g. ``lambda state: sharding.weight_shardings(mesh, state)``)."""
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown SDXL components {unknown}; expected some of {tuple(MODELS)}")
    folder = Path(pipeline_dir)
    return {name: MODELS[name].from_pretrained(folder / name, opts=opts, shardings=shardings) for name in names}
