"""What every entry point shares: config files, and how errors reach the user.

A user's mistake (a bad config value, a missing file, a folder that is not a run) ends in one
line `error: ...` and exit status 2; `--debug` (or IGPT_DEBUG=1) shows the traceback instead.
Ctrl-C ends with one line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import flags, logging

from igpt.guards import NonFiniteLossError

_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks for user errors too.")

# Errors that mean "the input is wrong", not "the code is wrong".
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, NonFiniteLossError)


class _QuietOrbax:
  """Drops Orbax's per-save INFO chatter from the console; its warnings still show."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def run_main(main, interrupted_hint: str = "") -> None:
  """Calls `main()` with the entry-point error style (see the module docstring)."""
  logging.get_absl_handler().addFilter(_QuietOrbax())
  debug = _DEBUG.value or os.environ.get("IGPT_DEBUG", "") not in ("", "0")
  try:
    main()
  except KeyboardInterrupt:
    sys.stderr.write(f"\ninterrupted{': ' + interrupted_hint if interrupted_hint else ''}\n")
    sys.exit(130)
  except USER_ERRORS as e:
    if debug:
      raise
    sys.stderr.write(f"error: {e}\n(run with --debug for the traceback)\n")
    sys.exit(2)
