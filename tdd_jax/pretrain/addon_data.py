"""Training examples of the tiny SDXL's add-on stages (the edge-map ControlNet, the style LoRA).

The add-ons are trained beside the shipped pipeline, so their examples come from its own fp16 components: captions
through both of its text encoders, images through its VAE (posterior moments, sampled afresh each step by
``teacher.teacher_loss``), time ids of a 64x64 image. A stage adds its own entries (control images) or changes the
images first (the style).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tdd_jax.conditioning import encode_prompts, load_tokenizers, time_ids, tokenize
from tdd_jax.pretrain import loop
from tdd_jax.pretrain.architecture import IMAGE_SIZE
from tdd_jax.pretrain.vae import latent_moments


def caption_examples(pipeline_dir: str | Path, models: dict[str, nnx.Module], images: np.ndarray,
                     captions) -> dict[str, np.ndarray]:
    """{moments, prompt_embeds, pooled, time_ids} of uint8 ``images`` (N, 64, 64, 3) and their ``captions``: the
    batch entries ``teacher.teacher_loss`` reads, for the pipeline's ``models`` (``load_components``)."""
    captions = [str(c) for c in captions]
    ids, ids_2 = (tokenize(tok, captions) for tok in load_tokenizers(pipeline_dir))
    encode = jax.jit(lambda a, b: encode_prompts(models["text_encoder"], models["text_encoder_2"], a, b))
    prompt_embeds, pooled = loop.map_batches(lambda x: encode(x[:, 0], x[:, 1]), np.stack([ids, ids_2], 1))
    return {"moments": latent_moments(models["vae"], images), "prompt_embeds": prompt_embeds, "pooled": pooled,
            "time_ids": np.broadcast_to(time_ids((IMAGE_SIZE, IMAGE_SIZE)), (len(captions), 6))}
