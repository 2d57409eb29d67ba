"""The documentation's commands and links stay true.

Every shell command in a code block of README.md, docs/*.md and bench/README.md that runs an
entry point (`python train.py|sample.py|probe.py|demo.py`, `python -m igpt.<module>`) uses
only flags the entry point defines and config fields its config file has. Each entry point
runs `--help` once, in a subprocess, and reports every flag it defined (`--help` prints only
the flags of the entry point's own module) and the fields of each config file the docs give
it, loaded as `--config` loads them; the fields `--help` printed must be the same. Every
relative link names a file that exists, and a link to a heading names one that is there.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import typing

import pytest

import train_helpers as th

DOC_FILES = [os.path.join(th.REPO, "README.md"),
             *sorted(glob.glob(os.path.join(th.REPO, "docs", "*.md"))),
             os.path.join(th.REPO, "bench", "README.md")]

ENTRY = re.compile(r"\bpython3? (?:-m (igpt(?:\.\w+)+)|((?:train|sample|probe|demo)\.py))(?=\s|$)")
FENCE = re.compile(r"^ *```(\w*)[^\n]*\n(.*?)^ *```", re.M | re.S)
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "&"}

# Runs an entry point with `--help` (its usage, flags and config fields; then it exits), with
# the first of the config files given, then prints every flag the program defined (and whether
# it is a boolean, which takes no value) and the fields of each config file given, loaded as
# --config loads one: `get_config()`, or `get_config(variant)` for `path:variant`.
HELP_AND_FLAGS = """
import importlib.util, json, runpy, sys
from absl import flags

def names(tree, prefix=""):
  for key, value in tree.items():
    yield from names(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]

def config_fields(spec):
  path, *variant = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("documented_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return sorted(names(module.get_config(*variant).to_dict()))

target, specs = sys.argv[1], sys.argv[2:]
sys.argv = [target, *(["--config", specs[0]] if specs else []), "--help"]
status = None
try:
  if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
  else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as e:
  status = e.code
print()
print("DOCS-FLAGS", json.dumps({
    "status": status, "flags": {name: flags.FLAGS[name].boolean for name in flags.FLAGS},
    "config_fields": {spec: config_fields(spec) for spec in specs}}))
"""


class Command(typing.NamedTuple):
  """One documented command: where it is, its entry point (a script or a module), its
  --config file (or None: the entry point's default) and the arguments after the entry point."""
  where: str
  entry: str
  config: str | None
  args: list


def _doc_name(path: str) -> str:
  return os.path.relpath(path, th.REPO)


def _shell_lines(block: str, first_line: int):
  """(line number, logical line) of a shell code block: backslash continuations joined."""
  logical, start = "", first_line
  for number, line in enumerate(block.splitlines(), first_line):
    if not logical:
      start = number
    if line.endswith("\\"):
      logical += line[:-1] + " "
      continue
    yield start, logical + line
    logical = ""


def documented_commands() -> list[Command]:
  commands = []
  for path in DOC_FILES:
    text = open(path).read()
    for fence in FENCE.finditer(text):
      if fence.group(1) not in ("", "bash", "sh", "shell", "console"):
        continue  # Python, text output...
      first_line = text.count("\n", 0, fence.start(2)) + 1
      for number, line in _shell_lines(fence.group(2), first_line):
        match = ENTRY.search(line)
        if not match:
          continue
        lexer = shlex.shlex(line[match.end():], posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        args = []
        for token in lexer:
          if token in SHELL_OPERATORS:
            break
          args.append(token)
        config = None
        for i, arg in enumerate(args):
          if arg == "--config" and i + 1 < len(args):
            config = args[i + 1]
          elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        where = f"{_doc_name(path)}:{number}: {line.strip()[:100]}"
        commands.append(Command(where, match.group(1) or match.group(2), config, args))
  return commands


def entry_points_help(configs_by_entry: dict) -> dict:
  """{(entry, config): {"flags": {name: is_boolean}, "fields": set}}, from one `--help` run
  per entry point, side by side (each imports JAX)."""
  specs = {entry: sorted(c for c in configs if c) for entry, configs in configs_by_entry.items()}
  missing = [s for entry_specs in specs.values() for s in entry_specs
             if not os.path.isfile(os.path.join(th.REPO, s.partition(":")[0]))]
  assert not missing, f"documented config files that do not exist: {missing}"
  running = {entry: subprocess.Popen([sys.executable, "-c", HELP_AND_FLAGS, entry, *specs[entry]],
                                     env=th.env(1), cwd=th.REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
             for entry in specs}
  try:
    return {key: value for entry, proc in running.items()
            for key, value in _read_help(entry, proc, configs_by_entry[entry]).items()}
  finally:
    for proc in running.values():
      proc.kill()
      proc.communicate()


def _read_help(entry: str, proc, configs) -> dict:
  stdout, stderr = proc.communicate(timeout=300)
  help_text, _, report = stdout.rpartition("DOCS-FLAGS ")
  assert proc.returncode == 0 and report, (entry, stderr[-3000:])
  report = json.loads(report)
  assert report["status"] in (0, None), (entry, "--help did not exit 0", stderr[-2000:])
  printed = set(re.findall(r"^\s*--config\.([\w.]+)=", help_text, re.M))
  fields = {spec: set(names) for spec, names in report["config_fields"].items()}
  if fields:  # --help ran with the first config file: it printed the same fields
    first = min(fields)
    assert printed == fields[first], (entry, first, printed ^ fields[first])
  return {(entry, config): {"flags": report["flags"],
                            "fields": fields[config] if config else printed}
          for config in configs}


def _problems(command: Command, help_info: dict) -> list[str]:
  flags_, fields = help_info["flags"], help_info["fields"]
  problems = []
  value_next = False  # the argument before was a flag that takes a value
  for arg in command.args:
    if value_next:
      value_next = False
      continue
    if not arg.startswith("--"):
      problems.append(f"an argument that is no flag: {arg!r}")
      continue
    name, has_value = arg[2:].split("=", 1)[0], "=" in arg
    if name.startswith("config."):
      if name[len("config."):] not in fields:
        problems.append(f"unknown config field --{name}")
      continue
    if name in flags_:
      boolean = flags_[name]
    elif name.startswith("no") and flags_.get(name[2:]):
      boolean = True  # --noNAME of a boolean flag
    else:
      problems.append(f"unknown flag --{name}")
      boolean = False  # its value, if it has one, is the next argument
    value_next = not boolean and not has_value
  return problems


@pytest.mark.slow
def test_documented_commands_use_flags_and_fields_that_exist():
  commands = documented_commands()
  configs_by_entry = collections.defaultdict(set)
  for c in commands:
    configs_by_entry[c.entry].add(c.config)
  # The docs show every entry point; fewer would mean the parsing broke.
  assert {"train.py", "sample.py", "probe.py", "demo.py", "igpt.import_openai"} <= set(
      configs_by_entry), sorted(configs_by_entry)
  helps = entry_points_help(configs_by_entry)
  problems = [f"{c.where}\n    {problem}" for c in commands
              for problem in _problems(c, helps[c.entry, c.config])]
  assert not problems, "documented commands that would not run:\n" + "\n".join(problems)


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading."""
  text = re.sub(r"`", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
  text = FENCE.sub("", open(path).read())
  return {_slug(m.group(1)) for m in re.finditer(r"^#+ +(.+?) *$", text, re.M)}


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?: +\"[^\"]*\")?\)")


@pytest.mark.parametrize("path", DOC_FILES, ids=_doc_name)
def test_relative_links_resolve(path):
  text = FENCE.sub("", open(path).read())
  text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
  problems = []
  for target in LINK.findall(text):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    if not os.path.exists(linked):
      problems.append(f"{target}: {_doc_name(linked)} does not exist")
    elif anchor and linked.endswith(".md") and anchor not in _anchors(linked):
      problems.append(f"{target}: no heading #{anchor} in {_doc_name(linked)}")
  assert not problems, f"{_doc_name(path)}:\n" + "\n".join(problems)
