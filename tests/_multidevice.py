"""One train step two ways, from the same state and batch; prints a JSON report for test_train_step.py.

- full_1dev: 1 device, the whole batch at once;
- accum_8dev: 8 simulated CPU devices (mesh data=2 x fsdp=4, everything FSDP-split), 2 accumulated microbatches;
- replicated_8dev: the same with ``mesh.lora_sharding='replicated'`` (LoRA and Adam moments whole on every
  device, base weights still split); plus the state shardings both rules give an adversarial step (no compile).
Equal results show both that accumulation and that sharding leave the step unchanged (each compile costs
tens of seconds on a CPU, so the two properties share one comparison).
Three settings keep the comparison about the plumbing rather than float rounding: the model computes in
float64 (in float32 the LoRA gradients of the two layouts differ by ≈ 2e-5 relative although every example's
loss is bit-identical: sharding changes the order of the gradients' contractions, and the gradient of a
consistency loss is a small difference of large terms); AdamW's eps = 1, so an update is ≈ lr·gradient (with
eps = 1e-8 the first Adam step is ≈ lr·sign(g), which flips on rounding noise wherever g ≈ 0); and the L2 loss
(pseudo-Huber with c = 0.001 is nearly L1, whose gradient jumps where a residual crosses 0).

Run as a subprocess (``python tests/_multidevice.py PIPELINE_DIR``): the device count must be fixed through
XLA_FLAGS before JAX is imported, which a pytest process that already imported JAX cannot do.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _step_setup import cached_batch, setup, step_config  # noqa: E402

from tdd_jax.training import sharding  # noqa: E402
from tdd_jax.training.step import compile_train_step  # noqa: E402

GLOBAL_BATCH = 16  # with 2 microbatches: one example per device and microbatch on 8 devices


def _is_split(x) -> bool:
    return not x.sharding.is_fully_replicated


def _mesh(devices):
    return sharding.make_mesh(2, -1, devices) if len(devices) > 1 else sharding.make_mesh(1, 1, devices)


def _specs(tree) -> list[str]:
    """The distinct PartitionSpecs of a tree of shardings, as text ('()': replicated)."""
    return sorted({str(tuple(s.spec)) for s in jax.tree.leaves(tree)})


def run(pipeline_dir: str, devices, grad_accum: int, lora_sharding: str = "fsdp",
        attention_impl: str | None = None) -> dict:
    mesh = _mesh(devices)
    cfg = step_config(**{"batch.global_batch": GLOBAL_BATCH, "batch.grad_accum": grad_accum, "optim.lr": 1e-2,
                         "optim.eps": 1.0, "loss.kind": "l2", "mesh.lora_sharding": lora_sharding,
                         "model.dtype": "float64", "model.param_dtype": "float64",
                         "model.attention_impl": attention_impl})
    frozen, step = setup(cfg, pipeline_dir, mesh, encoders=False)
    batch = sharding.shard_batch(mesh, cached_batch(GLOBAL_BATCH))
    state = step.init_state(jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, state.lora)
    compiled = compile_train_step(step, batch)
    state, metrics = compiled.fn(state, frozen.params, batch)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - b, state.lora, before)
    return {
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "delta": [d.tolist() for d in jax.tree.leaves(delta)],
        "tau": np.asarray(metrics["tau"]).tolist(),
        "base_split": sum(_is_split(x) for x in jax.tree.leaves(frozen.params)),
        "base_leaves": len(jax.tree.leaves(frozen.params)),
        "lora_split": sum(_is_split(x) for x in jax.tree.leaves(state.lora)),
        "moments_split": sum(_is_split(x) for x in jax.tree.leaves(state.opt_state)),
        "lora_specs": _specs(jax.tree.map(lambda x: x.sharding, state.lora)),
        "moment_specs": _specs(jax.tree.map(lambda x: x.sharding, state.opt_state)),
        "memory": compiled.memory,
        "flops": compiled.flops,
    }


def adversarial_state_specs(pipeline_dir: str, lora_sharding: str) -> dict:
    """{state field: its leaves' PartitionSpecs} of a TDD-adv step with an EMA on 8 devices (built, not compiled)."""
    cfg = step_config(**{"adv.enabled": True, "ema_decay": 0.5, "mesh.lora_sharding": lora_sharding,
                         "batch.global_batch": GLOBAL_BATCH})
    _, step = setup(cfg, pipeline_dir, _mesh(jax.devices()), encoders=False)
    shardings = step.state_shardings
    return {name: _specs(getattr(shardings, name))
            for name in ("lora", "ema_lora", "opt_state", "heads", "heads_opt_state", "step", "rng")}


def main(pipeline_dir: str) -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 simulated devices, got {jax.device_count()}")
    one, eight = jax.devices()[:1], jax.devices()
    report = {"full_1dev": run(pipeline_dir, one, 1), "accum_8dev": run(pipeline_dir, eight, 2),
              "replicated_8dev": run(pipeline_dir, eight, 2, "replicated"),
              "adv_specs": {rule: adversarial_state_specs(pipeline_dir, rule) for rule in sharding.LORA_SHARDINGS}}
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
