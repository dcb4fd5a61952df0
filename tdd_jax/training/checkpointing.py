"""Training checkpoints: everything a preempted run needs to continue bit for bit, and what export needs.

One orbax ``CheckpointManager`` step folder holds three items, written atomically (orbax commits a step only
when every item is complete):
- ``state``: the TrainState pytree (step, LoRA, EMA LoRA, optimizer state, PRNG key; the adversarial heads and
  their optimizer state in TDD-adv runs), sharded arrays written by every process;
- ``data``: each process's data-iterator state as ``process_<i>-of-<n>.json`` (its own skip counters; the
  position, in global batches, is the same in all, so a run on another process count resumes from any of them);
- ``meta``: JSON describing the LoRA (method, rank, alpha, targets, target-rule and guidance settings, step) and
  the full config, which is what the conversion to diffusers/kohya files writes as safetensors metadata.

Saves are asynchronous: the device arrays are copied off and written in the background while training goes on.
A state holding a non-finite value is never saved (``NonFiniteError``). Resuming never guesses: a checkpoint folder that holds anything but restorable steps is a ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tdd_jax.cli import UserError
from tdd_jax.models import lora_formats
from tdd_jax.models.lora import LoRAConfig

STATE, DATA, META = "state", "data", "meta"
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used (or none is where one was asked for); never answered by silently
    starting from scratch."""


class NonFiniteError(FloatingPointError):
    """The state to be saved holds NaN or Inf: saving it would replace a good checkpoint with a broken one."""


def non_finite_leaves(tree) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` that hold a NaN or Inf in this process's shards.

    Checked on the host, shard by shard: a device reduction over a sharded array is a collective, which can
    deadlock against the step still running on the same devices (XLA CPU's in-process all-reduce did)."""
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.inexact):
            continue
        shards = [s.data for s in x.addressable_shards] if isinstance(x, jax.Array) else [x]
        if not all(np.isfinite(np.asarray(shard)).all() for shard in shards):
            bad.append(jax.tree_util.keystr(path))
    return bad


def as_path(path: str | os.PathLike) -> epath.Path:
    """Local paths made absolute (orbax needs that); cloud paths (gs://...) as they are."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return as_path(workdir) / CHECKPOINT_SUBDIR


def _data_handler() -> ocp.JsonCheckpointHandler:
    """JSON written by every process (primary_host=None), one file per process."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return ocp.JsonCheckpointHandler(
        filename=name, multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))


def lora_metadata(cfg, step: int) -> dict[str, Any]:
    """What a LoRA file needs to say about how it was trained (the export writes it into the safetensors header).

    Sampling reads the guidance range and mode (``--w_prime=auto``, paper Eq. 14, refused for 'official') and
    the solver grid (``--grid_steps``) from it: ``tdd_jax.lora_source.TRAINED_WITH``."""
    return {
        "method": cfg.target.kind, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
        "targets": list(cfg.lora.targets), "k_min": cfg.target.k_min, "k_max": cfg.target.k_max,
        "eta": cfg.target.eta, "rho": cfg.guidance.rho, "w_min": cfg.guidance.w_min, "w_max": cfg.guidance.w_max,
        "guidance_mode": cfg.guidance.mode, "solver_steps": cfg.solver.num_steps, "ema_decay": cfg.ema_decay,
        "step": int(step), "config": json.loads(cfg.to_json_best_effort()),
    }


# Metadata keys that fix the LoRA's shapes and meaning, and the config field each comes from.
_LORA_FIELDS = {"rank": "lora.rank", "alpha": "lora.alpha", "targets": "lora.targets"}


def check_compatible(meta: dict, cfg, where: str) -> None:
    """Refuse (before anything is restored or written) to resume a checkpoint whose LoRA another config made."""
    now = lora_metadata(cfg, meta.get("step", 0))
    for key, field in _LORA_FIELDS.items():
        if meta.get(key) != now[key]:
            raise CheckpointError(f"{where} was trained with {field}={meta.get(key)!r} but the config has "
                                  f"{field}={now[key]!r}; resume with the same {field} or pick another --workdir "
                                  "(nothing was written).")


class Checkpointer:
    """Async, keep-last-N checkpoints of (TrainState, data-iterator state, metadata) under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int):
        self.directory = as_path(directory)
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True),
            item_handlers={STATE: ocp.PyTreeCheckpointHandler(), DATA: _data_handler(),
                           META: ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        """The newest committed step; an existing folder with content but no committed step is an error."""
        step = self._manager.latest_step()
        if step is None and self.directory.is_dir() and any(self.directory.iterdir()):
            raise CheckpointError(
                f"{self.directory} is not empty but holds no complete checkpoint "
                f"({sorted(p.name for p in self.directory.iterdir())[:5]}); refusing to start from scratch over "
                "it. Remove it or pick another --workdir.")
        return step

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Start an async save when ``step`` is a multiple of ``every`` (or ``force``); returns whether it did.

        ``data_state`` is copied now, so the iterator may move on while the save runs. A ``state`` with a
        non-finite value raises ``NonFiniteError`` and writes nothing.
        """
        if not force and step % self.every != 0:
            return False
        if step in self._manager.all_steps():
            return False
        bad = non_finite_leaves(state)
        if bad:
            raise NonFiniteError(f"not saving step {step} to {self.directory}: non-finite values in "
                                 f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the previous checkpoint is kept.")
        data_state = json.loads(json.dumps(data_state))
        return self._manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeSave(state), DATA: ocp.args.JsonSave(data_state), META: ocp.args.JsonSave(meta)}),
            force=True)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, meta) of ``step`` (default: latest) laid out like ``abstract_state``.

        ``abstract_state``: the TrainState as ``jax.ShapeDtypeStruct`` leaves carrying their shardings (or
        concrete arrays), so the restored state can be donated to the compiled step as is; the shardings may be
        of another mesh than the one that wrote the checkpoint (each array is read into the new layout).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
        try:
            target, rebuild = self._saved_fields(step, target)
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)  # read into these shardings
            out = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(target, restore_args=restore_args), META: ocp.args.JsonRestore()}))
            data_state = self._data_state(step)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: {e}). "
                "It may be truncated or written by a different config; remove that step folder "
                "to resume from an earlier one.") from e
        return rebuild(out[STATE]), data_state, out[META]

    def _saved_fields(self, step: int, target):
        """(restore target, rebuild) for a state dataclass (TrainState) whose None fields the checkpoint may
        lack: a checkpoint written before a field existed (e.g. the adversarial heads) restores with that
        field None, as the config that wrote it had it."""
        if not dataclasses.is_dataclass(target):
            return target, lambda restored: restored
        saved = self._manager.item_metadata(step)[STATE].tree
        fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
        absent = {name for name, value in fields.items() if value is None and name not in saved}
        if not absent:
            return target, lambda restored: restored
        return ({name: v for name, v in fields.items() if name not in absent},
                lambda restored: type(target)(**restored))

    def meta(self, step: int) -> dict:
        """The metadata of ``step`` alone (cheap: no arrays are read)."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has no readable metadata "
                                  f"({type(e).__name__}: {e})") from e

    def _data_state(self, step: int) -> dict:
        """This process's saved data state, or (saved on another process count) the first process's."""
        folder = self.directory / str(step) / DATA
        own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        saved = sorted(folder.glob("process_*-of-*.json"))
        if not own.exists() and not saved:
            raise FileNotFoundError(f"no data iterator state in {folder}")
        return json.loads((own if own.exists() else saved[0]).read_text())

    def wait(self) -> None:
        """Block until the in-flight async save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _strip_value(tree):
    """nnx.State leaves are saved as {'value': array}; export wants the plain nested dict of arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _strip_value(v) for k, v in tree.items()}
    return tree


def _locate(path: str | os.PathLike, step: int | None) -> tuple[epath.Path, int | None]:
    """Accept a workdir, its checkpoints/ folder or one step folder."""
    path = as_path(path)
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return path / CHECKPOINT_SUBDIR, step
    if (path / STATE).is_dir() and path.name.isdigit():
        return path.parent, int(path.name) if step is None else step
    if path.is_dir():
        return path, step
    raise CheckpointError(f"{path} is neither a trainer workdir nor a checkpoint folder")


def _open_step(path: str | os.PathLike, step: int | None) -> tuple[ocp.CheckpointManager, epath.Path, int]:
    """(a reading manager, its folder, ``step`` or the latest) for a workdir / checkpoint folder; close it."""
    directory, step = _locate(path, step)
    manager = ocp.CheckpointManager(directory, item_handlers={
        STATE: ocp.PyTreeCheckpointHandler(), DATA: _data_handler(), META: ocp.JsonCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        manager.close()
        raise CheckpointError(f"no checkpoint in {directory}")
    return manager, directory, step


def checkpoint_metadata(path: str | os.PathLike, *, step: int | None = None) -> dict:
    """The ``lora_metadata`` of a workdir / checkpoint folder at ``step`` (default: the latest); no arrays read."""
    manager, directory, step = _open_step(path, step)
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])
    except Exception as e:
        raise CheckpointError(f"checkpoint step {step} in {directory} has no readable metadata "
                              f"({type(e).__name__}: {e})") from e
    finally:
        manager.close()


def restore_lora(path: str | os.PathLike, step: int | None = None, ema: bool = False) -> tuple[dict, dict]:
    """(LoRA tree as a nested dict of numpy arrays, metadata) from a trainer checkpoint, on any host.

    Reads only the LoRA (online, or the EMA copy with ``ema=True``) and the metadata, not the optimizer state,
    and needs no devices of the training topology. Keys are the model's module path components, ending in
    ``lora_A``/``lora_B``.
    """
    manager, directory, step = _open_step(path, step)
    key = "ema_lora" if ema else "lora"
    try:
        tree = manager.item_metadata(step)[STATE].tree
        if tree.get(key) is None:
            raise CheckpointError(f"checkpoint step {step} in {directory} has no '{key}' tree"
                                  + (" (trained with ema_decay=0)" if ema else ""))
        sub = {key: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree[key])}
        out = manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=sub, restore_args=sub, partial_restore=True),
            META: ocp.args.JsonRestore()}))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint step {step} in {directory} cannot be read: {type(e).__name__}: {e}") from e
    finally:
        manager.close()
    meta = dict(out[META])
    meta["ema"] = ema
    return _strip_value(out[STATE][key]), meta


def checkpoint_lora(path: str | os.PathLike, *, step: int | None = None, ema: bool = False):
    """(LoRA as {module path: (A, B, scale)}, metadata) of a trainer workdir / checkpoint folder: what sampling
    and export attach or write (online adapter, or the EMA one with ``ema=True``)."""
    tree, meta = restore_lora(path, step=step, ema=ema)
    scale = LoRAConfig(rank=int(meta["rank"]), alpha=meta.get("alpha")).scale
    return lora_formats.lora_from_tree(tree, scale), meta
