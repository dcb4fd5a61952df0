"""Device mesh and every sharding decision of the trainer, in one place.

The mesh has two named axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose devices
also split the weights). Examples are sharded over both; a weight is split along one dimension over ``fsdp``
and gathered by XLA where it is used, so a pod holds one copy of the 2.6B-parameter base spread over its
devices. ``LOGICAL_AXIS_RULES`` is the only table mapping the trainer's logical names to mesh axes; every
other function here derives its ``PartitionSpec`` from it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)

# Logical axis name -> mesh axes (None = replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": (DATA, FSDP),  # the examples of a (micro)batch
    "microbatch": None,  # the gradient-accumulation axis: every microbatch spans all devices
    "weight": FSDP,  # the one dimension of a weight (base, LoRA, EMA, optimizer moments) that FSDP splits
}

# How the trained state (LoRA, EMA, heads, optimizer moments) is laid out; see ``trainable_shardings``.
LORA_SHARDINGS = ("fsdp", "replicated")

# Arrays smaller than this (biases, norms, scalars) are replicated: splitting them saves nothing and costs
# a collective each. Tests lower it to exercise FSDP on tiny models.
DEFAULT_MIN_SHARD_SIZE = 2**16


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto_detect: bool = False) -> None:
    """Join a multi-process run; must come before any other JAX call touches the devices.

    With explicit arguments (local multi-process runs, tests) they are used as given; ``auto_detect=True``
    lets JAX discover a TPU pod, SLURM or Open MPI cluster. Without either this is a single-process run and
    nothing happens, so the same entry point runs on a laptop and on a pod.
    """
    if jax.distributed.is_initialized():
        return
    if coordinator_address is not None or (num_processes or 1) > 1:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError("multi-process run: coordinator_address, num_processes and process_id are all "
                             f"required (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto_detect:
        jax.distributed.initialize()


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolve the configured axis sizes (one of them may be −1 = all remaining devices)."""
    sizes = {"mesh.data": int(data), "mesh.fsdp": int(fsdp)}
    bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad:
        raise ValueError(f"config {', '.join(bad)}: mesh axis sizes must be positive or -1 (= the rest)")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError("config mesh.data and mesh.fsdp are both -1; at most one axis can take the rest")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if num_devices % fixed:
            other = next(k for k in sizes if k != free[0])
            raise ValueError(f"config {free[0]}=-1: {other}={fixed} does not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if sizes["mesh.data"] * sizes["mesh.fsdp"] != num_devices:
        raise ValueError(f"config mesh.data={sizes['mesh.data']} x mesh.fsdp={sizes['mesh.fsdp']} does not "
                         f"equal the {num_devices} devices")
    return sizes["mesh.data"], sizes["mesh.fsdp"]


def make_mesh(data: int = 1, fsdp: int = -1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over ``devices`` (default: all devices of all processes).

    Axes are ``Auto``: shardings are hints that XLA propagates (the pjit model), not typed constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


# The TPU compiler's switches for windowed einsums (collective matmuls), as ``mesh.windowed_einsum`` sets them.
WINDOWED_EINSUM_OPTIONS = ("xla_tpu_enable_windowed_einsum_for_all_gather",
                           "xla_tpu_enable_windowed_einsum_for_reduce_scatter")


def compiler_options(mesh_cfg, mesh: Mesh) -> dict[str, bool]:
    """XLA options for a program compiled on ``mesh``, from ``cfg.mesh``: ``windowed_einsum=False`` turns the TPU
    compiler's windowed einsums off. Empty off TPU, whose compilers do not know the options."""
    if mesh.devices.flat[0].platform != "tpu" or mesh_cfg.get("windowed_einsum", True):
        return {}
    return dict.fromkeys(WINDOWED_EINSUM_OPTIONS, False)


def traced_on(mesh: Mesh, fn):
    """``fn`` traced with ``mesh`` as JAX's context mesh (``jax.sharding.use_abstract_mesh``): wrap what is
    jitted with this, so model code that needs the mesh asks JAX for it (splash attention runs its Mosaic kernel,
    which XLA cannot partition, in a ``shard_map`` over the batch) and stays mesh-free elsewhere."""
    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh


def logical_spec(*logical_axes: str | None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry these logical names (None = replicated)."""
    return PartitionSpec(*(None if name is None else LOGICAL_AXIS_RULES[name] for name in logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over every device; trailing axes whole."""
    return NamedSharding(mesh, logical_spec("batch"))


def microbatched_sharding(mesh: Mesh) -> NamedSharding:
    """(accumulation step, example, ...) arrays: each microbatch split over every device."""
    return NamedSharding(mesh, logical_spec("microbatch", "batch"))


def num_batch_shards(mesh: Mesh) -> int:
    """How many devices a batch is split over (its size must be a multiple of this)."""
    axes = LOGICAL_AXIS_RULES["batch"]
    return int(np.prod([mesh.shape[a] for a in axes]))


def weight_sharding(mesh: Mesh, shape: Sequence[int], min_size: int = DEFAULT_MIN_SHARD_SIZE) -> NamedSharding:
    """Split the largest dimension divisible by the fsdp size; replicate small or indivisible arrays."""
    n = mesh.shape[FSDP]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    divisible = [i for i, d in enumerate(shape) if d % n == 0]
    if not divisible:
        return replicated(mesh)
    dim = max(divisible, key=lambda i: shape[i])
    names = [None] * len(shape)
    names[dim] = "weight"
    return NamedSharding(mesh, logical_spec(*names))


def weight_shardings(mesh: Mesh, tree, min_size: int = DEFAULT_MIN_SHARD_SIZE):
    """``weight_sharding`` for every array leaf of a tree (an nnx.State, optimizer state, ...), same structure.

    Leaves may be arrays or ``jax.ShapeDtypeStruct``s; the rule is the same for frozen base weights, the LoRA
    tree, its EMA and the optimizer moments, so a parameter and its moments always live on the same devices.
    """
    return jax.tree.map(lambda x: weight_sharding(mesh, np.shape(x), min_size), tree)


def trainable_shardings(mesh: Mesh, tree, rule: str = "fsdp", min_size: int = DEFAULT_MIN_SHARD_SIZE):
    """Shardings of trained state (LoRA, its EMA, discriminator heads, their optimizer moments) by
    ``cfg.mesh.lora_sharding`` (one of ``LORA_SHARDINGS``): 'fsdp', the base weights' ``weight_shardings``
    size rule; 'replicated', a whole copy on every device (no gather of the LoRA in the forward pass, no
    scatter of its gradients; costs the state's bytes on every device)."""
    if rule == "replicated":
        return jax.tree.map(lambda _: replicated(mesh), tree)
    if rule != "fsdp":
        raise ValueError(f"config mesh.lora_sharding={rule!r} is not one of {LORA_SHARDINGS}")
    return weight_shardings(mesh, tree, min_size)


def shard_batch(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of a global batch -> global arrays split over ('data', 'fsdp').

    Each process passes only the examples its own devices hold (its data-loader shard); with one process that
    is the whole batch.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
