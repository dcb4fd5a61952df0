"""SDXL's conditioning of the UNet: prompt embeddings from both text encoders, pooled embeddings, time ids.

prompt_embeds = concat(penultimate hidden state of text_encoder, of text_encoder_2) along features
(768 + 1280 = 2048 for SDXL); pooled = text_encoder_2's projected EOS output (1280). The unconditional branch of
classifier-free guidance is all zeros, not the encoded empty prompt (SDXL's ``force_zeros_for_empty_prompt``).
The micro-conditioning ``time_ids`` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

``Cond`` is the one type that carries this conditioning through the trainer, the sampler, validation and the
pipeline; ``unet_output`` is the one adapter from it to the UNet's call, and ``cfg_pair`` / ``split_cfg_pair``
the one layout of a classifier-free-guidance batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tdd_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection

TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")


def load_tokenizers(pipeline_dir: str | Path) -> tuple:
    """The pipeline's two ``CLIPTokenizer``s (local files only)."""
    from transformers import CLIPTokenizer

    folders = [Path(pipeline_dir) / name for name in TOKENIZER_FOLDERS]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(f"tokenizer folders missing from the pipeline dir: {missing}")
    return tuple(CLIPTokenizer.from_pretrained(str(f), local_files_only=True) for f in folders)


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Token ids (B, model_max_length) int32, padded and truncated as diffusers' SDXL pipeline does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids
    return ids.astype(np.int32)


def encode_prompts(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                   input_ids: jax.Array, input_ids_2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(prompt_embeds (B, T, D1 + D2), pooled_prompt_embeds (B, P)) from both tokenizers' ids."""
    first = text_encoder(input_ids)
    second = text_encoder_2(input_ids_2)
    prompt_embeds = jnp.concatenate([first.penultimate_hidden_state, second.penultimate_hidden_state], axis=-1)
    return prompt_embeds, second.text_embeds


class Cond(NamedTuple):
    """What the UNet is conditioned on besides (x_t, t), one row per example."""

    prompt_embeds: jax.Array  # (B, 77, 2048): both encoders' penultimate states
    pooled: jax.Array  # (B, 1280): text_encoder_2's projected EOS output
    time_ids: jax.Array  # (B, 6): SDXL micro-conditioning

    def unconditional(self) -> Cond:
        """SDXL's unconditional branch for these examples: zero embeddings, the same time ids."""
        return Cond(*zero_conditioning(self.prompt_embeds, self.pooled), self.time_ids)


def unet_output(unet, x: jax.Array, t: jax.Array, cond: Cond, residuals: tuple | None = None) -> jax.Array:
    """The UNet's raw output for ``cond`` in at least float32 (the diffusion math never runs in bf16).
    residuals: optional ControlNet (down residuals, mid residual) added to the UNet's skips and mid block."""
    down, mid = (None, None) if residuals is None else residuals
    out = unet(x, t, cond.prompt_embeds, {"text_embeds": cond.pooled, "time_ids": cond.time_ids},
               down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))


def cfg_pair(cond_tree, uncond_tree):
    """Two batches (any pytrees of (B, ...) arrays) as one 2B batch c0, u0, c1, u1, ...: interleaved rather than
    concatenated, so that on a batch-sharded mesh every device keeps both branches of its own examples."""
    return jax.tree.map(lambda c, u: jnp.stack([c, u], axis=1).reshape((2 * c.shape[0],) + c.shape[1:]),
                        cond_tree, uncond_tree)


def split_cfg_pair(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(conditional, unconditional) halves of a model output on a ``cfg_pair`` batch."""
    out = out.reshape((out.shape[0] // 2, 2) + out.shape[1:])
    return out[:, 0], out[:, 1]


def zero_conditioning(prompt_embeds: jax.Array, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The unconditional embeddings (SDXL's force_zeros_for_empty_prompt), shaped like the conditional ones."""
    return jnp.zeros_like(prompt_embeds), jnp.zeros_like(pooled)


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
             target_size: tuple[int, int] | None = None) -> np.ndarray:
    """One sample's micro-conditioning (6,) float32; target_size defaults to the original size."""
    target_size = original_size if target_size is None else target_size
    return np.array([*original_size, *crop_top_left, *target_size], np.float32)
