"""Two processes on localhost (jax.distributed, gloo CPU collectives) train like one process."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import train_helpers as th

OVERRIDES = {"train.total_steps": 6, "train.checkpoint_every_steps": 3,
             "train.log_every_steps": 3, "train.eval_every_steps": 6}


def _start_two(workdir, log_dir, name, overrides):
  """`train.py` as processes 0 and 1 of a localhost jax.distributed job, one CPU device each:
  (the two processes, their stderr logs)."""
  port = th.free_port()
  logs = [open(os.path.join(log_dir, f"{name}_{i}.log"), "w+") for i in range(2)]
  workers = [
      subprocess.Popen(th.cli_args(workdir, distributed=True, **overrides), cwd=th.REPO,
                       env=th.env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                  JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i),
                       stdout=subprocess.DEVNULL, stderr=logs[i])
      for i in range(2)]
  return workers, logs


def _run_two_processes(workdir, log_dir, overrides=None):
  """Both processes to the end; fails on the first traceback or non-zero exit."""
  workers, logs = _start_two(workdir, log_dir, "process", overrides or OVERRIDES)
  try:
    deadline = time.time() + 240
    # A process that raises leaves its peer (and its own shutdown) waiting on the other:
    # stop at the first traceback instead of waiting for JAX's heartbeat timeout.
    while any(w.poll() is None for w in workers) and time.time() < deadline:
      if any(w.returncode not in (None, 0) for w in workers) or any(
          "Traceback (most recent call last)" in open(log.name).read() for log in logs):
        break
      time.sleep(0.5)
    failures = []
    for i, w in enumerate(workers):
      logs[i].seek(0)
      text = logs[i].read()
      if w.returncode != 0 or "Traceback" in text:
        failures.append(f"process {i} (exit {w.returncode}):\n{text[-4000:]}")
    assert not failures, "\n\n".join(failures)
  finally:
    for w, log in zip(workers, logs):
      if w.poll() is None:
        w.kill()
      log.close()


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  with open(tmp_path / "single.log", "w+") as log:
    single_run = subprocess.Popen(th.cli_args(single, **OVERRIDES), env=th.env(2), cwd=th.REPO,
                                  stdout=subprocess.DEVNULL, stderr=log)
    _run_two_processes(multi, str(tmp_path))
    single_run.wait(timeout=300)  # same mesh, one process with 2 devices
    log.seek(0)
    assert single_run.returncode == 0, log.read()[-5000:]

  config = th.tiny_config(**{k.replace(".", "__"): v for k, v in OVERRIDES.items()})
  step_m, state_m, extra_m = th.restore_latest(config, multi)
  step_s, state_s, extra_s = th.restore_latest(config, single)
  assert step_m == step_s == 6 and extra_m["data"] == extra_s["data"]
  for a, b in zip(jax.tree.leaves(jax.device_get(state_m)), jax.tree.leaves(jax.device_get(state_s))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  evals_m = [r for r in th.read_metrics(multi) if "eval_loss" in r]
  evals_s = [r for r in th.read_metrics(single) if "eval_loss" in r]
  assert abs(evals_m[-1]["eval_loss"] - evals_s[-1]["eval_loss"]) < 1e-5

  # Both processes restore the finished run from its checkpoint and evaluate it again.
  _run_two_processes(multi, str(tmp_path))
  evals_again = [r for r in th.read_metrics(multi) if "eval_loss" in r]
  assert evals_again == evals_m  # nothing retrained, nothing rewritten


PREEMPT_OVERRIDES = {"train.total_steps": 120, "train.checkpoint_every_steps": 1000,
                     "train.log_every_steps": 2, "train.eval_every_steps": 1000}


def _finish(workers, logs, timeout=240):
  texts = []
  try:
    for w in workers:
      w.wait(timeout=timeout)
  finally:
    for w, log in zip(workers, logs):
      if w.poll() is None:
        w.kill()
      log.seek(0)
      texts.append(log.read())
      log.close()
  return [w.returncode for w in workers], texts


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The two-process run of PREEMPT_OVERRIDES, never stopped: what a resumed one must equal."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run_two_processes(str(workdir / "run"), str(workdir), PREEMPT_OVERRIDES)
  return str(workdir / "run")


@pytest.mark.slow
@pytest.mark.parametrize("targets", [(1,), (0, 1)], ids=["one process", "both processes"])
def test_sigterm_stops_every_process_at_one_saved_step(tmp_path, targets, uninterrupted):
  workdir = str(tmp_path / "run")
  workers, logs = _start_two(workdir, str(tmp_path), "preempted", PREEMPT_OVERRIDES)
  deadline = time.time() + 240
  while "step 4/" not in open(logs[0].name).read() and time.time() < deadline:
    if any(w.poll() is not None for w in workers):
      break
    time.sleep(0.05)
  for i in targets:
    workers[i].send_signal(signal.SIGTERM)
  codes, texts = _finish(workers, logs)
  assert codes == [75, 75], [t[-3000:] for t in texts]
  lasts = [t.strip().splitlines()[-1] for t in texts]
  assert lasts[0] == lasts[1] and lasts[0].startswith("preempted at step "), lasts
  saved = int(lasts[0].split()[3])
  assert 4 <= saved < PREEMPT_OVERRIDES["train.total_steps"], lasts
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved)]
  config = th.tiny_config(**{k.replace(".", "__"): v for k, v in PREEMPT_OVERRIDES.items()})
  step, _, extra = th.restore_latest(config, workdir)
  assert step == saved and extra["data"]["next_step"] == saved

  if targets == (1,):  # the same command resumes it, to the end
    workers, logs = _start_two(workdir, str(tmp_path), "resumed", PREEMPT_OVERRIDES)
    codes, texts = _finish(workers, logs)
    assert codes == [0, 0], [t[-3000:] for t in texts]
    assert f"Resumed from checkpoint step {saved}" in texts[0]
    steps = [r["step"] for r in th.read_metrics(workdir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == PREEMPT_OVERRIDES["train.total_steps"]
    # The same params, optimiser state and losses as the run that was never stopped.
    _, resumed, _ = th.restore_latest(config, workdir)
    _, straight, _ = th.restore_latest(config, uninterrupted)
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed)),
                    jax.tree.leaves(jax.device_get(straight))):
      np.testing.assert_array_equal(a, b)
    losses = [(r["step"], r["loss"]) for r in th.read_metrics(workdir) if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in th.read_metrics(uninterrupted)
                      if "loss" in r]
