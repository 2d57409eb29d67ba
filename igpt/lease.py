"""A run folder's lock in object storage: a lease object, renewed while the run lives.

An object store has no flock, and a killed process cannot release anything. So the holder
writes `{host, pid, token, renewed}` into the lock object and rewrites it every
`RENEW_EVERY_S`; another run refuses the folder while the lease is fresh and takes it over
once it has not been renewed for `TIMEOUT_S` (or at once where its holder was a process on
this host that has died, the common case of a killed run restarted by hand). Two runs that
start within a second of each other both write; each reads back, and only the last writer
keeps the lease. Clocks of the hosts are assumed to agree within `TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from igpt import storage

TIMEOUT_S = 300.0  # a lease not renewed for this long is taken over
RENEW_EVERY_S = 60.0
SETTLE_S = 1.0  # between writing the lease and reading it back (two starts at once)


class LeaseHeld(storage.StorageError):
  """Another live run holds the folder."""


def read(url: str) -> dict | None:
  """The lease in `url`, or None (no lease, or an unreadable one, which counts as none)."""
  try:
    return json.loads(storage.read_text(url))
  except (ValueError, FileNotFoundError):  # one request, not a look then a read
    return None


def is_stale(holder: dict, now: float, timeout_s: float = TIMEOUT_S) -> bool:
  """Whether `holder`'s lease may be taken over at `now`."""
  if now - float(holder.get("renewed", 0)) > timeout_s:
    return True
  if holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid():
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return True  # that process is gone
    except (PermissionError, ValueError, KeyError):
      pass
  return False


def describe(holder: dict, now: float) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')}, "
          f"lease renewed {now - float(holder.get('renewed', 0)):.0f}s ago)")


@contextlib.contextmanager
def hold(url: str, workdir: str, timeout_s: float = TIMEOUT_S,
         renew_every_s: float = RENEW_EVERY_S):
  """Holds the lease `url` for the block, renewing it on a thread; yields None.

  Raises LeaseHeld naming the holder if a live run has it. Where the lease cannot be written
  at all (a read-only bucket), yields that StorageError instead, for a caller that needs no
  writes (evaluating a finished run).
  """
  now = time.time()
  holder = read(url)
  if holder is not None and not is_stale(holder, now, timeout_s):
    raise LeaseHeld(_in_use(workdir, holder, now, timeout_s))
  if holder is not None:
    logging.warning("Taking over the lease of %s from %s.", workdir, describe(holder, now))
  mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  try:
    _write(url, mine)
  except storage.StorageError as e:
    yield e
    return
  time.sleep(SETTLE_S)
  current = read(url)
  if current is None or current.get("token") != mine["token"]:
    raise LeaseHeld(_in_use(workdir, current or {}, time.time(), timeout_s))
  stop = threading.Event()
  renewer = threading.Thread(target=_renew, args=(url, mine, stop, renew_every_s),
                             name="igpt-lease", daemon=True)
  renewer.start()
  try:
    yield None
  finally:
    stop.set()
    renewer.join()
    with contextlib.suppress(storage.StorageError, FileNotFoundError):
      if (read(url) or {}).get("token") == mine["token"]:
        storage.remove(url)


def _in_use(workdir: str, holder: dict, now: float, timeout_s: float) -> str:
  return (f"{workdir} is in use by {describe(holder, now)}; wait for that run to finish, or "
          f"use another --workdir (a lease not renewed for {timeout_s:.0f}s is taken over).")


def _write(url: str, mine: dict) -> None:
  mine["renewed"] = time.time()
  storage.write_bytes(url, json.dumps(mine).encode())


def _renew(url: str, mine: dict, stop: threading.Event, every_s: float) -> None:
  while not stop.wait(every_s):
    try:
      current = read(url)
      if current is not None and current.get("token") != mine["token"]:
        logging.error("The lease of %s was taken over by %s; this run goes on but no longer "
                      "holds it.", url, describe(current, time.time()))
        return
      _write(url, mine)
    except Exception as e:  # noqa: BLE001  (a failed renewal is retried at the next one)
      logging.warning("Could not renew the lease %s: %s", url, e)
