"""Command-line entry point.

    python -m jaxcl.main --config=configs/simclr_digits.py --workdir=DIR [--config.KEY=VALUE ...]

DIR is a local folder or a URL such as gs://bucket/run (docs/tpu.md, section 4). Runs on one host or
many: on a Cloud TPU VM (one host or every worker of a pod slice, which JAX finds through the TPU
metadata) or with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set,
`jax.distributed.initialize()` connects the processes first. Running again on the same DIR resumes from
the latest checkpoint.

Exit status: 0 when the run finished (trained `total_steps` and evaluated), `PREEMPTED_EXIT_STATUS` (75)
when a preemption (SIGTERM) stopped it early with a checkpoint, so that a scheduler or a restart loop
runs it again; any other non-zero status is an error.
"""

from __future__ import annotations

import os
import signal

from jaxcl import _extras

_extras.require_train_extra("python -m jaxcl.main")  # before the imports below, which need it

from absl import app, flags, logging
from ml_collections import config_flags

WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics, plots and results: a local path or a gs:// URL.")
CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a recipe in configs/.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor id of TPU chips


def on_cloud_tpu_vm(pci_devices: str = "/sys/bus/pci/devices") -> bool:
  """Whether this machine has TPU chips (a PCI device of Google's vendor id) and libtpu is installed: a
  Cloud TPU VM, where `jax.distributed.initialize()` finds the coordinator, the process count and this
  process's id itself, on one host or a whole pod slice."""
  import glob  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel

  def vendor(path):
    try:
      with open(path) as f:
        return f.read().strip()
    except OSError:
      return ""

  chips = any(vendor(p) == GOOGLE_PCI_VENDOR for p in glob.glob(os.path.join(pci_devices, "*", "vendor")))
  return chips and importlib.util.find_spec("libtpu") is not None


def _maybe_initialize_distributed() -> None:
  import jax

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # explicit cluster: coordinator, process count and id
    num = os.environ.get("JAX_NUM_PROCESSES")
    pid = os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        num_processes=int(num) if num else None, process_id=int(pid) if pid else None)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") or on_cloud_tpu_vm():
    jax.distributed.initialize()  # a Cloud TPU VM or pod slice (GCE or GKE): auto-detected


# EX_TEMPFAIL of sysexits.h ("a temporary failure; the user is invited to retry"): the run stopped early,
# a checkpoint of the stopped step is in the workdir, and running the same command again resumes it.
PREEMPTED_EXIT_STATUS = 75


def exit_status(results: dict) -> int:
  """The process's exit status for `train_and_evaluate`'s result: 0 for a finished run,
  `PREEMPTED_EXIT_STATUS` for one that stopped early ({"step": s, "stopped": True})."""
  return PREEMPTED_EXIT_STATUS if results.get("stopped") else 0


def _exit_on_sigterm(signum, frame) -> None:
  """SIGTERM outside the training loop (which installs its own handler and checkpoints first): exit with
  `PREEMPTED_EXIT_STATUS` through Python, so the workdir's lock is released on the way out."""
  del signum, frame
  raise SystemExit(PREEMPTED_EXIT_STATUS)


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax/tfds info logs would bury the progress bar
  _maybe_initialize_distributed()
  import jax

  if jax.process_count() == 1:  # with several processes JAX's preemption service owns SIGTERM
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
  from jaxcl.train import loop  # after distributed init

  return exit_status(loop.train_and_evaluate(CONFIG.value, WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
