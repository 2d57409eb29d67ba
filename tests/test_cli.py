"""What every entry point shares: --help, the flag vocabulary, and which errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from igpt import cli, trained
from igpt.errors import MissingFileError, UserError

import train_helpers as th

HELP_CASES = {
    "train": ([os.path.join(th.REPO, "train.py"), "--config",
               os.path.join(th.REPO, "configs", "tiny.py"), "--help"],
              ["--workdir", "--config.train.total_steps=500", "--config.data.augment=False"]),
    "train without a config": ([os.path.join(th.REPO, "train.py"), "--help"],
                               ["--config.optim.schedule='cosine'", "--config.init_from=''"]),
    "sample": ([os.path.join(th.REPO, "sample.py"), "-h"],
               ["--workdir", "--hf", "--palette", "--out", "--config.temperature=1.0"]),
    "probe": ([os.path.join(th.REPO, "probe.py"), "--help"],
              ["--workdir", "--hf", "--palette", "--out", "--config.pooling='norm'",
               "--config.data.max_examples_per_split=0"]),
    "import_openai": (["-m", "igpt.import_openai", "--help"],
                      ["--checkpoint", "--palette", "--out", "--hf_out"]),
}


@pytest.mark.slow
def test_help_exits_0_and_lists_flags_and_config_fields():
  procs = {name: subprocess.Popen([sys.executable, *args], env=th.env(1), cwd=th.REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, (args, _) in HELP_CASES.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, (name, err[-2000:])
    for expected in HELP_CASES[name][1]:
      assert expected in out, (name, expected, out[-3000:])


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
  monkeypatch.setattr(cli, "debug_enabled", lambda: False)  # no --debug (flags unparsed here)
  def mistake():
    raise UserError("data.path='x' does not exist; give a folder.")

  with pytest.raises(SystemExit) as e:
    cli.run_main(mistake, debug_hint=False)
  assert e.value.code == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == "error: data.path='x' does not exist; give a folder.\n"

  def missing():
    raise MissingFileError("runs/x/config.json does not exist")

  with pytest.raises(SystemExit):
    cli.run_main(missing, debug_hint=False)
  assert capsys.readouterr().err.startswith("error: runs/x/config.json does not exist")

  def bug():
    raise ValueError("an internal invariant broke")

  with pytest.raises(ValueError, match="internal invariant"):  # not swallowed into one line
    cli.run_main(bug)

  def refused_write():
    raise PermissionError(13, "Permission denied", "/read-only/run/config.json")

  with pytest.raises(SystemExit):
    cli.run_main(refused_write, debug_hint=False)
  assert "error: /read-only/run/config.json: Permission denied" in capsys.readouterr().err


@pytest.mark.parametrize("source, message", [
    (trained.ModelSource(), "give exactly one of --workdir"),
    (trained.ModelSource(workdir="runs/a", hf="hf/b"), "give exactly one of --workdir"),
    (trained.ModelSource(hf="hf/b", step=3), "--step picks a checkpoint of --workdir"),
])
def test_model_sources_are_refused_the_same_way_everywhere(source, message):
  with pytest.raises(UserError, match=message):
    source.check()
