"""Shared set-up of the train-step tests (also imported by the multi-device subprocess script).

The step compiles the UNet four times (teacher, target, student forward and backward), and XLA's CPU compile
time grows with the number of ops, not their size; so these tests swap the tiny pipeline's UNet for a
one-level one (same SDXL conditioning: text_time added conds, cross-attention on both text encoders).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from tiny_pipeline import randomize_norms, save_tiny_sdxl_pipeline, tiny_clip_configs  # noqa: E402

BATCH = 4
RESOLUTION = 16  # pixels; the tiny VAE has a spatial factor of 2
CAPTIONS = ["a photo of a cat", "a red car on the street", "a dog", "a painting of a tree"]


def one_level_unet_config() -> dict:
    text_dims = [c["hidden_size"] for c in tiny_clip_configs()]
    pooled_dim, time_dim = tiny_clip_configs()[1]["projection_dim"], 8
    return dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(32,), layers_per_block=1,
                transformer_layers_per_block=(1,), attention_head_dim=(2,), norm_num_groups=8,
                cross_attention_dim=sum(text_dims), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled_dim)


def save_step_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The tiny random SDXL pipeline with a one-level UNet, in diffusers format."""
    import torch
    from diffusers import UNet2DConditionModel

    path = save_tiny_sdxl_pipeline(path, seed)
    torch.manual_seed(seed + 1)
    unet = randomize_norms(UNet2DConditionModel(**one_level_unet_config()), torch.Generator().manual_seed(seed))
    shutil.rmtree(path / "unet")
    unet.save_pretrained(path / "unet", safe_serialization=True)
    return path


def step_config(**overrides):
    """configs/tdd_sdxl.py at test scale (fp32, no remat, rank-4 LoRA, batch 4); overrides as 'a.b': value."""
    from configs import tdd_sdxl

    cfg = tdd_sdxl.get_config()
    cfg.batch.global_batch, cfg.batch.grad_accum = BATCH, 1
    cfg.model.dtype, cfg.model.remat = "float32", "none"
    cfg.lora.rank, cfg.lora.alpha = 4, 4.0
    cfg.mesh.min_shard_size = 0  # shard every divisible array, so the tiny model really is FSDP-split
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def pixel_batch(pipeline_dir, seed: int = 0) -> dict:
    """A pixel/caption batch as the data pipeline yields it (uint8 pixels, both tokenizers' ids)."""
    from tdd_jax import conditioning

    rng = np.random.default_rng(seed)
    tok1, tok2 = conditioning.load_tokenizers(pipeline_dir)
    return {"pixels": rng.integers(0, 256, (BATCH, RESOLUTION, RESOLUTION, 3), dtype=np.uint8),
            "input_ids": conditioning.tokenize(tok1, CAPTIONS), "input_ids_2": conditioning.tokenize(tok2, CAPTIONS),
            "time_ids": np.tile(conditioning.time_ids((RESOLUTION, RESOLUTION)), (BATCH, 1))}


def setup(cfg, pipeline_dir, mesh, *, encoders: bool = True):
    """(frozen pipeline, TrainStep) for cfg on mesh."""
    from tdd_jax.diffusion.schedule import NoiseSchedule
    from tdd_jax.training.frozen import load_frozen
    from tdd_jax.training.step import build_train_step

    frozen = load_frozen(pipeline_dir, cfg, mesh, encoders=encoders)
    return frozen, build_train_step(cfg, frozen, NoiseSchedule.from_pretrained(pipeline_dir), mesh)


def cached_batch(size: int = BATCH, seed: int = 0) -> dict:
    """A cached-source batch (unscaled latents, prompt and pooled embeddings) of random values: the step's
    arithmetic does not care where they came from, and no encoder has to be compiled."""
    rng = np.random.default_rng(seed)
    text_dim = sum(c["hidden_size"] for c in tiny_clip_configs())
    latent, pooled_dim = RESOLUTION // 2, tiny_clip_configs()[1]["projection_dim"]
    return {"latents": rng.normal(0.0, 4.0, (size, latent, latent, 4)).astype(np.float32),
            "prompt_embeds": rng.normal(size=(size, 77, text_dim)).astype(np.float32),
            "pooled_prompt_embeds": rng.normal(size=(size, pooled_dim)).astype(np.float32),
            "time_ids": np.tile(np.float32([RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]), (size, 1))}
