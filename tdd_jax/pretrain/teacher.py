"""Recipe stage: train the tiny SDXL's UNet (the teacher that TDD distils) on the emoji train split.

Standard SDXL training with the ε-prediction loss ‖ε̂(x_t, t, c) − ε‖² at t ~ U{0..999} on the scaled_linear
schedule, with five choices that keep it cheap and faithful to how the pipeline is used:
- The text encoders stay frozen at a seeded random init, transformers' CLIP init (see
  ``transformers_clip_init``); they are written to ``work_dir`` first and shipped as they are, and every
  caption's prompt embedding and pooled embedding is computed once up front.
- Latents come from the trained VAE, also once: the posterior moments are stored and a fresh posterior sample
  is drawn each step, scaled by the VAE's scaling_factor.
- Captions are dropped to the all-zero embeddings (prompt and pooled) with probability ``caption_dropout``:
  exactly SDXL's unconditional input (``force_zeros_for_empty_prompt``), so classifier-free guidance works.
- Min-SNR-γ loss weights (Hang et al. 2023; γ = 5): the ε-loss at t is weighted by min(SNR(t), γ)/SNR(t), so
  the nearly clean timesteps, whose fine detail would take most of a small budget, do not crowd out the noisy
  ones where the caption decides the picture.
- The teacher learns four of the nine emoji groups by default (``TEACHER_GROUPS``: 643 of the 3,482 train
  images). Every caption names one image, so the caption -> picture map is learnt by seeing each pair often:
  a ~50-minute CPU budget is ~190k samples, ~300 passes over these groups but only ~55 over all emoji, where
  the whole-dataset teacher learnt frequent words ("face", "flag") and ignored the rest (2/32 contact-sheet
  samples nearest their own emoji, chance level). People & Body (59% of the data, 1,699 of them skin-tone
  recolourings), Flags, Objects, Symbols and Activities are left out, and configs/tdd_tiny.py distils the same groups.
Time ids are the pipeline's defaults for a 64×64 image, (64, 64, 0, 0, 64, 64). The EMA of the weights is what
is written to ``work_dir/unet`` (fp16).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tdd_jax.conditioning import encode_prompts, time_ids, tokenize
from tdd_jax.data.emoji import load_emoji
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from tdd_jax.models.layers import ModelOptions
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.models.vae import AutoencoderKL
from tdd_jax.pretrain import loop
from tdd_jax.pretrain.architecture import IMAGE_SIZE, UNET_CONFIG, text_encoder_configs
from tdd_jax.pretrain.assemble import SCHEDULER_CONFIG, save_component
from tdd_jax.pretrain.vae import latent_moments

STAGE = "teacher"
TEACHER_GROUPS = ("Smileys & Emotion", "Animals & Nature", "Food & Drink", "Travel & Places")


def transformers_clip_init(model: nnx.Module, config: dict, seed: int) -> nnx.Module:
    """``model`` with every weight redrawn as transformers initialises a CLIP text model: N(0, 0.02²) embeddings,
    N(0, σ²) projections with σ = d^-½·(2L)^-½ (q, k, v, fc2), d^-½ (out_proj, text_projection), (2d)^-½ (fc1),
    zero biases and unit layer norms.

    Why not the layers' PyTorch-default init: with unit-variance embeddings the residual stream at the EOS token
    is its own embedding plus its position, and attention adds only a small average of the other tokens, so the
    pooled embeddings of all captions of one length come out nearly equal (cosine ≈ 0.99) and the UNet's
    text_time condition would carry no caption. transformers' small embeddings make the layer-normed attention
    output dominate, so each caption gets its own pooled vector (cosine ≈ 0.8 between short captions).
    """
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    in_proj = d ** -0.5 * (2 * layers) ** -0.5
    stds = {"token_embedding": 0.02, "position_embedding": 0.02, "q_proj": in_proj, "k_proj": in_proj,
            "v_proj": in_proj, "out_proj": d ** -0.5, "fc1": (2 * d) ** -0.5, "fc2": in_proj,
            "text_projection": d ** -0.5}
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        module, shape = str(path[-2]), var.get_value().shape
        if str(path[-1]) == "bias":
            value = np.zeros(shape)
        elif "norm" in module:
            value = np.ones(shape)
        else:
            value = rng.normal(0.0, stds[module], shape)
        flat.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def frozen_text_encoders(work_dir: Path, seed: int) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """The seeded random text encoders, written to work_dir/text_encoder{,_2} (fp16) and read back from there,
    so the embeddings the UNet learns from are exactly what the shipped pipeline computes."""
    vocab_size = len(json.loads((work_dir / "tokenizer" / "vocab.json").read_text(encoding="utf-8")))
    for i, (name, cls, config) in enumerate(zip(("text_encoder", "text_encoder_2"),
                                                 (CLIPTextModel, CLIPTextModelWithProjection),
                                                 text_encoder_configs(vocab_size))):
        abstract = nnx.eval_shape(lambda c=cls, cfg=config: c(cfg, opts=ModelOptions(), rngs=nnx.Rngs(0)))
        save_component(work_dir / name, name, transformers_clip_init(abstract, config, seed + i), config)
    return (CLIPTextModel.from_pretrained(work_dir / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(work_dir / "text_encoder_2"))


def embed_captions(work_dir: Path, captions, text_encoders) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds (N, 77, D), pooled (N, P)) of every caption, in float32."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(work_dir / "tokenizer"), local_files_only=True)
    encode = jax.jit(lambda ids: encode_prompts(*text_encoders, ids, ids))
    return loop.map_batches(encode, tokenize(tokenizer, captions))


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
    """Per-example ε-loss weight min(SNR(t), γ)/SNR(t); all ones when γ is 0 (plain ε-MSE)."""
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    alpha_bar = schedule.alpha_cumprod(t)
    snr = alpha_bar / (1.0 - alpha_bar)
    return jnp.minimum(snr, gamma) / snr


def teacher_loss(unet: UNet2DConditionModel, batch: dict, key: jax.Array, schedule: NoiseSchedule,
                 scaling_factor: float, caption_dropout: float, min_snr_gamma: float):
    """(Min-SNR-weighted ε-MSE, metrics) of one batch {moments, prompt_embeds, pooled, time_ids}; the metrics
    also hold the unweighted ε-MSE."""
    k_latent, k_noise, k_t, k_drop = jax.random.split(key, 4)
    mean, logvar = batch["moments"][:, 0], batch["moments"][:, 1]
    latents = AutoencoderKL.sample(k_latent, mean, logvar) * scaling_factor
    b = latents.shape[0]
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    keep = (jax.random.uniform(k_drop, (b,)) >= caption_dropout).astype(jnp.float32)
    pred = unet(schedule.add_noise(latents, noise, t), t, batch["prompt_embeds"] * keep[:, None, None],
                {"text_embeds": batch["pooled"] * keep[:, None], "time_ids": batch["time_ids"]})
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise), axis=(1, 2, 3))
    loss = jnp.mean(min_snr_weight(schedule, t, min_snr_gamma) * per_example)
    return loss, {"loss": loss, "eps_mse": jnp.mean(per_example)}


def train_teacher(work_dir: str | Path, *, steps: int, batch_size: int, lr: float, caption_dropout: float,
                  ema_decay: float, seed: int, min_snr_gamma: float = 5.0, groups=TEACHER_GROUPS,
                  config: dict = UNET_CONFIG, log_every: int = 50, checkpoint_every: int = 500) -> dict:
    """Write the frozen text encoders, train the UNet, write ``work_dir/unet`` and the stage record."""
    work_dir = Path(work_dir)
    started = time.time()
    data = load_emoji(str(work_dir / "data"), "train", IMAGE_SIZE, groups)
    text_encoders = frozen_text_encoders(work_dir, seed)
    prompt_embeds, pooled = embed_captions(work_dir, [str(c) for c in data["captions"]], text_encoders)
    vae = AutoencoderKL.from_pretrained(work_dir / "vae")
    moments = latent_moments(vae, data["images"])
    ids = np.broadcast_to(time_ids((IMAGE_SIZE, IMAGE_SIZE)), (batch_size, 6))
    print(f"[{STAGE}] {len(moments)} captions embedded and images encoded in {time.time() - started:.0f} s",
          flush=True)

    unet = UNet2DConditionModel(config, opts=ModelOptions(), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(unet, nnx.Param)
    tx = loop.adamw(lr, steps, warmup=min(500, steps // 10), weight_decay=0.01)
    schedule = NoiseSchedule.from_config(SCHEDULER_CONFIG)
    train_step = loop.make_train_step(
        graphdef, tx, lambda m, b, k: teacher_loss(m, b, k, schedule, vae.scaling_factor, caption_dropout,
                                     min_snr_gamma),
        ema_decay=ema_decay)

    def step_fn(state, step):
        idx = loop.epoch_batch(seed, step, len(moments), batch_size)
        batch = {"moments": moments[idx], "prompt_embeds": prompt_embeds[idx], "pooled": pooled[idx],
                 "time_ids": ids}
        return train_step(state, batch, loop.step_key(seed, step))

    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "caption_dropout": caption_dropout,
                "ema_decay": ema_decay, "seed": seed, "min_snr_gamma": min_snr_gamma,
                "groups": list(groups), "config": config}
    state = loop.run(STAGE, work_dir, loop.init_state(params, tx, ema=True), step_fn, steps, settings,
                     checkpoint_every=checkpoint_every, log_every=log_every)
    save_component(work_dir / "unet", "unet", nnx.merge(graphdef, state["ema"]), config)
    record = {**{k: v for k, v in settings.items() if k != "config"}, "train_images": len(moments),
              "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
              "seconds": round(time.time() - started, 1)}
    loop.write_record(work_dir, STAGE, record)
    print(f"[{STAGE}] done in {record['seconds'] / 60:.1f} min -> {work_dir / 'unet'}", flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", required=True, help="recipe folder (holds data/, tokenizer/, vae/)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_snr_gamma", type=float, default=5.0, help="0: unweighted ε-MSE")
    parser.add_argument("--groups", nargs="+", default=list(TEACHER_GROUPS), help="emoji groups to learn")
    args = parser.parse_args(argv)
    train_teacher(args.work_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  caption_dropout=args.caption_dropout, ema_decay=args.ema_decay, seed=args.seed,
                  min_snr_gamma=args.min_snr_gamma, groups=args.groups)


if __name__ == "__main__":
    main()
