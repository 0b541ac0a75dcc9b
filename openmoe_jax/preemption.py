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

Ctrl-C (SIGINT) stops a run the same way: the first one lets the step in flight finish, saves
its checkpoint and then raises KeyboardInterrupt from `train.run` (`launch/train.py` exits
with 130); a second one stops at once, without a checkpoint, as Ctrl-C usually does. Handling it
at a step boundary matters: a KeyboardInterrupt raised inside the step's call finds the state's
buffers already donated to the step, and the iterator one batch ahead of the state. With several
processes a Ctrl-C becomes a SIGTERM to the process itself, so JAX's preemption service stops
every host at one agreed step.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
from jax._src import distributed
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Watch:
  """Context manager: watches for SIGTERM and Ctrl-C while a training loop runs."""

  def __init__(self):
    self.signalled = False  # a SIGTERM arrived (one process)
    self.interrupted = False  # a Ctrl-C arrived
    self._previous: dict[int, Any] = {}

  @staticmethod
  def _multi_process() -> bool:
    return distributed.global_state.client is not None

  def start(self) -> "Watch":
    """Installs the handlers. Signal handlers can only be set from the main thread: a run in
    another thread keeps the process's handling as it is."""
    if threading.current_thread() is not threading.main_thread():
      return self
    if not self._multi_process():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    elif jax.config.jax_enable_preemption_service:
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def stop(self) -> None:
    """Puts the previous handling back."""
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def __enter__(self) -> "Watch":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.signalled = True

  def _on_sigint(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.interrupted = True
    previous = self._previous.get(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    print("\nCtrl-C: the step in flight finishes and is checkpointed, then the run stops "
          "(Ctrl-C again stops at once, without that checkpoint)", file=sys.stderr, flush=True)
    if self._multi_process():
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service: one step for all hosts

  def reached(self, step: int) -> bool:
    """Whether the run should checkpoint and stop now, after `step`. Call it after every step
    (on every host, with the same steps)."""
    if self._multi_process():
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
        return False
    return self.signalled or self.interrupted
