"""Pretrains iGPT: parses flags and a config file, then calls `igpt.train.train_and_evaluate`.

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/igpt_s.py --workdir runs/igpt_s --config.optim.lr=1e-3

Rerunning the same command resumes from the newest checkpoint in --workdir (with the same
model and data settings; total_steps and the log/eval/checkpoint cadence may change). Mistakes
end in one `error: ...` line and exit status 2; --debug (or IGPT_DEBUG=1) shows the traceback.
SIGTERM saves the step the run is on and exits with status 75 (rerun to resume).
Multi-host: run the same command on every host (TPU pods, SLURM, Open MPI are detected), or set
--config.distributed=True with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from igpt import cli, metrics, run
from igpt.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, palette, config and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  def train():
    final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("Done: %s", metrics.summary_line(final))

  cli.run_main(train, interrupted_hint=lambda: resume_hint(_WORKDIR.value), hard_exit=True)


def resume_hint(workdir: str) -> str:
  """Where rerunning the command continues from (read after the run stopped)."""
  # Folder names only: a hint printed on the way out should not open an Orbax manager.
  steps = run.checkpoint_steps(workdir)
  if not steps:
    return f"no checkpoint in {workdir} yet; rerunning the same command starts over"
  return (f"rerun the same command to resume from checkpoint {max(steps)} in "
          f"{run.path(workdir, run.CHECKPOINT_DIR)}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
