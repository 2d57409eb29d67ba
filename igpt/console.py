"""The console of an entry point: one line per user error, so library chatter is kept off it.

`quiet(debug)` drops Orbax's per-save lines and JAX's note that it found no TPU, strips the
tracebacks that failed background saves and reads print on their own threads (the entry point
reports the error itself, in one line), and turns a background thread's crash into one
warning line. `--debug` keeps everything.
"""

from __future__ import annotations

import logging as pylogging
import sys
import threading

from absl import logging


class _QuietConsole:
  """Drops chatter from the console: Orbax's per-save INFO lines, and JAX's note that it found
  no TPU (it then uses the GPU or CPU, as asked). Orbax's errors are dropped and its warnings
  lose their tracebacks: a failed save or read reaches the entry point, which reports it in
  one line naming the path; --debug keeps them all."""

  def __init__(self, debug: bool):
    self.debug = debug

  def filter(self, record):
    from_orbax = "/orbax/" in record.pathname
    if record.levelno >= pylogging.WARNING:
      # Orbax's background saves run on asyncio: a failed one logs there too.
      if (from_orbax or "/asyncio/" in record.pathname) and not self.debug:
        if record.levelno >= pylogging.ERROR:
          return False
        record.exc_info, record.exc_text = None, None
      return True
    if from_orbax:
      return False
    return not str(record.msg).startswith("Unable to initialize backend")


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


def _one_line_thread_error(args) -> None:
  sys.stderr.write(f"warning: background thread {args.thread.name if args.thread else '?'} "
                   f"failed: {args.exc_type.__name__}: {args.exc_value}\n")


def quiet(debug: bool) -> None:
  """Keeps library chatter off the console (all of it shown with `debug`)."""
  logging.get_absl_handler().addFilter(_QuietConsole(debug))
  if not debug:
    # A failed background write (Orbax's save threads) is re-raised in the main thread, which
    # reports it in one line; the thread's own traceback would only bury that line.
    threading.excepthook = _one_line_thread_error
    # A failed read or save leaves TensorStore callbacks that each print a traceback before
    # (and while) the main thread reports the error.
    quiet_orbax_teardown()
