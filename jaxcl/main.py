"""Command-line entry point.

    python -m jaxcl.main --config=configs/simclr_digits.py --workdir=DIR [--config.KEY=VALUE ...]

Runs on one host or many: with several processes (a TPU pod slice, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID set) `jax.distributed.initialize()` connects them first. Running again
on the same DIR resumes from the latest checkpoint.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and results.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a recipe in configs/.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
  import jax

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # explicit cluster: coordinator, process count and id
    num = os.environ.get("JAX_NUM_PROCESSES")
    pid = os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        num_processes=int(num) if num else None, process_id=int(pid) if pid else None)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):  # a TPU pod slice: auto-detected
    jax.distributed.initialize()


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax/tfds info logs would bury the progress bar
  _maybe_initialize_distributed()
  from jaxcl.train import loop  # after distributed init

  loop.train_and_evaluate(_CONFIG.value, FLAGS.value)


if __name__ == "__main__":
  app.run(main)
