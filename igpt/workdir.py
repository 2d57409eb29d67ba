"""Keeping a run folder whole: one run at a time, config identity on resume, the partial
files of failed saves removed, and write failures reported as one line.

  with workdir.lock(path, ".lock"):  # a second run on `path` fails at once
    workdir.check_identity(stored_config, config, path, "checkpoint 8")   # same model, data
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time

from igpt import config as config_lib
from igpt import lease, storage
from igpt.errors import UserError

# OS errors that mean "this folder cannot be written", not a bug.
WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO)
# The same, as TensorStore (Orbax's writer) reports them: in the message text only.
WRITE_REASONS = ("No space left on device", "Read-only file system", "Permission denied",
                 "Disk quota exceeded")


class WorkdirError(UserError):
  """The workdir cannot be used as asked (in use, another config, unwritable, damaged)."""


# ------------------------------------------------------------------------------ the lock


@contextlib.contextmanager
def lock(workdir: str, lock_file: str, required: bool = True):
  """Holds an exclusive advisory lock on `workdir` (through `workdir/lock_file`) for the block.

  The lock file records the holder's host and pid. The OS drops an flock when its process
  dies, so the lock of a killed run is simply taken over. Yields None once the lock is held.
  Where the folder cannot be written (a read-only copy of a finished run) and not `required`,
  yields the WorkdirError saying why, for a caller that may need no writes to go on.
  In object storage (no flock there) the lock is a lease object (`igpt.lease`).
  """
  make_workdir(workdir)
  if storage.is_remote(workdir):
    with lease.hold(storage.join(workdir, lock_file), workdir) as refused:
      if refused is not None and required:
        raise WorkdirError(str(refused)) from refused
      yield None if refused is None else WorkdirError(str(refused))
    return
  path = os.path.join(workdir, lock_file)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as e:
    if required or e.errno not in WRITE_ERRNOS:
      raise write_error(e, path) from e
    yield write_error(e, path)
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirError(f"{workdir} is in use by {holder}; wait for that run to finish, or "
                         "use another --workdir.") from None
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    except OSError as e:
      raise write_error(e, path) from e
    yield None
  finally:
    os.close(fd)  # releases the flock


def make_workdir(workdir: str) -> None:
  """Creates `workdir` (and parents), or says in one line why it cannot be a folder."""
  if storage.is_remote(workdir):
    storage.check_run_store(workdir)
    storage.check_bucket(workdir)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} exists and is not a folder; give a folder path.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise write_error(e, workdir) from e


# ------------------------------------------------------------------------------ writing


def find_write_error(e: BaseException) -> OSError | None:
  """The OSError behind `e` (its cause chain) if it says the disk or folder refused a write."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
      return e
    e = e.__cause__ or e.__context__
  return None


def write_error(e: BaseException, path: str) -> WorkdirError:
  """One line for a failed write: the path and the OS's reason."""
  stored = _storage_error(e)
  if stored is not None:
    return WorkdirError(str(stored))
  os_error = find_write_error(e)
  if os_error is not None:
    where = os_error.filename or path
    return WorkdirError(f"cannot write {where}: {os_error.strerror}.")
  text = str(e)
  reason = _write_reason(text)
  if reason:
    return WorkdirError(f"cannot write {path}: {reason}.")
  return WorkdirError(f"cannot write {path}: {type(e).__name__}: {text.splitlines()[0][:300]}")


def _storage_error(e: BaseException) -> storage.StorageError | None:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, storage.StorageError):
      return e
    e = e.__cause__ or e.__context__
  return None


def _write_reason(text: str) -> str | None:
  return next((r for r in WRITE_REASONS if r in text), None)


def is_write_failure(e: BaseException, workdir: str | None = None) -> bool:
  """Whether `e` is a refused write (disk full, read-only, permission), however wrapped;
  with `workdir`, only one inside it (an unreadable data file is not a write failure)."""
  if _storage_error(e) is not None:
    return True
  os_error = find_write_error(e)
  if os_error is not None:
    if workdir is None or not os_error.filename:
      return True
    inside = os.path.abspath(os.fspath(os_error.filename))
    return inside.startswith(os.path.abspath(workdir) + os.sep)
  return _write_reason(str(e)) is not None


# ------------------------------------------------------------------------------ config identity


def _same(field: str, a, b) -> bool:
  if field in config_lib.PATH_FIELDS and isinstance(a, str) and isinstance(b, str) and a and b:
    return storage.absolute(a) == storage.absolute(b)
  return a == b


def config_changes(stored: dict, current: dict) -> tuple[list[str], list[str]]:
  """(unsafe, safe) descriptions of the fields that differ between two config dicts.

  Safe fields are those the config schema declares may change on resume; a field the stored
  config lacks (written before the field existed) counts as holding its default.
  """
  defaults = config_lib.default_fields()
  old, new = config_lib.flatten(stored), config_lib.flatten(current)
  unsafe, safe = [], []
  for field in sorted(old.keys() | new.keys()):
    a = old.get(field, defaults.get(field, "<unset>"))
    b = new.get(field, defaults.get(field, "<unset>"))
    if not _same(field, a, b):
      (safe if config_lib.may_change_on_resume(field) else unsafe).append(
          f"{field}: {a!r} -> {b!r}")
  return unsafe, safe


def check_identity(stored: dict, current: dict, workdir: str, source: str) -> list[str]:
  """Raises WorkdirError if `current` changes the model or the data stream of the run stored
  in `workdir` (its config as read from `source`); returns the safe changes, to be logged."""
  unsafe, safe = config_changes(stored, current)
  if unsafe:
    raise WorkdirError(
        f"the config differs from the run in {workdir} ({source}) in fields that change the "
        f"model or the data: {'; '.join(unsafe)}. Resume with the same values (the run's "
        f"config.json), or start a new run in another --workdir.")
  return safe


# ------------------------------------------------------------------------------ failed saves


def discard_partial_saves(checkpoint_dir: str) -> None:
  """Removes the temporary folders of saves that failed (Orbax writes a step into
  `<step>.orbax-checkpoint-tmp*` and renames it only once whole), so a full disk leaves only
  whole checkpoints behind."""
  if not storage.isdir(checkpoint_dir):
    return
  for name in storage.listdir(checkpoint_dir):
    if ".orbax-checkpoint-tmp" in name:
      storage.rmtree(storage.join(checkpoint_dir, name))
