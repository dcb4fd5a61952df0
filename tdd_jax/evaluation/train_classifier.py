"""Recipe: train the ``emoji`` feature extractor and write it (weights, config, recipe.json) to ``--out``.

    python -m tdd_jax.evaluation.train_classifier --data_dir DIR [--out tdd_jax/assets/emoji_classifier]

Every emoji of both splits is a name class (captions name exactly one emoji each, and prompt accuracy must judge
any caption); the group head learns from the train split only. Each step draws fresh augmented views
(``classifier.augment``). Held-out numbers in recipe.json, and what they mean:
- ``name_top1_clean``: the unaugmented renders (the "training images" of prompt accuracy).
- ``name_top1_heldout_views``: one augmented view per emoji drawn with a seed no training step uses. The dataset
  has one image per emoji, so a held-out *image* of a known class can only be a new view of it.
- ``group_top1_heldout_emoji``: the group head on the ``test`` split's emoji, which it never saw.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tdd_jax.data.emoji import load_emoji, read_emoji_test
from tdd_jax.evaluation.classifier import (ASSET_DIR, IMAGE_SIZE, RECIPE_FILE, EmojiClassifier, augment_batch,
                                           save_classifier)
from tdd_jax.pretrain import loop

STAGE = "emoji_classifier"
HELDOUT_VIEW_SEED = 10**6  # No training step's key: steps use fold_in(key(seed), step) with step < 10**6.


def training_data(data_dir: str) -> dict[str, np.ndarray]:
    """All emoji (train + test split) with integer name and group labels and a train-split mask."""
    entries = read_emoji_test()
    names = [e.name for e in entries]
    groups = list(dict.fromkeys(e.group for e in entries))
    parts = [load_emoji(data_dir, split, IMAGE_SIZE) for split in ("train", "test")]
    name_index, group_index = {n: i for i, n in enumerate(names)}, {g: i for i, g in enumerate(groups)}
    return {"images": np.concatenate([p["images"] for p in parts]),
            "names": np.array([name_index[c] for p in parts for c in p["captions"]], np.int32),
            "groups": np.array([group_index[g] for p in parts for g in p["groups"]], np.int32),
            "in_train_split": np.concatenate([np.full(len(p["images"]), s == "train") for p, s in
                                              zip(parts, ("train", "test"))]),
            "name_list": names, "group_list": groups}


def classifier_loss(model: EmojiClassifier, batch, key, group_weight: float, label_smoothing: float):
    images = augment_batch(key, batch["images"])
    _, name_logits, group_logits = model(images)
    num_names = name_logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(batch["names"], num_names), label_smoothing)
    name_loss = optax.softmax_cross_entropy(name_logits, targets).mean()
    mask = batch["in_train_split"].astype(jnp.float32)
    group_ce = optax.softmax_cross_entropy_with_integer_labels(group_logits, batch["groups"])
    group_loss = (group_ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    accuracy = (name_logits.argmax(-1) == batch["names"]).mean()
    return name_loss + group_weight * group_loss, {"loss": name_loss, "group_loss": group_loss, "acc": accuracy}


def evaluate(model: EmojiClassifier, data: dict, seed: int) -> dict[str, float]:
    """The three held-out numbers of the module docstring."""
    predict = jax.jit(lambda x: tuple(a.argmax(-1) for a in model(x)[1:]))
    names_clean, _ = loop.map_batches(predict, data["images"], 256)
    key = jax.random.fold_in(jax.random.key(seed), HELDOUT_VIEW_SEED)
    views = np.asarray(loop.map_batches(jax.jit(lambda x: augment_batch(key, x)), data["images"], 256))
    names_views, _ = loop.map_batches(predict, np.round(views).astype(np.uint8), 256)
    test = ~data["in_train_split"]
    _, groups_test = loop.map_batches(predict, data["images"][test], 256)
    return {"name_top1_clean": float((names_clean == data["names"]).mean()),
            "name_top1_heldout_views": float((names_views == data["names"]).mean()),
            "group_top1_heldout_emoji": float((groups_test == data["groups"][test]).mean()),
            "heldout_emoji": int(test.sum())}


def train_classifier(data_dir: str, out: str | Path, work_dir: str | Path, *, steps: int, batch_size: int,
                     lr: float, seed: int, widths=(16, 32, 64, 128), group_weight: float = 0.5,
                     label_smoothing: float = 0.1, log_every: int = 100) -> dict:
    """Train, write ``out`` (weights, config.json, recipe.json); resumable under ``work_dir``."""
    started = time.time()
    data = training_data(data_dir)
    model = EmojiClassifier(len(data["name_list"]), len(data["group_list"]), widths, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = loop.adamw(lr, steps, warmup=min(200, steps // 10), weight_decay=1e-4)
    train_step = loop.make_train_step(graphdef, tx, lambda m, b, k: classifier_loss(m, b, k, group_weight,
                                                                                     label_smoothing))
    arrays = {k: data[k] for k in ("images", "names", "groups", "in_train_split")}

    def step_fn(state, step):
        idx = loop.epoch_batch(seed, step, len(arrays["images"]), batch_size)
        return train_step(state, {k: v[idx] for k, v in arrays.items()}, loop.step_key(seed, step))

    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "widths": list(widths),
                "group_weight": group_weight, "label_smoothing": label_smoothing}
    state = loop.run(STAGE, work_dir, loop.init_state(params, tx, ema=False), step_fn, steps, settings,
                     checkpoint_every=max(steps // 4, 1), log_every=log_every)
    train_seconds = time.time() - started
    model = nnx.merge(graphdef, loop.round_to_fp16(state["params"]))
    save_classifier(out, model, {"widths": list(widths), "image_size": IMAGE_SIZE, "names": data["name_list"],
                                 "groups": data["group_list"]})
    record = {**settings, **evaluate(model, data, seed), "emoji": len(data["names"]),
              "train_seconds": round(train_seconds, 1), "jax": jax.__version__,
              "command": f"python -m tdd_jax.evaluation.train_classifier --steps {steps} --batch_size "
                         f"{batch_size} --lr {lr} --seed {seed}"}
    Path(out, RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2), flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="", help="emoji TFDS dir (built if missing; '' = TFDS default)")
    parser.add_argument("--out", default=str(ASSET_DIR), help="folder for the weights, config and recipe")
    parser.add_argument("--work_dir", default="/tmp/tdd_jax_emoji_classifier", help="resumable checkpoint dir")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_classifier(args.data_dir, args.out, args.work_dir, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed)


if __name__ == "__main__":
    main()
