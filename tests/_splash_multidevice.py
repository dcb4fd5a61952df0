"""``model.attention_impl='splash'`` on 4 CPU devices against the default attention; prints a JSON report for
test_splash_sharded.py.

Off TPU the kernel runs in Pallas interpret mode, but through the same path as on a TPU mesh: a ``shard_map``
over the batch, entered because the jitted functions trace on their mesh (``sharding.traced_on``). Each part
records, for every trace of the per-device kernel, the mesh axes it was manual over (a spy on
``layers._splash_local``), so a path that silently ran the plain vmapped kernel would show:
- attention: one splash call and its q/k/v gradients, on a batch the mesh divides (split over all axes) and on
  one it does not (the kernel runs whole on every device), with the ``shard_map`` specs each one got;
- train_step: one TDD step from the same state and batch (``_multidevice.run``: mesh data=2 x fsdp=2, float64
  model; the kernel computes in fp32 inside, so the difference is the kernel's rounding);
- sampler: ``TDDPipeline`` (prompt encoding, 2-step CFG sampler, VAE decode, every attention splash) on a batch
  split over the 4 devices, float images.

Run as a subprocess (``python tests/_splash_multidevice.py PIPELINE_DIR``): importing ``_multidevice`` fixes the
simulated device count (and float64) before JAX starts, which a pytest process that already imported JAX
cannot do.
"""

import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multidevice import run  # noqa: E402  (first: sets the device count before JAX is imported)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tdd_jax.diffusion.sampler import SamplerSettings  # noqa: E402
from tdd_jax.models import layers  # noqa: E402
from tdd_jax.models.layers import ModelOptions  # noqa: E402
from tdd_jax.pipeline import TDDPipeline  # noqa: E402
from tdd_jax.training import sharding  # noqa: E402

DEVICES = 4
IMPLS = {"default": None, "splash": "splash"}


@contextlib.contextmanager
def kernel_traces():
    """Yields a list that gets, per trace of the per-device splash kernel, the mesh axes it is manual over."""
    traces, local = [], layers._splash_local

    def spy(*args, **kwargs):
        traces.append(sorted(jax.sharding.get_abstract_mesh().manual_axes))
        return local(*args, **kwargs)

    layers._splash_local = spy
    try:
        yield traces
    finally:
        layers._splash_local = local


def _shard_map_specs(fn, q, k, v) -> list[str]:
    """The q, k, v in_specs of each shard_map in ``fn``'s jaxpr (the forward kernel's first; after the
    kernel's constants)."""
    return [str(eqn.params["in_specs"][-3:]) for eqn in jax.make_jaxpr(fn)(q, k, v).jaxpr.eqns
            if eqn.primitive.name == "shard_map"]


def attention(mesh, batch: int) -> dict:
    rng = np.random.default_rng(batch)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, t, 2 * 64)), jnp.float32) for t in (64, 77, 77))
    placed = sharding.batch_sharding(mesh) if batch % mesh.size == 0 else sharding.replicated(mesh)
    q, k, v = jax.device_put((q, k, v), placed)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, heads=2, impl=impl)))

    report = {}
    for name, impl in IMPLS.items():
        fn = sharding.traced_on(mesh, jax.value_and_grad(loss(impl), argnums=(0, 1, 2)))
        value, grads = jax.jit(fn)(q, k, v)
        report[name] = {"loss": float(value), "grads": [np.asarray(g).tolist() for g in grads],
                        "specs": _shard_map_specs(fn, q, k, v)}
    return report


def sampler(pipeline_dir: str, mesh) -> dict:
    prompts = ["a photo of a cat", "a red car on the street", "a dog", "a painting of a tree"]
    settings = SamplerSettings(num_steps=2, guidance_scale=2.0)
    images = {}
    for name, impl in IMPLS.items():
        pipe = TDDPipeline.from_pretrained(pipeline_dir, opts=ModelOptions(attention_impl=impl), mesh=mesh)
        images[name] = pipe(prompts, settings, seeds=list(range(len(prompts))), output_type="float").tolist()
    return images


def main(pipeline_dir: str) -> None:
    devices = jax.devices()[:DEVICES]
    mesh = sharding.make_mesh(1, DEVICES, devices)
    report, traces = {}, {}
    with kernel_traces() as traces["attention"]:
        report["attention"] = {str(b): attention(mesh, b) for b in (DEVICES, DEVICES // 2)}
    with kernel_traces() as traces["sampler"]:
        report["sampler"] = sampler(pipeline_dir, sharding.make_mesh(DEVICES, 1, devices))
    with kernel_traces() as traces["train_step"]:
        report["train_step"] = {name: run(pipeline_dir, devices, 1, attention_impl=impl)
                                for name, impl in IMPLS.items()}
    report["kernel_traces"] = traces
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
