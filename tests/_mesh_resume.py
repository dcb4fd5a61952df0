"""A checkpoint written on mesh data=2 x fsdp=4 restored onto 1x8, 8x1 and one device; prints a JSON report.

Run as a subprocess (``python tests/_mesh_resume.py DIR``): 8 simulated CPU devices need XLA_FLAGS before JAX
is imported. Per target mesh: whether every restored leaf equals the saved one and carries the target's
sharding, and the LoRA after one more AdamW step on the restored state (to compare with the same step on the
saved values in numpy-backed single-device JAX).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tdd_jax.training import sharding  # noqa: E402
from tdd_jax.training.checkpointing import Checkpointer  # noqa: E402
from tdd_jax.training.state import TrainState  # noqa: E402

TX = optax.adamw(1e-2)


def shardings(mesh, tree):
    return jax.tree.map(lambda x: sharding.weight_sharding(mesh, np.shape(x), 0), tree)


def initial_state() -> TrainState:
    rng = np.random.default_rng(0)
    lora = {"down": {"lora_A": jnp.asarray(rng.normal(size=(8, 24)), jnp.float32),
                     "lora_B": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
            "up": {"lora_A": jnp.asarray(rng.normal(size=(4, 40)), jnp.float32)}}
    opt_state = TX.update(jax.tree.map(jnp.ones_like, lora), TX.init(lora), lora)[1]
    return TrainState(step=jnp.int32(7), lora=lora, ema_lora=jax.tree.map(lambda x: 0.5 * x, lora),
                      opt_state=opt_state, rng=jax.random.PRNGKey(3))


def grads(lora):
    return jax.tree.map(lambda x: jnp.sin(x) + 0.1, lora)


def train_step(state: TrainState) -> TrainState:
    updates, opt_state = TX.update(grads(state.lora), state.opt_state, state.lora)
    return state.replace(step=state.step + 1, lora=optax.apply_updates(state.lora, updates), opt_state=opt_state)


def main(directory: str) -> None:
    saved = initial_state()
    source = sharding.make_mesh(2, 4)
    state_shardings = shardings(source, saved)
    placed = jax.device_put(saved, state_shardings)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
    ckpt = Checkpointer(directory, every=1, keep=2)
    ckpt.save(7, placed, {"global_batches": 7}, {"step": 7})
    ckpt.close()
    expected = train_step(jax.device_get(saved))
    report = {}
    for name, mesh in {"1x8": sharding.make_mesh(1, 8), "8x1": sharding.make_mesh(8, 1),
                       "one_device": sharding.make_mesh(1, 1, jax.devices()[:1])}.items():
        target = shardings(mesh, saved)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, target)
        ckpt = Checkpointer(directory, every=1, keep=2)
        restored, data_state, _ = ckpt.restore(abstract)
        ckpt.close()
        equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True))
        placed_as_target = all(a.sharding == s for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
        stepped = jax.jit(train_step, out_shardings=target)(restored)
        err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                  for a, b in zip(jax.tree.leaves(stepped.lora), jax.tree.leaves(expected.lora)))
        report[name] = {"equal": equal, "shardings": placed_as_target, "data": data_state,
                        "step": int(stepped.step), "continued_max_err": err,
                        "split": sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored))}
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
