"""Pretrains iGPT: parses flags and a config file, then trains (`igpt.commands.train`).

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/igpt_s.py --workdir runs/igpt_s --config.optim.lr=1e-3

Rerunning the same command resumes from the newest checkpoint in --workdir (with the same
model and data settings; total_steps and the log/eval/checkpoint cadence may change). Mistakes
end in one `error: ...` line and exit status 2; --debug (or IGPT_DEBUG=1) shows the traceback.
SIGTERM saves the step the run is on and exits with status 75 (rerun to resume).
Multi-host: run the same command on every host (TPU pods, SLURM, Open MPI are detected), or set
--config.distributed=True with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
"""

from igpt import cli
from igpt.commands import train

if __name__ == "__main__":
  cli.start(train)
