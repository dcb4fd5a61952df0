"""bf16 against float32 in the TDD step, on the tiny pipeline: how far the loss, the LoRA gradients and the first
AdamW update move when the UNet computes (or stores its weights) in bfloat16.

    python3 launch/precision.py --lora workdirs/table1/students/tdd/seed0     # a distilled student's LoRA
    python3 launch/precision.py                                         # a fresh LoRA with random B

Every variant sees the same LoRA values, batches and per-example noise (the step draws them from the same keys),
so the differences are the precision's alone. The step keeps the diffusion maths, the consistency function and
the pseudo-Huber loss in float32 (``conditioning.unet_output`` promotes the UNet's output); what bf16 changes is
the UNet's activations and, with bf16 storage, its weights and the LoRA. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.tdd_tiny import get_config
from tdd_jax.data.loader import make_train_iterator
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.training import sharding
from tdd_jax.training.checkpointing import restore_lora
from tdd_jax.training.frozen import load_frozen
from tdd_jax.training.loop import tokenizer_fn
from tdd_jax.training.step import build_train_step, select_batch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"))  # (compute, weights)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def relative_error(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))


def variant_outputs(method: str, data_dir: str, compute: str, weights: str, lora_values, batches: list[dict],
                    seed: int) -> list[dict]:
    """Per batch: loss, flattened gradients and first AdamW update of the step built with these dtypes."""
    cfg = get_config(method)
    cfg.data.path = data_dir
    cfg.model.dtype, cfg.model.param_dtype = compute, weights
    mesh = sharding.make_mesh(1, 1)
    frozen = load_frozen(cfg.pipeline_dir, cfg, mesh)
    step = build_train_step(cfg, frozen, NoiseSchedule.from_pretrained(cfg.pipeline_dir), mesh)
    lora = step.init_state(jax.random.PRNGKey(cfg.seed)).lora
    nnx.replace_by_pure_dict(lora, jax.tree.map(lambda v: jnp.asarray(v, jnp.dtype(weights)), lora_values))
    def loss_and_grads(lora, batch, keys):  # the step's own microbatch (no adversary): target = the same LoRA
        losses, grads, _ = step._microbatch(lora, lora, None, frozen.params, batch, keys, None)
        return losses["loss"], grads

    grad_fn = jax.jit(loss_and_grads)
    out = []
    for i, batch in enumerate(batches):
        keys = jax.random.split(jax.random.PRNGKey(seed + i), cfg.batch.global_batch)
        loss, grads = grad_fn(lora, batch, keys)
        updates, _ = step.tx.update(grads, step.tx.init(lora), lora)
        out.append({"loss": float(loss), "grads": flat(grads), "update": flat(updates)})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", help="trainer workdir whose LoRA to evaluate at (default: fresh, random B)")
    parser.add_argument("--method", default="tdd", help="configs/tdd_tiny.py variant")
    parser.add_argument("--data_dir", default=str(REPO / "workdirs" / "emoji_data"))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "workdirs" / "precision.json")
    args = parser.parse_args(argv)

    cfg = get_config(args.method)
    cfg.data.path = args.data_dir
    data = make_train_iterator(cfg.data, tokenize=tokenizer_fn(cfg.pipeline_dir), process_index=0, process_count=1)
    batches = [select_batch(next(data)) for _ in range(args.batches)]
    if args.lora:
        lora_values, _ = restore_lora(args.lora)
    else:  # B = 0 would leave only B's gradients: give B values of a trained adapter's order
        mesh = sharding.make_mesh(1, 1)
        fresh = build_train_step(cfg, load_frozen(cfg.pipeline_dir, cfg, mesh, encoders=False),
                                 NoiseSchedule.from_pretrained(cfg.pipeline_dir), mesh)
        fresh = fresh.init_state(jax.random.PRNGKey(0))
        rng = np.random.default_rng(args.seed)
        lora_values = jax.tree.map(lambda v: np.asarray(v) + 0.01 * rng.standard_normal(v.shape).astype(np.float32),
                                   fresh.lora.to_pure_dict())

    runs = {f"{c}/{w}": variant_outputs(args.method, args.data_dir, c, w, lora_values, batches, args.seed)
            for c, w in VARIANTS}
    reference = runs["float32/float32"]
    rows = []
    for name, run in runs.items():
        rows.append({
            "compute/weights": name,
            "loss": float(np.mean([r["loss"] for r in run])),
            "loss_rel_error": float(np.mean([abs(r["loss"] - f["loss"]) / f["loss"] for r, f in zip(run, reference)])),
            "grad_cosine": float(np.mean([cosine(r["grads"], f["grads"]) for r, f in zip(run, reference)])),
            "grad_rel_error": float(np.mean([relative_error(r["grads"], f["grads"]) for r, f in zip(run, reference)])),
            "update_cosine": float(np.mean([cosine(r["update"], f["update"]) for r, f in zip(run, reference)])),
            "update_sign_agreement": float(np.mean([np.mean(np.sign(r["update"]) == np.sign(f["update"]))
                                                    for r, f in zip(run, reference)])),
        })
    # Batch-to-batch spread of the float32 gradient: the noise level SGD already lives with, for scale.
    pairs = [cosine(a["grads"], b["grads"]) for a, b in zip(reference, reference[1:])]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r[header[0]] if k == header[0] else f"{r[k]:.4g}" for k in header) + " |"
              for r in rows]
    lines.append(f"\nfloat32 gradient cosine between consecutive batches (minibatch noise, for scale): "
                 f"{np.mean(pairs):.3f}; LoRA: {args.lora or 'fresh, random B'}; {args.batches} batches of "
                 f"{cfg.batch.global_batch}; method {args.method}.")
    print("\n".join(lines), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "batch_gradient_cosine": pairs, "lora": args.lora,
                                    "batches": args.batches, "method": args.method}, indent=1))


if __name__ == "__main__":
    main()
