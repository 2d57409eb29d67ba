"""Training batches prepared ahead on worker threads, the same batches as without them.

    with Prefetcher(data.batch_at, start_step, total_steps, num_workers=2) as batches:
      for step in range(start_step, total_steps):
        batch = batches.get(step)            # exactly data.batch_at(step)
        ...
        stats = batches.take_wait_stats()    # at each log line
        if (line := input_bound_warning(stats, "raise data.num_workers")):
          logging.warning(line)

`make_batch(step)` must be a pure function of the step (`igpt.pipeline.batch_at` is), so the
batch a step gets does not depend on the number of workers, on which worker made it, or on
where the run (re)started. Workers are threads: reading, decoding (PIL) and palette encoding
(numpy gathers) release the GIL. At most `depth` batches are made ahead of the one asked for,
in step order. A batch a worker failed on raises its error at `get` of that step, not before.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

_THREAD_PREFIX = "igpt-input"


@dataclasses.dataclass(frozen=True)
class WaitStats:
  """How long `get` blocked for input over a window of steps.

  steps: gets counted; first_step, last_step: the steps they asked for; wait_s: seconds
  spent inside `get`; total_s: wall seconds of the window (from the return of the get before
  it to the return of its last get: the loop's whole time); max_wait_s at max_wait_step.
  """

  steps: int = 0
  first_step: int = -1
  last_step: int = -1
  wait_s: float = 0.0
  total_s: float = 0.0
  max_wait_s: float = 0.0
  max_wait_step: int = -1

  @property
  def fraction(self) -> float:
    """The share of the window's wall time spent waiting for input (0 when empty)."""
    return self.wait_s / self.total_s if self.total_s > 0 else 0.0

  def add(self, step: int, wait_s: float, interval_s: float) -> "WaitStats":
    slowest = wait_s > self.max_wait_s or not self.steps
    return WaitStats(self.steps + 1, step if not self.steps else self.first_step, step,
                     self.wait_s + wait_s, self.total_s + interval_s,
                     wait_s if slowest else self.max_wait_s,
                     step if slowest else self.max_wait_step)


def input_bound_warning(stats: WaitStats, hint: str, threshold: float = 0.05) -> str | None:
  """A one-line warning when the loop waited for input more than `threshold` of its time."""
  if not stats.steps or stats.fraction <= threshold:
    return None
  return (f"step {stats.last_step} waited {1e3 * stats.wait_s / stats.steps:.0f} ms per step "
          f"for input ({100 * stats.fraction:.0f}% of the time of the last {stats.steps} "
          f"steps; the longest {1e3 * stats.max_wait_s:.0f} ms at step "
          f"{stats.max_wait_step}): {hint}")


def _name_step(error: BaseException, step: int) -> None:
  """Puts the step into `error`'s message (in place: its type and traceback stay)."""
  where = f"input batch of step {step}"
  args = error.args
  plain = (len(args) == 1 and isinstance(args[0], str)
           and not (isinstance(error, OSError) and error.errno is not None)
           and not isinstance(error, KeyError))  # these format their args themselves
  if plain and not args[0].startswith(where):
    error.args = (f"{where}: {args[0]}",)
  elif not plain and hasattr(error, "add_note"):
    error.add_note(f"raised while making the {where}")


class Prefetcher(Generic[T]):
  """`get(step)` returns `make_batch(step)`, made ahead on `num_workers` threads.

  Steps start_step .. stop_step - 1 are made in order, at most `depth` (default
  2 * num_workers) ahead of the last one asked for; asking for another step restarts the
  read-ahead there (a step past stop_step is made on the spot). num_workers=0: no threads,
  `get` calls `make_batch` itself. `close()` (or leaving the `with` block) waits for the
  batches in progress and ends every worker.
  """

  def __init__(self, make_batch: Callable[[int], T], start_step: int, stop_step: int,
               num_workers: int = 2, depth: int | None = None):
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
    depth = 2 * num_workers if depth is None else depth
    if num_workers and depth < 1:
      raise ValueError(f"depth must be >= 1 with {num_workers} workers; got {depth}.")
    self._make_batch, self._stop = make_batch, stop_step
    self._depth = depth if num_workers else 0
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers, _THREAD_PREFIX)
                  if num_workers else None)
    self._pending: collections.OrderedDict[int, concurrent.futures.Future] = (
        collections.OrderedDict())
    self._next = start_step
    self._lock = threading.Lock()
    self._stats, self._last_return = WaitStats(), None
    self._closed = False
    self._fill()

  def _fill(self) -> None:
    while len(self._pending) < self._depth and self._next < self._stop:
      self._pending[self._next] = self._pool.submit(self._make_batch, self._next)
      self._next += 1

  def _restart_at(self, step: int) -> None:
    for future in self._pending.values():
      future.cancel()
    self._pending.clear()
    self._next = step

  def get(self, step: int) -> T:
    """`make_batch(step)`; its exception, naming the step, if making it failed."""
    t0 = time.perf_counter()
    with self._lock:
      if self._closed:
        raise RuntimeError("get() on a closed Prefetcher.")
      if self._pool is not None and step not in self._pending:
        self._restart_at(step)
        self._fill()
      future = self._pending.pop(step, None)
      if self._pool is not None:
        self._fill()  # the workers start on the next steps while this one is awaited
    try:
      return future.result() if future is not None else self._make_batch(step)
    except Exception as e:
      _name_step(e, step)
      raise
    finally:
      done = time.perf_counter()
      with self._lock:
        interval = done - (t0 if self._last_return is None else self._last_return)
        self._stats = self._stats.add(step, done - t0, interval)
        self._last_return = done

  def wait_fraction(self) -> float:
    """The share of wall time spent waiting in `get` since the last `take_wait_stats`."""
    with self._lock:
      return self._stats.fraction

  def take_wait_stats(self) -> WaitStats:
    """The wait statistics since the last call (or the start); starts a new window."""
    with self._lock:
      stats, self._stats = self._stats, WaitStats()
      return stats

  def close(self) -> None:
    """Drops the batches not started, waits for those in progress, ends the workers."""
    with self._lock:
      self._closed = True
      self._restart_at(self._stop)
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> "Prefetcher[T]":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
