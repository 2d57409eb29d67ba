"""Atomic file writes: a file is either its old self or complete, never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
  """Yields a temp file beside `path` that replaces `path` only if the block completes.

  A crash or a kill mid-write leaves `path` untouched (at worst a stray hidden temp file).
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}-", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _umask() -> int:
  """The process umask (reading it means setting it; set straight back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
