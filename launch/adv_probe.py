"""Can TDD-adv's discriminator tell a student from its consistency target? Fresh heads trained alone against a
fixed student, on the student–target gap as it is and magnified k times.

    python3 launch/adv_probe.py --lora workdirs/table1/students/tdd_adv/seed0
    python3 launch/adv_probe.py --lora workdirs/table1/students/tdd/seed0 --gaps 1,4,16,64 --lrs 1e-3,1e-2
    python3 launch/adv_probe.py --runs workdirs/adv/lr1e-3 workdirs/adv/lr1e-2   # trained runs' logged D loss

The adversarial term's two sides (``tdd_jax/training/adversarial.py``) are the student's prediction at τ ("fake")
and its consistency target ("real"), each re-noised τ → gan_t ∈ [τ, τ + window) with independent noise. They
differ by the consistency error only, so a discriminator at chance (hinge D loss ≈ 2) can mean that the heads do
not learn, or that there is nothing they could see. The probe tells the two apart: the student is fixed (no
generator updates, no game), and fake is target + k·(prediction − target), k = 1 being the training's own pair.
For each k and heads' learning rate it trains fresh heads (``cfg.adv``'s optimizer otherwise) on the same
batches, and reports the D loss and accuracy each batch gets before its own update (so held out), over the last
quarter of the steps; and the gap against the re-noising noise per example, SNR = √r·rms(Δ)/√(2(1 − r)) with
r = ᾱ(gan_t)/ᾱ(τ) and Δ = prediction − target (the two sides' noises are independent: their difference has
variance 2(1 − r)). Prints a Markdown table and writes JSON.

``--runs`` instead summarises adversarial training runs (e.g. a sweep of ``--config.adv.lr``) from their
TensorBoard scalars: the D loss at the start and over the last 40 % of the steps, and the G and consistency losses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs.tdd_tiny import get_config
from tdd_jax.data.loader import make_train_iterator
from tdd_jax.diffusion.schedule import NoiseSchedule, expand_like
from tdd_jax.training import sharding
from tdd_jax.training.adversarial import head_optimizer, hinge_d_loss
from tdd_jax.training.checkpointing import restore_lora
from tdd_jax.training.frozen import load_frozen
from tdd_jax.training.loop import tokenizer_fn
from tdd_jax.training.report import read_scalars
from tdd_jax.training.step import TrainStep, build_train_step, select_batch

REPO = Path(__file__).resolve().parents[1]


def accuracy(fake_logits, real_logits) -> jax.Array:
    """Share of logits on the right side of 0 (real > 0, fake < 0), over positions, examples and heads."""
    return sum(0.5 * (jnp.mean(f < 0) + jnp.mean(r > 0)) for f, r in zip(fake_logits, real_logits)) / len(fake_logits)


def gap_snr(step: TrainStep, pred, target, tau, gan_t) -> jax.Array:
    """Per example: the re-noised gap √r·rms(pred − target) over the std √(2(1 − r)) of the two sides' noises."""
    r = step.schedule.alpha_cumprod(gan_t) / step.schedule.alpha_cumprod(tau)
    rms = jnp.sqrt(jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim))))
    return jnp.sqrt(r) * rms / jnp.sqrt(2.0 * (1.0 - r))


def make_update(step: TrainStep, tx: optax.GradientTransformation):
    """A jitted heads update: (heads, opt_state, lora, base_params, batch, keys, gap) -> (heads, opt_state, stats),
    the stats measured before the update."""
    adv = step.adversary

    def update(heads, opt_state, lora, base_params, batch, keys, gap):
        keys = jax.vmap(jax.random.split)(keys)  # as the step splits them: the same draws as training
        x_next, d, cond, target = step.consistency_target(lora, base_params, batch, keys)
        pred = step.student_prediction(lora, base_params, x_next, d, cond)
        a = jax.vmap(lambda k, tau: adv.draw(k, tau, x_next.shape[1:]))(keys[:, 1], d["tau"])
        real = adv.renoise(target, d["tau"], a["gan_t"], a["z_real"])
        fake = adv.renoise(target + expand_like(gap, pred) * (pred - target), d["tau"], a["gan_t"], a["z_fake"])

        def loss_fn(h):
            fake_logits = adv.logits(h, base_params, fake, a["gan_t"], cond)
            real_logits = adv.logits(h, base_params, real, a["gan_t"], cond)
            return hinge_d_loss(fake_logits, real_logits), accuracy(fake_logits, real_logits)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(heads)
        updates, opt_state = tx.update(grads, opt_state, heads)
        stats = {"d_loss": loss, "accuracy": acc, "snr": gap_snr(step, pred, target, d["tau"], a["gan_t"])}
        return optax.apply_updates(heads, updates), opt_state, stats

    return jax.jit(update)


def heads_optimizer(cfg, lr: float) -> optax.GradientTransformation:
    """``cfg.adv``'s heads optimizer at learning rate ``lr``."""
    adv = cfg.adv.copy_and_resolve_references()
    adv.lr = lr
    return head_optimizer(adv)


def probe(step: TrainStep, base_params, lora, batches: list[tuple[dict, jax.Array]], gap: float,
          tx: optax.GradientTransformation, update, seed: int = 0) -> dict:
    """Fresh heads trained by ``update`` (``make_update(step, tx)``) on ``batches`` ((batch, per-example keys)
    pairs) against fake = target + gap·(prediction − target): the D loss and accuracy before each update, averaged
    over the last quarter of the updates, and the re-noised gap's SNR."""
    heads = step.adversary.init_heads(jax.random.PRNGKey(seed))
    opt_state = tx.init(heads)
    history = []
    for batch, keys in batches:
        heads, opt_state, stats = update(heads, opt_state, lora, base_params, batch, keys, jnp.float32(gap))
        history.append(jax.device_get(stats))
    tail = history[-max(1, len(history) // 4):]
    snr = np.concatenate([h["snr"] for h in history])
    return {"gap": gap, "steps": len(history),
            "d_loss": float(np.mean([h["d_loss"] for h in tail])),
            "accuracy": float(np.mean([h["accuracy"] for h in tail])),
            "d_loss_first": float(history[0]["d_loss"]),
            "snr_median": float(gap * np.median(snr)), "snr_p90": float(gap * np.quantile(snr, 0.9))}


def run_lines(workdirs: list[str]) -> list[str]:
    """A Markdown table of adversarial runs' logged losses: D loss over the first 100 steps and over the last
    40 % (mean and lowest logged value), G hinge loss and consistency loss over the last 40 %."""
    header = ["run", "steps", "d_loss first 100", "d_loss last 40 %", "lowest d_loss", "g_adv last 40 %",
              "loss last 40 %"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for workdir in workdirs:
        logged = read_scalars(workdir)
        if "d_loss" not in logged:
            raise SystemExit(f"--runs: {workdir} has no logged d_loss (not an adversarial run, or no event files)")
        steps = max(logged["d_loss"])

        def mean(tag, low, high):
            return float(np.mean([v for s, v in logged[tag].items() if low < s <= high]))

        tail = (0.6 * steps, steps)
        lowest = min(logged["d_loss"].values())
        lines.append(f"| {Path(workdir).name} | {steps} | {mean('d_loss', 0, 100):.3f} | {mean('d_loss', *tail):.3f}"
                     f" | {lowest:.3f} | {mean('g_adv', *tail):.3f} | {mean('loss', *tail):.4f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", help="trainer workdir of the student to probe")
    parser.add_argument("--runs", nargs="+", help="instead: adversarial trainer workdirs to summarise")
    parser.add_argument("--method", default="tdd_adv", help="configs/tdd_tiny.py variant (its adv.* settings)")
    parser.add_argument("--data_dir", default=str(REPO / "workdirs" / "emoji_data"))
    parser.add_argument("--gaps", default="1,4,16,64", help="factors k of the student-target gap")
    parser.add_argument("--lrs", default="1e-3,1e-2", help="heads' learning rates")
    parser.add_argument("--head_groups", type=int, help="GroupNorm groups of the heads (default: the config's)")
    parser.add_argument("--steps", type=int, default=120, help="heads updates per (gap, lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "workdirs" / "adv_probe.json")
    args = parser.parse_args(argv)
    if args.runs:
        print("\n".join(run_lines(args.runs)), flush=True)
        return
    if not args.lora:
        parser.error("--lora (a student to probe) or --runs (runs to summarise) is needed")

    cfg = get_config(args.method)
    cfg.data.path = args.data_dir
    cfg.adv.enabled = True
    if args.head_groups:
        cfg.adv.head_groups = args.head_groups
    mesh = sharding.make_mesh(1, 1)
    frozen = load_frozen(cfg.pipeline_dir, cfg, mesh)
    step = build_train_step(cfg, frozen, NoiseSchedule.from_pretrained(cfg.pipeline_dir), mesh)
    lora = step.init_state(jax.random.PRNGKey(cfg.seed)).lora
    values, meta = restore_lora(args.lora)
    nnx.replace_by_pure_dict(lora, values)
    data = make_train_iterator(cfg.data, tokenize=tokenizer_fn(cfg.pipeline_dir), process_index=0, process_count=1)
    size = int(cfg.batch.global_batch)
    batches = [(select_batch(next(data)), jax.random.split(jax.random.PRNGKey(args.seed + i), size))
               for i in range(args.steps)]
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        tx = heads_optimizer(cfg, lr)
        update = make_update(step, tx)
        rows += [{"lr": lr, **probe(step, frozen.params, lora, batches, float(k), tx, update, args.seed)}
                 for k in args.gaps.split(",")]
    header = ["gap", "lr", "d_loss", "accuracy", "d_loss_first", "snr_median", "snr_p90"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(f"{r[k]:.4g}" for k in header) + " |" for r in rows]
    lines.append(f"\nstudent {args.lora} (target rule {meta.get('method')}, step {meta.get('step')}); {args.steps} "
                 f"heads updates of batch {size} per row, heads of {cfg.adv.head_groups} GroupNorm groups; chance: "
                 f"d_loss 2, accuracy 0.5 (last quarter of the updates).")
    print("\n".join(lines), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "lora": args.lora, "method": meta.get("method"),
                                    "steps": args.steps, "batch": size, "head_groups": cfg.adv.head_groups},
                                   indent=1))


if __name__ == "__main__":
    main()
