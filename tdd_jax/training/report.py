"""What a training run says on the console: the config in a few lines when it starts, one block when it ends
(what it did, where its outputs are, what to run next). The full config and the logs go to the workdir, the
scalars to its TensorBoard files, which ``read_scalars`` reads back."""

from __future__ import annotations

from pathlib import Path

import jax

CONFIG_FILE = "config.yaml"


def config_lines(cfg, workdir, log_file) -> list[str]:
    """The settings a person checks before waiting on a run, and where the rest is written."""
    devices = jax.devices()
    where = f"{len(devices)} {devices[0].platform.upper()} device{'s' * (len(devices) > 1)}"
    if jax.process_count() > 1:
        where += f" in {jax.process_count()} processes"
    data = cfg.data.source if cfg.data.source == "emoji" else f"{cfg.data.source} {cfg.data.path}"
    return [
        f"train {cfg.target.kind.upper()}: {cfg.num_train_steps} steps of batch {cfg.batch.global_batch} at "
        f"{cfg.resolution} px, LoRA rank {cfg.lora.rank}, lr {cfg.optim.lr:g} ({cfg.optim.schedule}); on {where}",
        f"  pipeline {cfg.pipeline_dir}; data {data}",
        f"  workdir {workdir} (full config: {CONFIG_FILE}, logs: {log_file.name if log_file else 'not written'})",
    ]


def summary_lines(cfg, workdir, *, first_step: int, last_step: int, seconds: float, final_loss: float | None,
                  checkpoint, comparison, stopped: bool) -> list[str]:
    """The closing block: ``comparison`` is the comparison.png path, or None when none was rendered."""
    ran = last_step - first_step
    minutes, secs = divmod(round(seconds), 60)
    done = f"stopped on request at step {last_step}" if stopped else f"done: step {last_step}"
    lines = ["", f"{done} ({ran} steps; {minutes}m{secs:02d}s with start-up and compile"
                 + (f", final loss {final_loss:.4g})" if final_loss is not None else ")")]
    lines.append(f"  checkpoint   {checkpoint}")
    if comparison is not None:
        lines.append(f"  comparison   {comparison}")
    else:
        lines.append(f"  comparison   none: validation.every={cfg.validation.every} > num_train_steps="
                     f"{cfg.num_train_steps} (--config.validation.every={cfg.num_train_steps} renders one)")
    lines += [
        "  next:",
        f"    python -m tdd_jax.sample --pipeline={cfg.pipeline_dir} --lora={workdir} --prompts=PROMPTS.txt "
        f"--out={workdir}/samples",
        f"    python -m convert.export_lora --checkpoint={workdir} --diffusers={workdir}/lora.safetensors",
    ]
    return lines


def read_scalars(workdir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the TensorBoard event files a run wrote (float32, exactly as computed)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(workdir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                    out.setdefault(value.tag, {})[event.step] = make_ndarray(value.tensor).item()
    return out
