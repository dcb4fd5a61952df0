"""The training loop shared by the tiny SDXL's VAE and teacher stages.

Why not the TDD trainer's machinery: these stages train small *whole* models on one CPU host in one sitting, so
they need only AdamW with warmup + cosine decay, an EMA of the weights, and a resumable loop. The loop is
stateless apart from its checkpoint: every batch is drawn from ``(seed, step)``, so a run that is interrupted
and restarted from its last checkpoint takes exactly the same path as one that was never stopped.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

RUNS = "runs"  # work_dir/runs/<stage>/ holds a stage's resumable checkpoint and its record
CHECKPOINT_FILE = "checkpoint.pkl"
RECORD_FILE = "stage.json"  # seeds, settings and metrics of a finished stage (collected into recipe.json)


def run_dir(work_dir: str | Path, stage: str) -> Path:
    return Path(work_dir) / RUNS / stage


def write_record(work_dir: str | Path, stage: str, record: dict) -> None:
    path = run_dir(work_dir, stage) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def read_records(work_dir: str | Path) -> dict[str, dict]:
    """{stage: record} of every finished stage under ``work_dir``."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(work_dir).glob(f"{RUNS}/*/{RECORD_FILE}"))}


def adamw(lr: float, steps: int, *, warmup: int, weight_decay: float, clip: float = 1.0):
    """AdamW (β = 0.9, 0.999) after global-norm clipping, LR warmed up linearly then cosine-decayed to 10%."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))


def ema_update(ema, params, step, decay: float):
    """EMA with the usual warm-up (decay min(d, (1 + n)/(10 + n))) so early averages are not stuck at init."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: e + (1.0 - d) * (p - e), ema, params)


def init_state(params, tx: optax.GradientTransformation, ema: bool) -> dict:
    """The whole training state as one pytree of arrays (what a checkpoint stores)."""
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if ema:
        state["ema"] = params
    return state


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: Callable,
                    ema_decay: float | None = None) -> Callable:
    """Jitted ``(state, batch, key) -> (state, metrics)`` for ``loss, metrics = loss_fn(model, batch, key)``
    minimised over all of the model's ``nnx.Param``s (graphdef is ``nnx.split(model, nnx.Param, ...)``'s)."""

    def loss_of_params(params, batch, key):
        return loss_fn(nnx.merge(graphdef, params), batch, key)

    @jax.jit
    def step(state, batch, key):
        grads, metrics = jax.grad(loss_of_params, has_aux=True)(state["params"], batch, key)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}
        if ema_decay is not None:
            new["ema"] = ema_update(state["ema"], new["params"], state["step"], ema_decay)
        return new, metrics

    return step


def epoch_batch(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Indices of one step's batch: epochs are seeded permutations (the remainder is dropped, a different one
    each epoch). A pure function of (seed, step), so a resumed run draws the same batches."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[i * batch_size:(i + 1) * batch_size]


def step_key(seed: int, step: int) -> jax.Array:
    """The step's JAX PRNG key (noise, dropout), also a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def map_batches(fn: Callable, inputs: np.ndarray, batch_size: int = 64):
    """A jitted ``fn`` over ``inputs`` in fixed-size batches (the last one zero-padded, so ``fn`` compiles once);
    its outputs (an array or a pytree of them) concatenated along the batch axis, as numpy."""
    outputs = []
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i:i + batch_size]
        padding = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)
        outputs.append(jax.tree.map(lambda o, n=len(chunk): np.asarray(o)[:n], fn(np.concatenate([chunk, padding]))))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def round_to_fp16(params):
    """Weights rounded to what the fp16 pipeline files hold, so later stages use exactly the shipped values."""
    return jax.tree.map(lambda x: x.astype(jnp.float16).astype(x.dtype), params)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


class Progress:
    """One line every ``every`` steps: step, mean metrics since the last line, wall and CPU s/step, elapsed, ETA.

    CPU seconds per step (all threads) tell what a step costs when other processes share the cores.
    """

    def __init__(self, name: str, total: int, start: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.start_time = self.last_time = time.time()
        self.last_cpu = _cpu_seconds()
        self.last_step = start
        self.sums: dict[str, Any] = {}

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():  # summed on device: no host sync except when a line is printed
            self.sums[k] = self.sums.get(k, 0.0) + v
        if step % self.every and step != self.total:
            return
        n = max(step - self.last_step, 1)
        values = "  ".join(f"{k} {float(v) / n:.4g}" for k, v in self.sums.items())  # waits for the step
        now, cpu = time.time(), _cpu_seconds()
        per_step = (now - self.last_time) / n
        # The first interval includes compilation, so the ETA uses the latest interval's pace.
        eta = per_step * (self.total - step)
        print(f"[{self.name}] step {step}/{self.total}  {values}  {per_step:.2f} s/step "
              f"(cpu {(cpu - self.last_cpu) / n:.2f} s/step)  elapsed {_format_seconds(now - self.start_time)}  "
              f"ETA {_format_seconds(eta)}", flush=True)
        self.last_time, self.last_cpu, self.last_step, self.sums = now, cpu, step, {}


def save_checkpoint(directory: Path, state: Any, step: int, settings: dict) -> None:
    """Write (state, step, settings) atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = directory / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"state": jax.device_get(state), "step": step, "settings": settings}, f)
    os.replace(tmp, path)


def load_checkpoint(directory: Path, settings: dict) -> tuple[Any, int] | None:
    """(state, step) of a previous run with the same settings; None if there is none. A checkpoint written
    with other settings is an error rather than silently mixed into this run."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        saved = pickle.load(f)
    if saved["settings"] != settings:
        changed = sorted(k for k in set(saved["settings"]) | set(settings)
                         if saved["settings"].get(k) != settings.get(k))
        raise ValueError(f"{path} was written with other settings ({changed}); delete it to start over")
    return saved["state"], saved["step"]


def run(stage: str, work_dir: str | Path, state: Any, step_fn: Callable[[Any, int], tuple[Any, dict]],
        num_steps: int, settings: dict, *, checkpoint_every: int = 500, log_every: int = 50) -> Any:
    """Run ``state, metrics = step_fn(state, step)`` for steps [start, num_steps), resuming from the stage's
    checkpoint under ``work_dir``. ``settings`` (JSON-like) identifies the run and must match on resume."""
    directory = run_dir(work_dir, stage)
    restored = load_checkpoint(directory, settings)
    start = 0
    if restored is not None:
        state, start = restored
        print(f"[{stage}] resuming from step {start} ({directory / CHECKPOINT_FILE})", flush=True)
    progress = Progress(stage, num_steps, start, log_every)
    for step in range(start, num_steps):
        state, metrics = step_fn(state, step)
        progress.update(step + 1, metrics)
        if (step + 1) % checkpoint_every == 0 or step + 1 == num_steps:
            save_checkpoint(directory, state, step + 1, settings)
    return state
