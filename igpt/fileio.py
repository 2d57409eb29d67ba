"""Atomic file writes: a file is either its old self or complete, never half-written.

`atomic_open(path)` writes one file; `atomic_files(paths)` writes several that belong together
(a picture and its tokens): either all of them are published or none is touched.
A path may be an object-store URL (`igpt.storage`): the file is written locally, then sent as
one object, which the store publishes whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from igpt import storage


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
  """Yields a temp file beside `path` that replaces `path` only if the block completes.

  A crash or a kill mid-write leaves `path` untouched (at worst a stray hidden temp file).
  """
  with atomic_files([path]) as (tmp,):
    with open(tmp, mode) as f:
      yield f


@contextlib.contextmanager
def atomic_files(paths):
  """Yields temp paths beside `paths` that replace them, all together, if the block completes.

  Each temp path ends like its final path (`.x.png-<random>.tmp.png` for `x.png`), so writers
  that pick a format by extension (PIL, `np.save`) write the right thing. Once the block
  completes the temps are flushed to disk and renamed into place one by one; if a rename fails
  the files already renamed get their old contents back (kept as hard links until the end).
  Any failure removes every temp, so the old files stay as they were. Only a kill between two
  of the renames (system calls a few microseconds apart) can leave some files new and the
  others old. URLs are written in a local temp folder and sent one object each, in order, once
  the block completes; an object store cannot publish two objects at once, so a kill between
  the uploads can leave the first new and the others old.
  """
  paths = [os.fspath(p) for p in paths]
  if any(storage.is_remote(p) for p in paths):
    with _remote_files(paths) as temps:
      yield temps
    return
  paths = [os.path.abspath(p) for p in paths]
  temps, backups = [], {}
  try:
    for path in paths:
      folder, base = os.path.split(path)
      os.makedirs(folder, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}-",
                                 suffix=".tmp" + os.path.splitext(base)[1])
      temps.append(tmp)
      try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
      finally:
        os.close(fd)
    try:
      yield list(temps)
      for tmp in temps:
        _fsync(tmp)  # a full disk shows here at the latest, before anything is replaced
    except OSError as e:
      # A write into an open file (np.save, PIL, json) fails without naming it: name it.
      if e.filename is None and e.errno:
        where = paths[0] if len(paths) == 1 else os.path.dirname(paths[0])
        raise OSError(e.errno, e.strerror, where) from e
      raise
    # Every file but the last can need its old contents back if a later rename fails.
    for path in paths[:-1]:
      backups[path] = _backup(path) if os.path.exists(path) else None
    published = []
    try:
      for path, tmp in zip(paths, temps):
        os.replace(tmp, path)
        published.append(path)
    except BaseException:
      for path in published:
        if backups[path] is None:
          os.remove(path)
        else:
          os.replace(backups.pop(path), path)
      raise
  finally:
    for leftover in temps + [b for b in backups.values() if b]:
      if os.path.lexists(leftover):
        os.remove(leftover)


@contextlib.contextmanager
def _remote_files(urls):
  with tempfile.TemporaryDirectory(prefix="igpt-upload-") as folder:
    temps = [os.path.join(folder, f"{i}-{storage.basename(u)}")
             for i, u in enumerate(urls)]
    yield temps
    for url, tmp in zip(urls, temps):
      storage.upload(tmp, url)


def _backup(path: str) -> str:
  """A hidden second name for `path`'s current contents (a hard link; a copy where links fail)."""
  folder, base = os.path.split(path)
  fd, backup = tempfile.mkstemp(dir=folder, prefix=f".{base}-", suffix=".old")
  os.close(fd)
  os.remove(backup)  # os.link wants a free name; mkstemp only reserved a unique one
  try:
    os.link(path, backup)
  except OSError:
    try:
      shutil.copy2(path, backup)
    except BaseException:
      if os.path.lexists(backup):
        os.remove(backup)
      raise
  return backup


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _umask() -> int:
  """The process umask (reading it means setting it; set straight back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
