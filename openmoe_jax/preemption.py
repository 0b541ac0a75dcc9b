"""Preemption: a SIGTERM ends a training run at a step boundary, with a checkpoint of that step.

Cluster schedulers (SLURM, Kubernetes, preemptible TPU and GPU VMs) send SIGTERM before they
evict a job. `train.run` asks `Watch.reached(step)` after every step; once it answers True the
run saves a checkpoint of that step (state and data iterator), closes its writers and returns
with `preempted` set, and `launch/train.py` exits with 143 (128 + SIGTERM). Re-running the same
command resumes from that step, exactly as from any other checkpoint.

- One process: a Python SIGTERM handler sets a flag; the run stops after the step in flight.
- Several processes (`jax.distributed` initialised): JAX's preemption service receives the
  notice on any host, agrees on one step with the others, and
  `multihost_utils.reached_preemption_sync_point` answers True on every host at that step, so
  all of them save the same step (an orbax save is collective). No Python handler is installed
  there: it would replace the service's own.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

from jax._src import distributed
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Watch:
  """Context manager: watches for SIGTERM while a training loop runs."""

  def __init__(self):
    self.signalled = False
    self._previous: Any = None
    self._installed = False

  @staticmethod
  def _multi_process() -> bool:
    return distributed.global_state.client is not None

  def start(self) -> "Watch":
    """Installs the one-process SIGTERM handler. Signal handlers can only be set from the main
    thread: a run in another thread keeps the process's handling as it is."""
    if not self._multi_process() and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def stop(self) -> None:
    """Puts the previous SIGTERM handling back."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def __enter__(self) -> "Watch":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.signalled = True

  def reached(self, step: int) -> bool:
    """Whether the run should checkpoint and stop now, after `step`. Call it after every step
    (on every host, with the same steps)."""
    if self._multi_process():
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
        return False
    return self.signalled
