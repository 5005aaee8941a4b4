"""Preemption: SIGTERM (how preemptible TPU VMs are stopped) asks the loop to checkpoint and exit."""

from __future__ import annotations

import jax
import numpy as np


class PreemptionFlag:
  """SIGTERM (how preemptible TPU VMs are stopped) asks the loop to checkpoint and exit cleanly.

  One process: a Python SIGTERM handler sets a flag, read at every step boundary. Several processes:
  JAX's preemption service (started by `jax.distributed.initialize`) owns SIGTERM and
  `manager.reached_preemption(step)` is True on every process at the same step, so all of them stop
  and save that step; no Python handler is installed then, as it would replace the service's own. If
  the service is disabled (`jax_enable_preemption_service=False`), the local flags are combined over
  the processes at every step instead.
  """

  def __init__(self):
    import signal
    import threading

    self._set = False
    self._previous = None
    self._sync = jax.process_count() > 1 and _preemption_service_running()
    if not self._sync and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._set = True

  def is_set(self, manager, step: int) -> bool:
    if self._sync:
      return bool(manager.reached_preemption(step))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      return bool(np.any(multihost_utils.process_allgather(np.int32(self._set))))
    return self._set

  def restore(self) -> None:
    import signal

    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _preemption_service_running() -> bool:
  """Whether JAX's preemption service runs: `jax.distributed.initialize` starts it unless
  `jax_enable_preemption_service` is off."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)
