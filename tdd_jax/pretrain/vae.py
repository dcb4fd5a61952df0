"""Recipe stage: train the tiny SDXL's AutoencoderKL on the emoji images (train split).

Loss per batch: L1 + L2 between the decoded posterior sample and the image (pixels in [-1, 1]), plus
``kl_weight`` × KL(q(z|x) ‖ N(0, I)) summed over latent elements per pixel element, LDM's weighting: strong
enough to keep the posterior from collapsing to points, too weak to cost detail. No perceptual or GAN terms:
both need pretrained networks, and on flat emoji art the L1 term already keeps edges sharp. Random horizontal
flips double the 3.5k images for the autoencoder (the teacher, which must learn "left" from "right", never
sees flipped images).

Writes ``work_dir/vae`` (fp16) with ``scaling_factor`` = 1/std of the train latents, so the UNet sees
unit-variance latents as SDXL's does, and records the reconstruction PSNR on the held-out test split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tdd_jax.data.emoji import load_emoji
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.vae import AutoencoderKL
from tdd_jax.pretrain import loop
from tdd_jax.pretrain.architecture import IMAGE_SIZE, VAE_CONFIG
from tdd_jax.pretrain.assemble import save_component

STAGE = "vae"
TRAIN_PSNR_STRIDE = 20  # PSNR is also reported on every 20th train image, as many as the held-out split


def to_model_range(images: np.ndarray) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def vae_loss(model: AutoencoderKL, images: jax.Array, key: jax.Array, kl_weight: float):
    """(loss, metrics) of one batch of images in [-1, 1]."""
    mean, logvar = model.encode(images)
    recon = model.decode(model.sample(key, mean, logvar))
    err = recon.astype(jnp.float32) - images
    l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar) / images.size
    loss = l1 + l2 + kl_weight * kl
    return loss, {"loss": loss, "l1": l1, "l2": l2, "kl": kl}


def latent_moments(model: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """Posterior (mean, logvar) of every image, stacked as (N, 2, h, w, latent) float32."""
    return loop.map_batches(jax.jit(lambda x: jnp.stack(model.encode(to_model_range(x)), axis=1)), images)


def latent_std(moments: np.ndarray) -> float:
    """Standard deviation of posterior samples, exactly: Var z = Var(mean) + E[exp(logvar)].
    SDXL's scaling_factor is its inverse."""
    return float(np.sqrt(np.var(moments[:, 0]) + np.mean(np.exp(moments[:, 1]))))


def reconstruction_psnr(model: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB, images in [0, 1]) of decode(posterior mean) against the uint8 originals."""

    def mse(x):
        x = to_model_range(x)
        recon = jnp.clip(model.decode(model.encode(x)[0]), -1.0, 1.0)
        return jnp.mean(jnp.square((recon - x) / 2.0), axis=(1, 2, 3))

    return 10.0 * np.log10(1.0 / np.maximum(loop.map_batches(jax.jit(mse), images), 1e-10))


def train_vae(work_dir: str | Path, *, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int,
              config: dict = VAE_CONFIG, log_every: int = 50, checkpoint_every: int = 500) -> dict:
    """Train, write ``work_dir/vae`` and ``work_dir/runs/vae/stage.json``; returns the stage record."""
    work_dir = Path(work_dir)
    started = time.time()
    train = load_emoji(str(work_dir / "data"), "train", IMAGE_SIZE)["images"]
    test = load_emoji(str(work_dir / "data"), "test", IMAGE_SIZE)["images"]
    model = AutoencoderKL(config, opts=ModelOptions(), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = loop.adamw(lr, steps, warmup=min(200, steps // 10), weight_decay=0.0)
    train_step = loop.make_train_step(graphdef, tx, lambda m, x, k: vae_loss(m, x, k, kl_weight))

    def step_fn(state, step):
        idx = loop.epoch_batch(seed, step, len(train), batch_size)
        flip = np.random.default_rng([seed, step, 1]).random(len(idx)) < 0.5
        images = np.where(flip[:, None, None, None], train[idx][:, :, ::-1], train[idx])
        return train_step(state, to_model_range(images), loop.step_key(seed, step))

    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
                "config": config}
    state = loop.run(STAGE, work_dir, loop.init_state(params, tx, ema=False), step_fn, steps, settings,
                     checkpoint_every=checkpoint_every, log_every=log_every)

    model = nnx.merge(graphdef, loop.round_to_fp16(state["params"]))
    scaling = 1.0 / latent_std(latent_moments(model, train))
    save_component(work_dir / STAGE, STAGE, model, {**config, "scaling_factor": scaling})
    psnr = reconstruction_psnr(model, np.concatenate([test, train[::TRAIN_PSNR_STRIDE]]))
    record = {**{k: v for k, v in settings.items() if k != "config"}, "scaling_factor": scaling,
              "psnr_test_db": float(psnr[:len(test)].mean()), "psnr_train_db": float(psnr[len(test):].mean()),
              "train_images": len(train),
              "test_images": len(test), "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
              "seconds": round(time.time() - started, 1)}
    loop.write_record(work_dir, STAGE, record)
    print(f"[{STAGE}] held-out PSNR {record['psnr_test_db']:.2f} dB (train {record['psnr_train_db']:.2f} dB), "
          f"scaling_factor {scaling:.5f}, {record['seconds'] / 60:.1f} min -> {work_dir / STAGE}", flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", required=True, help="recipe folder (holds data/; gets vae/ and runs/vae/)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_vae(args.work_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
              seed=args.seed)


if __name__ == "__main__":
    main()
