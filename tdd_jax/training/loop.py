"""The training loop around the compiled step: data in, checkpoints and metrics out, preemption-safe.

Order of start-up is chosen so that mistakes cost little: the config is validated, the workdir checked and an
existing checkpoint's LoRA compared with the config before anything is written (a refused run leaves the workdir
as it was); then the log file and the full config are written, the pipeline loaded and the checkpoint restored
(an unreadable one is an error) before the step is compiled, from the config's shapes while the data pipeline
starts. The console gets a short config, the compile time, a progress bar and a closing summary
(``training.report``); the per-step logs go to the log file and TensorBoard. The loop then never waits on the device except to log: per-step
metrics stay on device and are fetched every ``log_every`` steps,
then written for every step (scalars) and for the interval (per-sample histograms, e.g. the sampled target
timesteps). SIGTERM (TPU preemption, ``kill``) lets the step in flight finish, saves, and returns normally; on
several processes JAX's preemption sync point makes every host stop at the same step.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from tdd_jax import conditioning, console
from tdd_jax.cli import UserError
from tdd_jax.data.loader import make_train_iterator
from tdd_jax.diffusion.schedule import NoiseSchedule
from tdd_jax.models.loading import read_config
from tdd_jax.training import report, sharding
from tdd_jax.training.checkpointing import Checkpointer, as_path, check_compatible, checkpoint_dir, lora_metadata
from tdd_jax.training.config import flatten, validate
from tdd_jax.training.frozen import load_frozen
from tdd_jax.training.step import (batch_kind, batch_spec, build_train_step, check_batch, compile_train_step,
                                   select_batch)
from tdd_jax.training.validation import COMPARISON, Validator, grid_path, save_png


# The component configs that fix the shapes of a training batch (see ``step.batch_spec``).
SPEC_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class PreemptionWatch:
    """Was a stop requested? SIGTERM on one process; JAX's agreed sync step on several."""

    def __init__(self):
        self._requested = False
        self._multi = jax.process_count() > 1
        if not self._multi:  # several processes: JAX's coordination service owns SIGTERM
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM: finishing the step in flight, then saving and exiting.")
        self._requested = True

    def should_stop(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def close(self) -> None:
        if not self._multi:
            signal.signal(signal.SIGTERM, self._previous)


class NonFiniteGuard:
    """Counts the steps the compiled step did not apply (NaN/Inf loss or gradient) and stops the run after
    ``limit`` in a row: by then the run is diverging, not unlucky."""

    def __init__(self, limit: int):
        self.limit, self.total, self._run = limit, 0, 0

    def __call__(self, step: int, metrics: dict) -> None:
        """Check ``step``'s metrics (waits for that step to finish)."""
        if not int(metrics["nonfinite"]):
            self._run = 0
            return
        self.total += 1
        self._run += 1
        logging.warning("step %d: non-finite loss %s or grad norm %s; update not applied (%d in a row, %d in "
                        "all).", step, float(metrics["loss"]), float(metrics["grad_norm"]), self._run, self.total)
        if self._run >= self.limit:
            raise FloatingPointError(
                f"steps {step - self._run + 1}..{step}: {self._run} steps in a row had a non-finite loss or "
                f"gradient (config max_nonfinite_steps={self.limit}); none was applied and no checkpoint holds "
                "one. Lower optim.lr or check the data and pipeline, then rerun to resume from the last "
                "checkpoint.")


def tokenizer_fn(pipeline_dir: str):
    """Captions -> both tokenizers' ids, merged into each batch by the data iterator."""
    tok1, tok2 = conditioning.load_tokenizers(pipeline_dir)
    return lambda captions: {"input_ids": conditioning.tokenize(tok1, captions),
                             "input_ids_2": conditioning.tokenize(tok2, captions)}


def _device_batch(mesh, batch: dict) -> dict:
    """This process's share of the step's fields as global arrays sharded over the batch axes."""
    return sharding.shard_batch(mesh, select_batch(batch))


def _write_interval(writer, history: list[tuple[int, dict]]) -> dict:
    """Write the scalars of every step of the interval and histograms of its per-sample values.

    The step returns its metrics replicated, so every process can fetch them whole.
    """
    history = jax.device_get(history)
    per_sample: dict[str, list] = {}
    for step, metrics in history:
        writer.write_scalars(step, {k: v for k, v in metrics.items() if np.ndim(v) == 0})
        for k, v in metrics.items():
            if np.ndim(v) > 0:
                per_sample.setdefault(k, []).append(np.ravel(v))
    last_step, last = history[-1]
    if per_sample:
        writer.write_histograms(last_step, {k: np.concatenate(v) for k, v in per_sample.items()})
    return {k: float(v) for k, v in last.items() if np.ndim(v) == 0}


def prepare_workdir(workdir: epath.Path) -> None:
    """Create ``workdir``; a local one that cannot be written is a ``UserError`` now, not a traceback later."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None
    if "://" not in str(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {workdir}: not writable by this user")


def log_file(workdir: epath.Path) -> str:
    """This process's log file: ``train.log`` (process 0), ``train.K.log`` (process K); in the system temp
    folder for a cloud workdir, which a FileHandler cannot append to."""
    name = "train.log" if jax.process_index() == 0 else f"train.{jax.process_index()}.log"
    if "://" in str(workdir):
        return os.path.join(tempfile.gettempdir(), f"tdd_jax_{workdir.name}_{name}")
    return str(workdir / name)


def train(cfg, workdir: str | os.PathLike) -> int:
    """Train (or resume) in ``workdir`` (local or gs://) until ``cfg.num_train_steps`` or a stop request;
    returns the last step."""
    started = time.time()
    workdir = as_path(workdir)
    validate(cfg)
    prepare_workdir(workdir)
    checkpoints = Checkpointer(checkpoint_dir(workdir), every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    writer = watch = None
    try:
        start = checkpoints.latest_step()
        if start is not None:  # a checkpoint of another LoRA is refused before anything is written
            check_compatible(checkpoints.meta(start), cfg, f"checkpoint step {start} in {checkpoints.directory}")
        is_chief = jax.process_index() == 0
        log = console.write_log_to(log_file(workdir))
        if is_chief:
            (workdir / report.CONFIG_FILE).write_text(str(cfg))
            for line in report.config_lines(cfg, workdir, log):
                console.say(line)
        logging.info("Config:\n%s", cfg)
        watch = PreemptionWatch()
        writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_chief, asynchronous=True)
        return _run(cfg, workdir, watch, writer, checkpoints, start, is_chief, started)
    finally:
        checkpoints.close()
        if writer is not None:
            writer.close()
        if watch is not None:
            watch.close()


def _run(cfg, workdir: epath.Path, watch: PreemptionWatch, writer, checkpoints: Checkpointer, start: int | None,
         is_chief: bool, started: float) -> int:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    logging.info("Mesh %s over %d devices in %d processes.", dict(mesh.shape), jax.device_count(),
                 jax.process_count())
    schedule = NoiseSchedule.from_pretrained(cfg.pipeline_dir)
    validating = cfg.validation.every <= cfg.num_train_steps
    frozen = load_frozen(cfg.pipeline_dir, cfg, mesh, encoders=cfg.data.source != "cache" or validating)
    step_fns = build_train_step(cfg, frozen, schedule, mesh)
    data = make_train_iterator(cfg.data, tokenize=None if cfg.data.source == "cache" else tokenizer_fn(
        cfg.pipeline_dir))
    if start is None:
        state = step_fns.init_state(jax.random.PRNGKey(cfg.seed))
    else:  # restored straight into the step's shardings, ready to be donated to it
        state, data_state, meta = checkpoints.restore(step_fns.abstract_state(), start)
        data.set_state(data_state)
        logging.info("Resumed from step %d of %s (method %s).", start, checkpoints.directory, meta["method"])
    step = first_step = int(jax.device_get(state.step))
    if step >= cfg.num_train_steps:
        logging.info("Step %d already reaches num_train_steps=%d: nothing to do.", step, cfg.num_train_steps)
        if is_chief:
            console.say(f"step {step} of {checkpoints.directory} already reaches num_train_steps="
                        f"{cfg.num_train_steps}: nothing to do (raise --config.num_train_steps to train on)")
        return step
    if is_chief and step == 0:
        writer.write_hparams({k: str(v) for k, v in flatten(cfg).items()})

    # Compiled from the config's shapes while the data pipeline fills its first batches.
    spec = batch_spec(cfg, {name: read_config(os.path.join(cfg.pipeline_dir, name)) for name in SPEC_COMPONENTS},
                      batch_kind(cfg))
    with console.timed("compiling the train step", disable=not is_chief) as notes:
        compiled = compile_train_step(step_fns, spec)
        notes.append(f"{compiled.memory['total'] / 2**20:.0f} MiB per device")
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in compiled.memory.items()}
    logging.info("Compiled train step, per device: %s; FLOPs per step: %s.", mib,
                 "n/a" if compiled.flops is None else f"{compiled.flops:.4g}")
    writer.write_scalars(step, {f"compiled/{k}_bytes": v for k, v in compiled.memory.items()}
                         | ({} if compiled.flops is None else {"compiled/flops_per_step": compiled.flops}))

    validator = Validator(cfg, frozen, schedule, mesh) if validating else None
    if validator is not None and step == 0:
        _validate(validator, writer, frozen, state, workdir, 0, is_chief)  # the untrained student, for reference
    progress = periodic_actions.ReportProgress(num_train_steps=cfg.num_train_steps, writer=writer,
                                               every_steps=cfg.log_every)
    history: list[tuple[int, dict]] = []
    last: dict = {}
    bar = console.progress(cfg.num_train_steps, "train", "step", initial=step, disable=not is_chief)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    previous = None
    batch = _device_batch(mesh, next(data))
    check_batch(batch, spec)  # global arrays: every process's share together
    while True:
        with jax.transfer_guard("disallow"):  # every input is already on device: an implicit copy is a bug
            state, metrics = compiled.fn(state, frozen.params, batch)
        if previous is not None:  # run at most one step ahead: bounds the batches queued on device
            guard(*previous)
        step += 1
        previous = (step, metrics)
        history.append((step, metrics))
        progress(step, time.time())
        bar.update()
        stopping = watch.should_stop(step)
        done = stopping or step >= cfg.num_train_steps
        if done:
            guard(*previous)
        if step % cfg.log_every == 0 or done:
            last = _write_interval(writer, history)
            history = []
            logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(last.items())))
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "lr") if k in last}, refresh=False)
        if validator is not None and (step % cfg.validation.every == 0 or done):
            _validate(validator, writer, frozen, state, workdir, step, is_chief, final=done)
        checkpoints.save(step, state, data.get_state(), lora_metadata(cfg, step), force=done)
        if done:
            break
        batch = _device_batch(mesh, next(data))
    bar.close()
    if stopping:
        logging.warning("Stopped at step %d on request; checkpoint saved: rerun with the same --workdir to resume.",
                        step)
    logging.info("Data: %s; non-finite steps skipped: %d.", data.stats, guard.total)
    if is_chief:
        comparison = workdir / COMPARISON if validator is not None else None
        for line in report.summary_lines(cfg, workdir, first_step=first_step, last_step=step,
                                         seconds=time.time() - started, final_loss=last.get("loss"),
                                         checkpoint=checkpoints.directory / str(step), comparison=comparison,
                                         stopped=stopping):
            console.say(line)
    return step


def _validate(validator, writer, frozen, state, workdir: epath.Path, step: int, is_chief: bool,
              final: bool = False) -> None:
    t0 = time.time()
    picture = validator.picture(validator(frozen.params, state.target_lora))
    if is_chief:
        path = save_png(picture, grid_path(workdir, step))
        writer.write_images(step, {"validation": picture[None]})
        logging.info("Validation grid %s (%.1fs): %s.", path, time.time() - t0, " | ".join(validator.column_labels))
        console.say(f"validation grid, step {step}: {path} ({time.time() - t0:.0f} s)")
        if final:
            logging.info("Side by side after the last step: %s", save_png(picture, workdir / COMPARISON))
