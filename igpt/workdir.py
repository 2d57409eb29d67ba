"""Keeping a run folder whole: one run at a time, config identity on resume, damaged
checkpoints set aside, and write failures reported as one line.

  with workdir.lock(path):           # a second run on `path` fails at once
    workdir.check_identity(stored_config, config, path, "checkpoint 8")   # same model, data
    step, state, extra = workdir.restore_newest(ckpt, abstract_state, on_extra, log)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import threading
import time

from igpt.checkpoint import TreeMismatchError

LOCK_FILE = ".lock"

# Config fields that may change between a run and its resume: they change neither the model
# nor the data stream, only how long the run goes, what it reports and where it runs.
SAFE_FIELDS = (
    "train.total_steps", "train.log_every_steps", "train.eval_every_steps",
    "train.eval_batches", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.peak_flops_per_device", "train.grad_accum_steps", "train.profile_start_step",
    "train.profile_num_steps", "train.sample_every_steps", "train.sample_num_images",
    "guard.", "mesh.",
    "sharding_rules", "distributed", "model.attention", "model.remat", "data.data_dir",
    "data.test_split",
    # The palette file itself is compared by content (train.prepare_palette).
    "data.palette_path",
)

# OS errors that mean "this folder cannot be written", not a bug.
WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO)
# The same, as TensorStore (Orbax's writer) reports them: in the message text only.
WRITE_REASONS = ("No space left on device", "Read-only file system", "Permission denied",
                 "Disk quota exceeded")


class WorkdirError(ValueError):
  """The workdir cannot be used as asked (in use, another config, unwritable, damaged)."""


# ------------------------------------------------------------------------------ the lock


@contextlib.contextmanager
def lock(workdir: str, required: bool = True):
  """Holds an exclusive advisory lock on `workdir` for the block.

  The lock file records the holder's host and pid. The OS drops an flock when its process
  dies, so the lock of a killed run is simply taken over. Yields None once the lock is held.
  Where the folder cannot be written (a read-only copy of a finished run) and not `required`,
  yields the WorkdirError saying why, for a caller that may need no writes to go on.
  """
  make_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
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
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    yield None
  finally:
    os.close(fd)  # releases the flock


def make_workdir(workdir: str) -> None:
  """Creates `workdir` (and parents), or says in one line why it cannot be a folder."""
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
  os_error = find_write_error(e)
  if os_error is not None:
    where = os_error.filename or path
    return WorkdirError(f"cannot write {where}: {os_error.strerror}.")
  text = str(e)
  reason = _write_reason(text)
  if reason:
    return WorkdirError(f"cannot write {path}: {reason}.")
  return WorkdirError(f"cannot write {path}: {type(e).__name__}: {text.splitlines()[0][:300]}")


def _write_reason(text: str) -> str | None:
  return next((r for r in WRITE_REASONS if r in text), None)


def is_write_failure(e: BaseException, workdir: str | None = None) -> bool:
  """Whether `e` is a refused write (disk full, read-only, permission), however wrapped;
  with `workdir`, only one inside it (an unreadable data file is not a write failure)."""
  os_error = find_write_error(e)
  if os_error is not None:
    if workdir is None or not os_error.filename:
      return True
    inside = os.path.abspath(os.fspath(os_error.filename))
    return inside.startswith(os.path.abspath(workdir) + os.sep)
  return _write_reason(str(e)) is not None


# ------------------------------------------------------------------------------ config identity


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a.b': value} for a nested config dict."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _is_safe(field: str) -> bool:
  return any(field == s or (s.endswith(".") and field.startswith(s)) for s in SAFE_FIELDS)


def config_changes(stored: dict, current: dict) -> tuple[list[str], list[str]]:
  """(unsafe, safe) descriptions of the fields that differ between two config dicts."""
  old, new = flatten(stored), flatten(current)
  unsafe, safe = [], []
  for field in sorted(old.keys() | new.keys()):
    a, b = old.get(field, "<unset>"), new.get(field, "<unset>")
    if a != b:
      (safe if _is_safe(field) else unsafe).append(f"{field}: {a!r} -> {b!r}")
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


# ------------------------------------------------------------------------------ damaged checkpoints


def move_aside(ckpt, step: int, reason: str, log) -> str:
  """Renames the unreadable checkpoint `step` to `<step>.damaged[-n]` (kept for a post-mortem)."""
  src = os.path.join(ckpt.directory, str(step))
  if not os.path.isdir(src):  # another process of a multi-host run moved it first
    ckpt.reload()
    return src
  dst, n = f"{src}.damaged", 1
  while os.path.exists(dst):
    n += 1
    dst = f"{src}.damaged-{n}"
  try:
    os.rename(src, dst)
  except OSError as e:
    raise write_error(e, src) from e
  ckpt.reload()
  log("Checkpoint %s is damaged (%s); moved it to %s and trying the next older one.",
      src, reason, dst)
  return dst


def one_line(e: BaseException) -> str:
  """An exception as one short line (Orbax/TensorStore messages run to pages)."""
  text = str(e).split("See full TensorStore details")[0].strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _is_orbax_teardown_noise(exc) -> bool:
  # A failed Orbax read or save leaves TensorStore operations in flight; when they finish,
  # their callbacks find the event loop closed or their coroutine abandoned and print a
  # traceback each.
  return (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)) or (
      "Encountered error while reading array index" in str(exc))


def quiet_orbax_teardown() -> None:
  """Keeps the tracebacks of a failed read's or save's stray callbacks off the console."""
  if getattr(sys.excepthook, "_igpt_quiet", False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, exc, tb):
    # The callbacks run on TensorStore's threads; the main thread's own errors always print.
    stray = threading.current_thread() is not threading.main_thread()
    if not (stray and _is_orbax_teardown_noise(exc)):
      excepthook(kind, exc, tb)

  def quiet_unraisablehook(unraisable):
    if not _is_orbax_teardown_noise(unraisable.exc_value):
      unraisablehook(unraisable)

  quiet_excepthook._igpt_quiet = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def restore_newest(ckpt, abstract_state, on_extra, log, required=("data", "config")):
  """(step, state, extra) of the newest checkpoint that reads whole, or (None, None, None).

  `on_extra(step, extra)` sees each candidate's `extra` before its arrays are read (so a
  config mismatch is reported as such, not as a shape error) and may raise. A checkpoint whose
  items do not read, or whose `extra` lacks a `required` key, is moved aside and the next
  older one is tried.
  """
  for step in reversed(ckpt.all_steps()):
    try:
      extra = ckpt.read_extra(step)
      missing = [k for k in required if k not in (extra or {})]
      if missing:
        raise ValueError(f"its extra item lacks {missing}")
    except Exception as e:  # noqa: BLE001  (any unreadable extra is damage)
      move_aside(ckpt, step, one_line(e), log)
      continue
    on_extra(step, extra)
    try:
      state, extra = ckpt.restore(step, abstract_state)
    except TreeMismatchError:
      raise  # another model (e.g. a params-only import), not a damaged file
    except Exception as e:  # noqa: BLE001
      quiet_orbax_teardown()
      move_aside(ckpt, step, one_line(e), log)
      continue
    return step, state, extra
  return None, None, None
