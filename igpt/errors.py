"""The exception a user's mistake raises: entry points print it as one line.

Raised where input is checked (a config value, a flag, a file or folder, the data), with a
message naming the thing and the fix. Any other exception is a bug and keeps its traceback.
Both types subclass the built-in error of their kind (ValueError, FileNotFoundError), so
`except ValueError` catches them too.
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake in what was given: a config value, a flag, a file, a folder or the data."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named (or that a run folder should hold) does not exist."""


class MissingDependencyError(UserError, ImportError):
  """An optional package this input needs is not installed (the message says what to install)."""


class Preempted(Exception):
  """The job was asked to stop (SIGTERM, a preemption notice); `step` is saved and whole."""

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(f"preempted at step {step} (saved in {checkpoint_dir}); rerun the same "
                     "command to resume")
    self.step = step
