"""Recipe stage: a tiny edge-map ControlNet for the shipped tiny SDXL, trained on the teacher's emoji.

What diffusers' train_controlnet_sdxl.py does, at the tiny pipeline's scale: the ControlNet starts as
``ControlNetModel.from_unet`` of the pipeline's UNet (its encoder copied, zero convolutions, so training starts
from the plain UNet), and learns the ε-prediction loss of the frozen UNet with the ControlNet's residuals added,
the control image being the emoji's edge map (``edges.edge_map``). Everything else is the teacher stage's
(``teacher.teacher_loss``: Min-SNR-γ weights, posterior latents from the VAE, all-zero embeddings for dropped
captions), with the pipeline's own fp16 text encoders, VAE and UNet read from its folder. Captions are dropped
half the time (the ControlNet paper's rate), so the ControlNet must learn to draw from the edges alone rather than
lean on the caption that the teacher has memorised. The EMA of the weights is written as a diffusers ControlNet
folder (fp16) with ``recipe.json``: the settings, the training metrics, and ε-MSE on every training image with and
without the ControlNet, with and without captions (fixed noise and timesteps), which says what the edges add.
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

from tdd_jax.data.emoji import load_emoji
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models.components import load_components
from tdd_jax.models.controlnet import ControlNetModel, controlnet_config
from tdd_jax.models.loading import read_config
from tdd_jax.pretrain import loop
from tdd_jax.pretrain.addon_data import caption_examples
from tdd_jax.pretrain.architecture import IMAGE_SIZE
from tdd_jax.pretrain.assemble import save_component
from tdd_jax.pretrain.edges import THRESHOLD, control_images, edge_map
from tdd_jax.pretrain.teacher import TEACHER_GROUPS, teacher_loss

STAGE = "controlnet"
RECIPE_FILE = "recipe.json"


def controlled(unet, unet_params, net: ControlNetModel, control: jax.Array):
    """The frozen UNet (graphdef ``unet``, weights ``unet_params``) with ``net``'s residuals for the control
    images added: a denoiser with the UNet's call signature, for ``teacher.teacher_loss``."""
    unet = nnx.merge(unet, jax.lax.stop_gradient(unet_params))

    def denoise(x, t, prompt_embeds, added):
        down, mid = net(x, t, prompt_embeds, control, 1.0, added)
        return unet(x, t, prompt_embeds, added, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid)

    return denoise


def controlnet_loss(net: ControlNetModel, batch: dict, key: jax.Array, unet_graphdef, schedule: NoiseSchedule,
                    scaling_factor: float, caption_dropout: float, min_snr_gamma: float):
    """``teacher.teacher_loss`` of the frozen UNet (``unet_graphdef`` with the weights ``batch['unet']``, passed as
    inputs rather than baked into the compiled step) with ``net``'s residuals for ``batch['control']``."""
    denoiser = controlled(unet_graphdef, batch["unet"], net, batch["control"])
    return teacher_loss(denoiser, batch, key, schedule, scaling_factor, caption_dropout, min_snr_gamma)


def eval_eps_mse(unet_graphdef, unet_params, net: ControlNetModel | None, data: dict, schedule: NoiseSchedule,
                 scaling_factor: float, seed: int, batch_size: int = 64) -> dict[str, float]:
    """Unweighted ε-MSE over the first whole batches of ``data`` (one fixed noise, timestep and posterior draw per
    image), with captions and with SDXL's zero embeddings; with ``net``'s residuals unless it is None."""
    net_graphdef, net_params = (None, None) if net is None else nnx.split(net)

    @jax.jit
    def per_batch(unet_params, net_params, batch, key):
        if net_params is None:
            denoiser = nnx.merge(unet_graphdef, unet_params)
        else:
            denoiser = controlled(unet_graphdef, unet_params, nnx.merge(net_graphdef, net_params), batch["control"])
        _, metrics = teacher_loss(denoiser, batch, key, schedule, scaling_factor, batch["dropout"], 0.0)
        return metrics["eps_mse"]

    starts = range(0, len(data["moments"]) - batch_size + 1, batch_size)
    out = {}
    for name, dropout in (("captions", 0.0), ("no_captions", 1.0)):
        errors = [float(per_batch(unet_params, net_params, {k: v[i:i + batch_size] for k, v in data.items()}
                                  | {"dropout": jnp.float32(dropout)}, loop.step_key(seed, i))) for i in starts]
        out[name] = round(float(np.mean(errors)), 5)
    return out


def train_controlnet(pipeline_dir: str | Path, data_dir: str | Path, work_dir: str | Path, out_dir: str | Path, *,
                     steps: int, batch_size: int, lr: float, caption_dropout: float, ema_decay: float, seed: int,
                     min_snr_gamma: float = 5.0, groups=TEACHER_GROUPS, threshold: float = THRESHOLD,
                     embedding_channels=(16, 32, 96), log_every: int = 25, checkpoint_every: int = 100) -> dict:
    """Train the ControlNet on the emoji of ``groups`` and write it (fp16) with its recipe into ``out_dir``."""
    started = time.time()
    pipeline_dir = Path(pipeline_dir)
    models = load_components(pipeline_dir)
    data = load_emoji(str(data_dir), "train", IMAGE_SIZE, groups)
    edges = edge_map(data["images"], threshold)
    examples = caption_examples(pipeline_dir, models, data["images"], data["captions"])
    examples["control"] = control_images(edges)
    n, vae = len(edges), models["vae"]
    print(f"[{STAGE}] {n} emoji embedded, encoded and edge-mapped (edge density {edges.mean():.3f}) in "
          f"{time.time() - started:.0f} s", flush=True)

    config = controlnet_config(read_config(pipeline_dir / "unet"),
                               conditioning_embedding_out_channels=tuple(embedding_channels))
    unet_graphdef, unet_params = nnx.split(models["unet"])
    net = ControlNetModel.from_unet(models["unet"], config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(net, nnx.Param)
    tx = loop.adamw(lr, steps, warmup=min(100, steps // 10), weight_decay=0.01)
    schedule = NoiseSchedule.from_pretrained(pipeline_dir)

    train_step = loop.make_train_step(
        graphdef, tx, lambda m, b, k: controlnet_loss(m, b, k, unet_graphdef, schedule, vae.scaling_factor,
                                                      caption_dropout, min_snr_gamma),
        ema_decay=ema_decay)

    def step_fn(state, step):
        idx = loop.epoch_batch(seed, step, n, batch_size)
        batch = {k: v[idx] for k, v in examples.items()} | {"unet": unet_params}
        return train_step(state, batch, loop.step_key(seed, step))

    settings = {"pipeline": pipeline_dir.name, "steps": steps, "batch_size": batch_size, "lr": lr,
                "caption_dropout": caption_dropout, "ema_decay": ema_decay, "seed": seed,
                "min_snr_gamma": min_snr_gamma, "groups": list(groups), "edge_threshold": threshold,
                "conditioning_embedding_out_channels": list(embedding_channels)}
    state = loop.run(STAGE, work_dir, loop.init_state(params, tx, ema=True), step_fn, steps, settings,
                     checkpoint_every=checkpoint_every, log_every=log_every)
    trained = nnx.merge(graphdef, loop.round_to_fp16(state["ema"]))
    eval_seed = seed + 1
    metrics = {"eps_mse_without_controlnet": eval_eps_mse(unet_graphdef, unet_params, None, examples, schedule,
                                                          vae.scaling_factor, eval_seed),
               "eps_mse_with_controlnet": eval_eps_mse(unet_graphdef, unet_params, trained, examples, schedule,
                                                       vae.scaling_factor, eval_seed)}
    out_dir = Path(out_dir)
    save_component(out_dir, "controlnet", trained, config)
    record = {**settings, "train_images": n, "edge_density": round(float(edges.mean()), 4),
              "parameters": int(sum(x.size for x in jax.tree.leaves(params))), **metrics,
              "seconds": round(time.time() - started, 1)}
    loop.write_record(work_dir, STAGE, record)
    (out_dir / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"[{STAGE}] done in {record['seconds'] / 60:.1f} min -> {out_dir}; ε-MSE without / with the ControlNet: "
          f"{metrics['eps_mse_without_controlnet']} / {metrics['eps_mse_with_controlnet']}", flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="the tiny SDXL pipeline folder the ControlNet is for")
    parser.add_argument("--data_dir", required=True, help="the emoji dataset folder (built there if missing)")
    parser.add_argument("--work_dir", required=True, help="holds runs/controlnet/ (checkpoint, stage record)")
    parser.add_argument("--out", required=True, help="the ControlNet folder to write")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--caption_dropout", type=float, default=0.5)
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_controlnet(args.pipeline, args.data_dir, args.work_dir, args.out, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, caption_dropout=args.caption_dropout,
                     ema_decay=args.ema_decay, seed=args.seed)


if __name__ == "__main__":
    main()
