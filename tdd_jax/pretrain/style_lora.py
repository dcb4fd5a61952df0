"""Recipe stage: a tiny "style" LoRA for the shipped tiny SDXL, the stand-in for a community style LoRA
(TCD's "Papercut XL") that users stack on a distillation LoRA.

The style is a sepia print: the teacher's emoji (``teacher.TEACHER_GROUPS``) recoloured with the classic sepia
matrix (``sepia``), under their own captions, so the LoRA learns "draw it in sepia" and nothing about shapes. It is
plain diffusion fine-tuning, the teacher stage's loss (``teacher.teacher_loss``) with the pipeline's frozen fp16
UNet, text encoders and VAE, on a PEFT LoRA of the TDD targets: the LoRA is merged into the UNet's weights inside
the loss (``lora.merge_weights``, as the sampler merges it) so only its factors are trained. It is written as a
diffusers/PEFT LoRA file (``lora_formats.to_diffusers``, fp16) with its recipe in the file's metadata and beside it.
How sepia its samples are is ``sepia_distance`` (0 for a sepia-toned image).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tdd_jax.data.emoji import load_emoji
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models import lora as lora_lib
from tdd_jax.models.components import load_components
from tdd_jax.models.lora_formats import ModuleLoRA, to_diffusers
from tdd_jax.pretrain import loop
from tdd_jax.pretrain.addon_data import caption_examples
from tdd_jax.pretrain.architecture import IMAGE_SIZE
from tdd_jax.pretrain.teacher import TEACHER_GROUPS, teacher_loss

STAGE = "style_lora"
# Rows give output R, G, B from input R, G, B (the sepia tone of image editors).
SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
TONE = SEPIA.sum(axis=1)  # the sepia of white before clipping, (1.351, 1.203, 0.937)


def sepia(images: np.ndarray) -> np.ndarray:
    """Sepia-toned copies of RGB images (..., 3), uint8 in and out, or floats in [0, 1]."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    toned = np.clip(x @ SEPIA.T, 0.0, 1.0)
    return np.round(toned * 255).astype(np.uint8) if images.dtype == np.uint8 else toned


def sepia_distance(images: np.ndarray) -> float:
    """How far images are from a sepia print: the mean |image - the sepia tone with the same blue value| over
    pixels and channels (images uint8 or floats in [0, 1]). The sepia matrix has rank 1 up to rounding, so every
    sepia-toned colour is min(level · TONE, 1) for a level in [0, 1] and scores ~0; other colours score more."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    level = np.clip(x[..., 2:] / TONE[2], 0.0, 1.0)
    return float(np.abs(x - np.minimum(level * TONE, 1.0)).mean())


class LoRAFactors(nnx.Module):
    """A LoRA's trainable factors as one module of ``nnx.Param``s (what ``loop.make_train_step`` trains):
    {module path: (lora_A, lora_B, alpha / rank)} via ``adapters``."""

    def __init__(self, adapters: dict[str, tuple[jax.Array, jax.Array, float]]):
        self.paths = tuple(adapters)
        self.scales = tuple(float(s) for _, _, s in adapters.values())
        self.down = nnx.List([nnx.Param(a) for a, _, _ in adapters.values()])
        self.up = nnx.List([nnx.Param(b) for _, b, _ in adapters.values()])

    def adapters(self) -> dict[str, tuple[jax.Array, jax.Array, float]]:
        return {p: (d[...], u[...], s) for p, d, u, s in zip(self.paths, self.down, self.up, self.scales)}

    def module_loras(self) -> dict[str, ModuleLoRA]:
        return {p: ModuleLoRA(np.asarray(a), np.asarray(b), s) for p, (a, b, s) in self.adapters().items()}


def style_loss(factors: LoRAFactors, batch: dict, key: jax.Array, unet_graphdef, schedule: NoiseSchedule,
               scaling_factor: float, caption_dropout: float, min_snr_gamma: float):
    """``teacher.teacher_loss`` of the UNet (``unet_graphdef``, base weights ``batch['unet']``) with the LoRA
    merged into its weights."""
    merged = lora_lib.merge_weights(jax.lax.stop_gradient(batch["unet"]), [(factors.adapters(), 1.0)])
    unet = nnx.merge(unet_graphdef, merged)
    return teacher_loss(unet, batch, key, schedule, scaling_factor, caption_dropout, min_snr_gamma)


def train_style_lora(pipeline_dir: str | Path, data_dir: str | Path, work_dir: str | Path, out: str | Path, *,
                     steps: int, batch_size: int, lr: float, rank: int, seed: int, caption_dropout: float = 0.1,
                     min_snr_gamma: float = 5.0, groups=TEACHER_GROUPS, log_every: int = 25) -> dict:
    """Train the sepia LoRA and write it to ``out`` (a .safetensors file) with ``out``.json beside it."""
    started = time.time()
    pipeline_dir = Path(pipeline_dir)
    models = load_components(pipeline_dir)
    data = load_emoji(str(data_dir), "train", IMAGE_SIZE, groups)
    examples = caption_examples(pipeline_dir, models, sepia(data["images"]), data["captions"])
    n, vae = len(data["images"]), models["vae"]

    unet = models["unet"]
    config = lora_lib.LoRAConfig(rank=rank, alpha=float(rank))
    lora_lib.attach_lora(unet, config, nnx.Rngs(seed))
    factors = LoRAFactors(lora_lib.detach_lora(unet))  # the UNet is plain again
    unet_graphdef, unet_params = nnx.split(unet)
    graphdef, params = nnx.split(factors, nnx.Param)
    tx = loop.adamw(lr, steps, warmup=min(50, steps // 10), weight_decay=0.0)
    schedule = NoiseSchedule.from_pretrained(pipeline_dir)
    train_step = loop.make_train_step(
        graphdef, tx, lambda m, b, k: style_loss(m, b, k, unet_graphdef, schedule, vae.scaling_factor,
                                                 caption_dropout, min_snr_gamma))

    def step_fn(state, step):
        idx = loop.epoch_batch(seed, step, n, batch_size)
        return train_step(state, {k: v[idx] for k, v in examples.items()} | {"unet": unet_params},
                          loop.step_key(seed, step))

    settings = {"pipeline": pipeline_dir.name, "style": "sepia", "steps": steps, "batch_size": batch_size, "lr": lr,
                "rank": rank, "alpha": float(rank), "targets": list(config.targets), "seed": seed,
                "caption_dropout": caption_dropout, "min_snr_gamma": min_snr_gamma, "groups": list(groups)}
    state = loop.run(STAGE, work_dir, loop.init_state(params, tx, ema=False), step_fn, steps, settings,
                     log_every=log_every)
    trained = nnx.merge(graphdef, state["params"])
    record = {**settings, "train_images": n, "seconds": round(time.time() - started, 1)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers(trained.module_loras(), np.float16), str(out),
              metadata={"format": "pt", "recipe": json.dumps(record)})
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    loop.write_record(work_dir, STAGE, record)
    print(f"[{STAGE}] done in {record['seconds'] / 60:.1f} min -> {out}", flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="the tiny SDXL pipeline folder the LoRA is for")
    parser.add_argument("--data_dir", required=True, help="the emoji dataset folder (built there if missing)")
    parser.add_argument("--work_dir", required=True, help="holds runs/style_lora/ (checkpoint, stage record)")
    parser.add_argument("--out", required=True, help="the LoRA .safetensors file to write")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_style_lora(args.pipeline, args.data_dir, args.work_dir, args.out, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, rank=args.rank, seed=args.seed)


if __name__ == "__main__":
    main()
