"""The body of `train.py`: a run config file and a run folder in; the run trained (or resumed)
to `train.total_steps` and its final numbers logged."""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from igpt import cli, metrics, run
from igpt.train import train_and_evaluate

_FLAGS = {}


def define_flags() -> None:
  """--config (a run config file) and --workdir."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Run config file (configs/*.py).", lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None,
                                          "Checkpoints, palette, config and metrics.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  """Trains the run the flags name; a mistake is one `error:` line (see igpt.cli)."""
  del argv
  workdir = _FLAGS["workdir"].value

  def work():
    final = train_and_evaluate(_FLAGS["config"].value, workdir)
    logging.info("Done: %s", metrics.summary_line(final))

  cli.run_main(work, interrupted_hint=lambda: resume_hint(workdir), hard_exit=True)


def resume_hint(workdir: str) -> str:
  """Where rerunning the command continues from (read after the run stopped)."""
  # Folder names only: a hint printed on the way out should not open an Orbax manager.
  steps = run.checkpoint_steps(workdir)
  if not steps:
    return f"no checkpoint in {workdir} yet; rerunning the same command starts over"
  return (f"rerun the same command to resume from checkpoint {max(steps)} in "
          f"{run.path(workdir, run.CHECKPOINT_DIR)}")
