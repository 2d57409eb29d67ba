"""Preemption: SIGTERM (what TPU VMs, GKE and SLURM send before they evict a job) stops the run at
one step that every process agrees on, after saving it.

    with preemption.Notice() as notice:
      for step ...:
        ...
        if notice.stop_at(done):   # True on every process at the same step
          save(done); raise errors.Preempted(done)

One process: a SIGTERM handler sets a flag, and the run stops after the step it is on. Several
processes (`jax.distributed`): JAX's preemption service catches the notice on whichever host
gets it, and `multihost_utils.reached_preemption_sync_point` turns True on every host at the
same step (it must then be asked at every step, by every process). Further SIGTERMs while the
run saves are logged and ignored, so they cannot cut the save short.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


def _jax_service_running() -> bool:
  """Whether jax.distributed's preemption service (which handles SIGTERM itself) runs here."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Notice:
  """Whether to stop at a step because the job is being preempted (see the module doc)."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    self._multihost = False

  def __enter__(self) -> "Notice":
    self._multihost = _jax_service_running()
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    if self._requested.is_set():
      logging.warning("SIGTERM again: already stopping at the next step and saving it.")
    else:
      logging.warning("SIGTERM: stopping after this step, and saving it.")
    self._requested.set()

  def stop_at(self, step: int) -> bool:
    """True when the run should save `step` and stop (the same step on every process)."""
    if self._multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()
