"""Command line of the trainer.

    python -m tdd_jax.train --config=configs/tdd_sdxl.py [--config.field=value ...] [--workdir=DIR] [-v 0]

A ``--workdir`` that already holds checkpoints resumes from the latest one. The console shows a short config, a
progress bar and a closing summary; the full config (``config.yaml``) and every log line (``train.log``) are
written to the workdir, and ``-v 0`` (``--verbosity``) prints the logs on the console too. Multi-process runs: on
a TPU pod every host runs the same command with ``--distributed=auto``; elsewhere pass ``--coordinator``,
``--num_processes`` and ``--process_id`` (see launch/).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from tdd_jax import cli, console

console.import_quietly("tensorflow")  # before the trainer's imports load it: its C++ notices go to the log

from tdd_jax.training import sharding  # noqa: E402
from tdd_jax.training.config import ConfigError  # noqa: E402
from tdd_jax.training.loop import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/tdd", "Checkpoints, logs, TensorBoard events and validation grids.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                                 "'auto': let JAX discover a TPU pod / SLURM / MPI cluster.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (explicit multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process runs).")
flags.mark_flags_as_required(["config"])


@cli.guarded
def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag or --config.field=value")
    console.route_logs(console.absl_verbosity())
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto_detect=_DISTRIBUTED.value == "auto")
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        raise cli.UserError(f"config field {e}") from e


if __name__ == "__main__":
    app.run(main)
