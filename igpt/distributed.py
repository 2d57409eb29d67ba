"""Multi-process start-up and the one host-side broadcast the entry points need."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def maybe_initialize(config) -> None:
  """`jax.distributed.initialize` when the config or the environment asks for it.

  Managed clusters (Cloud TPU, SLURM, Open MPI, k8s) are auto-detected by JAX. Elsewhere set
  JAX_COORDINATOR_ADDRESS=host:port plus JAX_NUM_PROCESSES and JAX_PROCESS_ID (ours).
  On CPU the cross-process collectives use gloo (jax_cpu_collectives_implementation).
  """
  env = os.environ
  if not (config.distributed or env.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  if jax.config.jax_platforms in (None, "", "cpu") and not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one console of progress, not one per host


def broadcast_rows_from_process_0(array: np.ndarray | None, num_cols: int) -> np.ndarray:
  """Process 0's float32 [n, num_cols] array on every process (others pass None).

  Used for the palette: one fit on process 0, identical tokens on every host.
  """
  if jax.process_count() == 1:
    return np.asarray(array, np.float32)
  is_source = jax.process_index() == 0
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(array) if is_source else 0)))
  buf = np.asarray(array, np.float32) if is_source else np.zeros((n, num_cols), np.float32)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf), np.float32)
