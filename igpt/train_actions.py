"""What the training loop does between steps: periodic actions, each on its own cadence.

    actions = [LogProgress(...), Evaluate(...), DrawSamples(...), SaveCheckpoint(...)]
    for step ...:
      state, step_metrics = train_step(...)
      window.add(done, step_metrics)
      run_due(actions, window, clock, report, done, total_steps, state)

An action runs every `every_steps` steps and at the last step. Step metrics stay on device
until an action is due (so dispatch runs ahead); then every queued step is checked by the
divergence guard before any action sees the state, so nothing ruined is logged as good or
saved. Time spent in actions is kept out of the measured throughput.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import jax
from absl import logging
from PIL import Image

from igpt import errors, fileio, losses, metrics, prefetch, storage


class Report:
  """The run's latest numbers (what `train_and_evaluate` returns) and its record writers."""

  def __init__(self, training_run, start_step: int):
    self.final: dict = {"step": start_step}
    self.metrics = training_run.metrics
    self.tensorboard = training_run.tensorboard(start_step)

  def write(self, step: int, values: dict, prefix: str) -> None:
    self.metrics.write(step, **values)
    self.tensorboard.scalars(step, values, prefix=prefix)
    self.tensorboard.flush()

  def close(self) -> None:
    try:
      self.tensorboard.close()
    finally:
      self.metrics.close()


class MetricsWindow:
  """Step metrics not yet fetched from the device, and the train losses since the last log."""

  def __init__(self, guard, last_good_step: int | None):
    self.guard, self.last_good_step = guard, last_good_step
    self.pending: list = []  # (step, device metrics)
    self.losses: list = []  # fetched train losses since the last log line
    self.latest: dict = {}

  def add(self, step: int, step_metrics) -> None:
    self.pending.append((step, step_metrics))

  def fetch(self) -> None:
    """Fetches the queued steps' metrics; raises if any of them diverged."""
    fetched, self.pending = jax.device_get(self.pending), []
    for step, step_metrics in fetched:
      self.guard.check(step, step_metrics, self.last_good_step)
    self.losses += [float(m["loss"]) for _, m in fetched]
    self.latest = {k: float(v) for k, v in fetched[-1][1].items()}


class Action:
  """Runs `__call__(step, state)` every `every_steps` steps (0 = never) and at the last."""

  every_steps: int = 0

  def due(self, step: int, total_steps: int) -> bool:
    return bool(self.every_steps) and (step % self.every_steps == 0 or step == total_steps)

  def __call__(self, step: int, state: dict) -> None:
    raise NotImplementedError


class Clock:
  """Steps per second since the last restart (actions' time is not counted)."""

  def __init__(self, step: int):
    self.restart(step)

  def restart(self, step: int) -> None:
    self.start_s, self.start_step = time.time(), step

  def steps_per_s(self, step: int) -> float | None:
    elapsed_s = time.time() - self.start_s
    return (step - self.start_step) / elapsed_s if step > self.start_step and elapsed_s > 0 else None


def run_due(actions, window: MetricsWindow, clock: Clock, report: Report, step: int,
            total_steps: int, state: dict) -> None:
  """Runs the actions due at `step` (after fetching and checking the queued metrics)."""
  due = [a for a in actions if a.due(step, total_steps)]
  if not due:
    return
  window.fetch()
  report.final.update(step=step, train_loss=window.losses[-1])
  for action in due:
    action(step, state)
  clock.restart(step)


class LogProgress(Action):
  """The progress line, metrics.jsonl and TensorBoard's train/ scalars."""

  def __init__(self, every_steps: int, total_steps: int, window: MetricsWindow, clock: Clock,
               report: Report, throughput: metrics.Throughput, batches=None,
               num_workers: int = 0):
    self.every_steps, self.total_steps = every_steps, total_steps
    self.window, self.clock, self.report, self.throughput = window, clock, report, throughput
    self.batches, self.num_workers = batches, num_workers  # a prefetch.Prefetcher

  def __call__(self, step, state):
    # loss: mean over the steps since the last log line; norms and lr: this step's.
    record = dict(self.window.latest)
    record["loss"] = sum(self.window.losses) / len(self.window.losses)
    record["train_bits_per_dim"] = float(losses.bits_per_dim(record["loss"]))
    steps_per_s = self.clock.steps_per_s(step)
    if steps_per_s:
      record.update(self.throughput(steps_per_s, self.total_steps - step))
    if self.batches is not None:  # how much of the window the loop waited for input
      waits = self.batches.take_wait_stats()
      record["input_wait_fraction"] = waits.fraction
      warning = prefetch.input_bound_warning(
          waits, f"raise data.num_workers (now {self.num_workers})")
      if warning:
        logging.warning("%s", warning)
    logging.info("%s", metrics.progress_line(step, self.total_steps, record))
    self.report.write(step, record, prefix="train/")
    self.report.final.update({k: v for k, v in record.items() if k != "loss"},
                             train_loss=record["loss"])  # the number the progress line shows
    self.window.losses = []


class Evaluate(Action):
  """Held-out evaluation; a classifying run also keeps its best params (`best`)."""

  def __init__(self, every_steps: int, evaluation, report: Report, best=None,
               keep_best_by: str = ""):
    self.every_steps, self.evaluation, self.report = every_steps, evaluation, report
    self.best, self.keep_best_by = best, keep_best_by

  def __call__(self, step, state):
    ev = self.evaluation(state["params"])
    logging.info("eval @ step %d: loss %.4f nats/token, %.4f bits/dim (CE / ln 2 / 3), "
                 "%d examples", step, ev["eval_loss"], ev["eval_bits_per_dim"],
                 ev["eval_examples"])
    self.report.write(step, ev, prefix="eval/")
    self.report.final.update(ev)
    if self.best is not None and self.best.update(step, ev[self.keep_best_by], state["params"]):
      logging.info("%s %.4f: the best so far, saved to %s", self.keep_best_by.replace("_", " "),
                   ev[self.keep_best_by], self.best.directory)


class DrawSamples(Action):
  """The run's fixed-seed sample picture, to samples/ and TensorBoard."""

  def __init__(self, every_steps: int, samples, training_run, report: Report):
    self.every_steps, self.samples, self.report = every_steps, samples, report
    self.training_run = training_run

  def __call__(self, step, state):
    t0 = time.time()
    picture = self.samples.picture(state["params"])
    seconds = time.time() - t0
    if self.training_run.is_writer:
      path = self.training_run.sample_path(step)
      with fileio.atomic_open(path, "wb") as f:
        Image.fromarray(picture).save(f, format="png")
      self.report.tensorboard.image(step, "samples", picture)
      self.report.tensorboard.flush()
      self.report.metrics.write(step, sample_seconds=seconds)
      logging.info("samples @ step %d: %s (%.1fs, not counted in tok/s)", step, path, seconds)


class SaveCheckpoint(Action):
  """A checkpoint of the state, with the data position, the config and the guard's references."""

  def __init__(self, every_steps: int, training_run, seed: int, guard, window: MetricsWindow):
    self.every_steps, self.training_run, self.seed = every_steps, training_run, seed
    self.guard, self.window = guard, window

  def __call__(self, step, state):
    extra = {"data": {"next_step": step, "seed": self.seed},
             "config": self.training_run.config_json,
             "guard": self.guard.reference}
    self.training_run.save(step, state, extra)
    self.window.last_good_step = step


def stop_for_preemption(save: SaveCheckpoint, window: MetricsWindow, training_run,
                        step: int, state: dict) -> None:
  """Saves `step` (once the guard has seen every step before it), waits until the save is
  committed, and raises errors.Preempted."""
  if window.pending:
    window.fetch()
  save(step, state)  # skipped by the checkpointer if this step was just saved
  training_run.ckpt.wait()
  raise errors.Preempted(step, training_run.ckpt.directory)


class Profiler:
  """A jax.profiler trace of steps [start, start + num) into `directory` (num 0: none); a
  bucket's trace is written locally, then uploaded."""

  def __init__(self, start_step: int, num_steps: int, directory: str):
    self.steps = range(start_step, start_step + num_steps)
    self.directory, self.active, self.first = directory, False, None

  def before(self, step: int) -> None:
    if step in self.steps and not self.active:
      self.local = (tempfile.mkdtemp(prefix="igpt-profile-") if storage.is_remote(self.directory)
                    else self.directory)
      jax.profiler.start_trace(self.local, create_perfetto_trace=True)
      self.active, self.first = True, step

  def after(self, step: int, state) -> None:
    if self.active and step == self.steps[-1]:
      jax.block_until_ready(state)  # the trace must hold the whole last step
      jax.profiler.stop_trace()
      self.active = False
      if self.local != self.directory:
        storage.upload_tree(self.local, self.directory)
        shutil.rmtree(self.local, ignore_errors=True)
      logging.info("Profiled steps %d-%d into %s.", self.first, step, self.directory)
