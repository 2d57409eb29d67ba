"""JAX's persistent compilation cache: a restarted run loads its compiled steps from disk.

    folder = compile_cache.enable(config_value)   # before the first compile
    with compile_cache.watch() as compiled:
      step = jitted.lower(*args).compile()
    logging.info("Compiled the train step in %s.", compile_cache.describe(compiled))
    # -> "Compiled the train step in 2.1s (compilation cache hit, /home/me/.cache/igpt/jax)."

`enable(None)` uses the user cache folder (`$XDG_CACHE_HOME/igpt/jax`, else
`~/.cache/igpt/jax`), `enable("off")` turns the cache off, any other string names the folder.
Every program is cached however small or quick to compile (JAX's defaults skip programs
under 1 s, which is most of them on CPU). The cache key covers the program, the devices,
the XLA flags and the jax/jaxlib versions, so a changed model or mesh only misses. Only
process 0 of a multi-process job writes entries (JAX's rule); every process reads.

The folder is trusted: anyone who can write to it can make this process run their code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging as pylogging
import os
import re
import time
import warnings
from typing import Iterator

import jax
from absl import logging

from igpt import storage
from igpt.errors import UserError

OFF = "off"

_EVENT = "/jax/compilation_cache/"
_LOOKUP, _HIT, _WRITE = (_EVENT + name for name in (
    "compile_requests_use_cache", "cache_hits", "cache_misses"))
_SAVED = _EVENT + "compile_time_saved_sec"


def default_dir() -> str:
  """The user cache folder for compiled programs: $XDG_CACHE_HOME/igpt/jax or
  ~/.cache/igpt/jax."""
  return storage.user_cache_dir("jax")


def _apply(enabled: bool, folder: str | None) -> None:
  """Sets JAX's cache options; restarts its cache only when they change."""
  changed = (jax.config.jax_enable_compilation_cache != enabled
             or jax.config.jax_compilation_cache_dir != folder)
  jax.config.update("jax_enable_compilation_cache", enabled)
  jax.config.update("jax_compilation_cache_dir", folder)
  if enabled:
    # JAX skips programs that compiled in under a second or whose entry is small; on CPU that
    # is nearly everything, and a second saved per program is still worth a file read.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if changed:
    # JAX opens its cache once per process, at the first compile that consults it; a new
    # setting only takes effect after a reset, which logs a line at INFO that says nothing.
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415
    jax_logger = pylogging.getLogger("jax._src.compilation_cache")
    level = jax_logger.level
    jax_logger.setLevel(pylogging.WARNING)
    try:
      compilation_cache.reset_cache()
    finally:
      jax_logger.setLevel(level)


def enable(cache_dir: str | None) -> str | None:
  """Turns on the persistent compilation cache in `cache_dir`; returns the folder, or None.

  None or "" = `default_dir()`; "off" = no cache (also overriding JAX_COMPILATION_CACHE_DIR).
  Call it before the first compile; calling it again with the same value changes nothing.
  A named folder that cannot be created raises UserError; the default folder falls back to
  no cache with a warning (a read-only home must not stop a run).
  """
  if cache_dir == OFF:
    _apply(False, None)
    return None
  folder = os.path.abspath(os.path.expanduser(cache_dir or default_dir()))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    if cache_dir:
      raise UserError(f"Compilation cache folder {folder!r} cannot be created: "
                      f"{e.strerror or e}; name another folder or turn the cache off.") from e
    logging.warning("No compilation cache: %s cannot be created (%s).", folder, e.strerror or e)
    _apply(False, None)
    return None
  _apply(True, folder)
  return folder


def active_dir() -> str | None:
  """The folder JAX caches compiled programs in now, or None when the cache is off."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  return jax.config.jax_compilation_cache_dir or None


@dataclasses.dataclass
class Compiled:
  """What the compiles inside one `watch()` block did with the persistent cache.

  lookups: XLA compiles that consulted the cache (0 when it is off, or when every program
  came from JAX's in-memory cache); hits: those loaded from disk; written: misses JAX went
  on to store (it keeps an entry already on disk).
  saved_s: JAX's estimate of the compile time the hits saved; damaged: entries that could
  not be read (removed, so the next start writes them again). Compiles on other threads
  during the block count too.
  """

  seconds: float = 0.0
  lookups: int = 0
  hits: int = 0
  written: int = 0
  saved_s: float = 0.0
  damaged: int = 0
  cache_dir: str | None = None

  @property
  def misses(self) -> int:
    return self.lookups - self.hits

  @property
  def outcome(self) -> str:
    """"off", "hit" (all from disk), "miss" (all compiled), "mixed", or "none" (no XLA
    compile consulted the cache)."""
    if self.cache_dir is None:
      return "off"
    if not self.lookups:
      return "none"
    return "hit" if not self.misses else "miss" if not self.hits else "mixed"


# JAX writes an entry in place, so a process killed mid-write leaves a cut-off file that JAX
# then warns about and never replaces (it skips keys whose file exists): every start would
# recompile. The warning names the program, and entries are files "<program>-<hash>-cache".
_READ_ERROR = re.compile(r"Error reading persistent compilation cache entry for '([^']+)': (.*)")


def _drop_damaged(folder: str, program: str, reason: str) -> None:
  """Removes `program`'s entries from `folder`, so the next start writes them whole."""
  removed = 0
  for suffix in ("-cache", "-atime"):
    for path in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(program)}-*{suffix}")):
      try:
        os.remove(path)
        removed += suffix == "-cache"
      except OSError:
        pass  # gone already, or a read-only cache: JAX compiles anyway
  logging.warning("Compilation cache entry for %s in %s could not be read (%s): compiled "
                  "instead; %d entr%s removed, the next start saves it again.", program,
                  folder, reason, removed, "y" if removed == 1 else "ies")


@contextlib.contextmanager
def watch() -> Iterator[Compiled]:
  """Counts the compilation-cache events and times the block; the yielded `Compiled` is
  filled in when the block ends.

  A damaged entry read in the block is removed (with a warning line instead of JAX's),
  so the next start writes it again; other warnings of the block are passed on.
  """
  record = Compiled(cache_dir=active_dir())
  counters = {_LOOKUP: "lookups", _HIT: "hits", _WRITE: "written"}

  def on_event(event: str, **_):
    if event in counters:
      setattr(record, counters[event], getattr(record, counters[event]) + 1)

  def on_duration(event: str, duration_secs: float, **_):
    if event == _SAVED:  # JAX stores whole compile seconds, so a quick program reads < 0
      record.saved_s += max(0.0, duration_secs)

  jax.monitoring.register_event_listener(on_event)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  t0 = time.perf_counter()
  caught = []
  try:
    with warnings.catch_warnings(record=True) as caught:
      yield record
  finally:
    record.seconds = time.perf_counter() - t0
    jax.monitoring.unregister_event_listener(on_event)
    jax.monitoring.unregister_event_duration_listener(on_duration)
    for w in caught:
      damaged = _READ_ERROR.match(str(w.message))
      if damaged and record.cache_dir:
        record.damaged += 1
        _drop_damaged(record.cache_dir, *damaged.groups())
      else:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def summary(compiled: Compiled) -> str:
  """"compilation cache: 3 programs loaded, 1 compiled and saved (<dir>)" for the end of a
  command that compiles several programs (a sampler's segments, a probe's feature passes)."""
  if compiled.outcome == "off":
    return "compilation cache off"
  if not compiled.lookups:
    return f"compilation cache {compiled.cache_dir}: nothing compiled"
  return (f"compilation cache {compiled.cache_dir}: {compiled.hits} program(s) loaded, "
          f"{compiled.misses} compiled ({compiled.written} saved)")


def describe(compiled: Compiled) -> str:
  """"2.1s (compilation cache hit, <dir>)" and the like, for a log line."""
  where, outcome = compiled.cache_dir, compiled.outcome
  if outcome == "off":
    detail = "compilation cache off"
  elif outcome == "none":
    detail = f"in-memory, compilation cache {where} not consulted"
  elif outcome == "mixed":
    detail = f"compilation cache: {compiled.hits} hit(s), {compiled.misses} miss(es), {where}"
  elif outcome == "hit":
    detail = f"compilation cache hit, {where}"
  elif compiled.damaged:
    detail = f"compilation cache entry damaged, removed from {where}"
  else:
    detail = f"compilation cache miss, {'saved to' if compiled.written else 'not saved in'} {where}"
  return f"{compiled.seconds:.1f}s ({detail})"
