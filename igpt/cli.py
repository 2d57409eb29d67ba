"""What every entry point shares: config files, and how errors reach the user.

A user's mistake (a bad config value or flag, a missing file, a folder that is not a run or is
in use, a full or read-only disk, a diverged run) ends in one line `error: ...` and exit
status 2; `--debug` (or IGPT_DEBUG=1) shows the traceback instead. Ctrl-C ends with one line;
a preempted run (SIGTERM) with one line and status 75.
Anything else is a bug and keeps its traceback.

    cli.start(command)                            # a command module as a program
    cli.run_main(work, interrupted_hint="...")    # everything the work raises
"""

from __future__ import annotations

import errno
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from igpt import config as config_lib
from igpt import console
from igpt.errors import Preempted, UserError
from igpt.guards import DivergedError, NonFiniteLossError

if "debug" not in flags.FLAGS:  # an entry point's module may define it first
  flags.DEFINE_bool("debug", False, "Show tracebacks for user errors too.")

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run stopped on request, saved; rerun to resume
EXIT_INTERRUPTED = 130

# Errors that mean "the input (or the machine's disk) is wrong", not "the code is wrong": a
# checked mistake, a run that diverged, and the file system refusing a path or a write.
USER_ERRORS = (UserError, OSError, NonFiniteLossError, DivergedError)
# An OSError is the user's (a path they gave, a full or read-only disk) when it names a file or
# says the disk refused; any other (a socket, a device) is reported with its traceback.
_DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def is_user_error(e: BaseException) -> bool:
  """Whether `e` is reported as one line (see USER_ERRORS) rather than as a bug."""
  if isinstance(e, OSError) and not isinstance(e, UserError):
    return bool(e.filename) or e.errno in _DISK_ERRNOS or e.strerror is None
  return isinstance(e, USER_ERRORS)


def debug_enabled() -> bool:
  return flags.FLAGS.debug or os.environ.get("IGPT_DEBUG", "") not in ("", "0")


def error_line(e: BaseException) -> str:
  """A user error as one readable line."""
  if isinstance(e, OSError) and e.strerror:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror}"
  text = str(e).strip() or type(e).__name__
  return " ".join(text.split("\n"))


def fail(message: str, hint: str = "", hard_exit: bool = False) -> None:
  """Prints `error: message` (and `hint`) on stderr and exits with status 2."""
  _last_words(f"error: {message}\n" + (f"{hint}\n" if hint else ""), EXIT_USER_ERROR, hard_exit)


def _last_words(text: str, status: int, hard: bool) -> None:
  """Writes `text` on stderr and exits with `status`.

  `hard`: no interpreter teardown, and the console is closed to every other thread first:
  after a failed background write, Orbax's threads go on logging and printing tracebacks, and
  could otherwise print them under the one line that matters.
  """
  if not hard:
    sys.stderr.write(text)
    sys.exit(status)
  sys.stdout.flush()
  sys.stderr.flush()
  console = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.write(console, text.encode())
  os._exit(status)


def start(command) -> None:
  """Runs a command module of `igpt.commands` as the program: `command.define_flags()`, then
  absl's flag parsing (mistakes as one line), then `command.main(argv)`."""
  command.define_flags()

  def main(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments {argv[1:]}; every input is a --flag.")
    command.main(argv)

  app.run(main, flags_parser=parse_flags)


def _flag_value(argv, name: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


# What a bad flag, config file or --config.x override raises while flags are parsed.
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, SyntaxError,
                ImportError, OSError)


class ModelFlags:
  """--workdir, --step, --hf and --palette: where the model an entry point reads comes from
  (a run folder, or a transformers ImageGPT folder with its palette), the same everywhere."""

  def __init__(self, what: str):
    self._workdir = flags.DEFINE_string("workdir", None, f"Run folder of the model to {what}.")
    self._step = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: "
                                      "the newest).")
    self._hf = flags.DEFINE_string("hf", None, "A transformers ImageGPT checkpoint folder "
                                   "(instead of --workdir).")
    self._palette = flags.DEFINE_string("palette", None, "Palette .npy ([k, 3] in [-1, 1], "
                                        "e.g. the release's kmeans_centers.npy) for --hf; a run "
                                        "folder has its own.")

  def source(self):
    """The `igpt.trained.ModelSource` they name."""
    from igpt import trained  # pylint: disable=g-import-not-at-top  (JAX after flag parsing)
    return trained.ModelSource(workdir=self._workdir.value, step=self._step.value,
                               hf=self._hf.value, palette=self._palette.value)


def define_out_flag(default_help: str):
  """--out: the folder an entry point writes its results to."""
  return flags.DEFINE_string("out", None, f"Output folder (default: {default_help}).")


def define_model_command_flags(config_file: str, config_help: str, what: str,
                               out_default: str) -> dict:
  """What a command that reads a model takes (sample.py, probe.py): --config (its settings
  file), the model flags (--workdir/--step or --hf/--palette) and --out; {name: holder}."""
  return {"config": define_config_file(config_file, config_help), "model": ModelFlags(what),
          "out": define_out_flag(out_default)}


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv):
  """absl's flag parser, with flag and config-file mistakes reported as one `error:` line;
  `--help` prints the entry point's usage, flags and config fields, and exits 0."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print_help(argv)
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    _fail_flags(e, argv)


def _load_config_file(spec: str):
  """`get_config()` of a config file `path[:variant]`, as --config loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_help_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _flags_help() -> str:
  """The help of every flag an igpt module or the program itself defined (a command's flags
  live in its `igpt.commands` module, the shared ones in this one), absl's own left out."""
  main_module = sys.argv[0]
  modules = [m for m in flags.FLAGS.flags_by_module_dict()
             if m == main_module or m.startswith("igpt") or m.startswith("ml_collections")]
  return "\n".join(flags.FLAGS.module_help(m) for m in modules)


def print_help(argv) -> None:
  """The entry point's docstring, its flags, and its config's fields with their values."""
  main = sys.modules["__main__"]
  lines = [(main.__doc__ or "").strip(), "", "Flags:", _flags_help()]
  spec = _flag_value(argv, "config")
  if spec == "?" and "config" in flags.FLAGS:
    try:  # an entry point's default config file
      spec = flags.FLAGS["config"].config_filename or "?"
    except Exception:  # noqa: BLE001  (no default: not parsed, nothing to show)
      spec = "?"
  try:
    config = _load_config_file(spec) if spec != "?" else None
  except Exception as e:  # noqa: BLE001  (help should still print)
    lines += ["", f"(cannot read the config file {spec}: {type(e).__name__}: {e})"]
    config = None
  if config is not None:
    lines += ["", f"Config fields of {spec} (override with --config.NAME=VALUE):"]
  elif "config" in flags.FLAGS:
    config = config_lib.base_config(num_layers=24, d_model=512, num_heads=8)
    lines += ["", "Config fields of a run config, as igpt.config.base_config sets them "
                  "(a --config file changes some; see configs/):"]
  if config is not None:
    lines += [f"  --config.{name}={value!r}"
              for name, value in config_lib.flatten(config.to_dict()).items()]
  print("\n".join(lines))


def define_config_file(default_path: str, help_text: str):
  """`--config`, a config file defaulting to `default_path`, for an entry point.

  With a default, ml_collections applies the `--config.x` overrides while the flag is defined
  (at import, before `parse_flags`), so their mistakes are reported here, the same way.
  """
  try:
    return config_flags.DEFINE_config_file("config", default_path, help_text, lock_config=True)
  except _FLAG_ERRORS as e:
    if os.environ.get("IGPT_DEBUG", "") not in ("", "0"):  # --debug is not parsed yet
      raise
    _fail_flags(e, sys.argv)


def _fail_flags(e: BaseException, argv) -> None:
  if isinstance(e, flags.Error):
    text = error_line(e)
    if "Error whilst parsing config file" in text:
      # ml_collections puts the config file's whole traceback in its message.
      spec = _flag_value(argv, "config")
      raised = list(re.finditer(r"(\w+(?:Error|Exception)): ", text))
      last = text[raised[-1].end():] if raised else text
      if "get_config() takes" in last and ":" in spec:
        fail(f"the config file {spec.rpartition(':')[0]} takes no variant (':"
             f"{spec.rpartition(':')[2]}'); drop it, or use a config file whose get_config "
             "takes one (e.g. configs/igpt_s.py:cifar10).")
      fail(f"cannot read the config file {spec}: {last.strip()[:300]}")
    fail(text)
  if isinstance(e, AttributeError):
    if "get_config" in str(e):
      fail(f"the config file {_flag_value(argv, 'config')} has no get_config() function; a "
           "config file defines get_config() returning an ml_collections.ConfigDict (see "
           "configs/tiny.py).")
    # ml_collections' text is the field name, quoted a few times over, and sometimes a
    # 'Did you mean "x"' line.
    text = str(e)
    name = re.search(r"\w+", text)
    field = name.group(0) if name else text
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.") and field in a]
    fail(f"unknown config field {field!r} in {', '.join(overrides) or 'a --config. flag'}"
         + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else "")
         + "; see the config file for the fields there are.")
  fail(f"cannot read the config: {type(e).__name__}: {error_line(e)}")


def run_main(main, interrupted_hint="", debug_hint: bool = True,
             hard_exit: bool = False) -> None:
  """Calls `main()` with the entry-point error style (see the module docstring).

  `interrupted_hint`: a line for Ctrl-C, or a function that makes it then (where to resume
  from is only known at that time). `debug_hint`: add a line saying that --debug shows the
  traceback. `hard_exit`: end the process at once after the line (for programs with
  background writers; not for callers that catch SystemExit).
  """
  debug = debug_enabled()
  console.quiet(debug)
  try:
    main()
  except Preempted as e:
    _last_words(f"{e}\n", EXIT_PREEMPTED, hard_exit)
  except KeyboardInterrupt:
    hint = interrupted_hint() if callable(interrupted_hint) else interrupted_hint
    _last_words(f"\ninterrupted{': ' + hint if hint else ''}\n", EXIT_INTERRUPTED, hard_exit)
  except USER_ERRORS as e:
    if debug or not is_user_error(e):
      raise
    fail(error_line(e), "(run with --debug for the traceback)" if debug_hint else "",
         hard_exit)
