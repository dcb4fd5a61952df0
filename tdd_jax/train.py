"""Command line of the trainer.

    python -m tdd_jax.train --config=configs/tdd_sdxl.py [--config.field=value ...] [--workdir=DIR]

A ``--workdir`` that already holds checkpoints resumes from the latest one. Multi-process runs: on a TPU pod
every host runs the same command with ``--distributed=auto``; elsewhere pass ``--coordinator``,
``--num_processes`` and ``--process_id`` (see launch/).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from tdd_jax.training import sharding
from tdd_jax.training.config import ConfigError
from tdd_jax.training.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/tdd", "Checkpoints, TensorBoard logs and validation grids.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                                 "'auto': let JAX discover a TPU pod / SLURM / MPI cluster.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (explicit multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process runs).")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    auto_detect=_DISTRIBUTED.value == "auto")
    logging.info("Config:\n%s", _CONFIG.value)
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        raise app.UsageError(f"config {e}") from e


if __name__ == "__main__":
    app.run(main)
