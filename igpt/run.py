"""A run is a folder; this module is the only one that knows its layout.

    <workdir>/config.json         the resolved run config (written at the start of a run)
    <workdir>/model.json          the model's shape (igpt.model.ModelConfig) and the identity
                                  of its palette; every checkpoint's `extra` holds the same
    <workdir>/palette.npy         the colour palette the run's tokens use ([k, 3] in [-1, 1])
    <workdir>/metrics.jsonl       one JSON record per log step and per evaluation
    <workdir>/tensorboard/        the same scalars (and training samples) for TensorBoard
    <workdir>/profile/            jax.profiler traces, when train.profile_num_steps > 0
    <workdir>/samples/            sample pictures (training's every train.sample_every_steps,
                                  and sample.py's)
    <workdir>/checkpoints/<step>/ orbax: `params`, `train_state` (optimiser; absent in an
                                  imported run) and `extra` (data position, config)
    <workdir>/best/               a fine-tuned run's params of its best validation accuracy
    <workdir>/probe/              probe.py's results and its feature cache
    <workdir>/.lock               who holds the folder while a run trains in it

`open_for_training(spec, workdir, open_data)` opens a folder for the trainer (lock, identity,
config, palette, checkpoints, write-error translation). Reading a trained model, and writing
a params-only run (an imported model): `igpt.trained.load_run`, `igpt.trained.save_run`; both
find their checkpoint with `Checkpointer.newest_that_reads`, as the trainer does.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from igpt import (compile_cache, distributed, fileio, metrics, palette, pipeline, readers,
                  storage, summaries)
from igpt import workdir as workdirs
from igpt.checkpoint import Checkpointer
from igpt.errors import MissingFileError, UserError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
PALETTE_FILE = "palette.npy"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
SAMPLES_DIR = "samples"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"  # inside BEST_DIR: the kept step and its accuracy
PROBE_DIR = "probe"
LOCK_FILE = ".lock"


def path(workdir: str, name: str) -> str:
  """`workdir/name` for one of the layout's names above."""
  return storage.join(workdir, name)


def write_json(workdir: str, name: str, record: dict) -> None:
  """Writes workdir/name (config.json, model.json) whole (not at all if it already says the
  same: a rerun of a finished run, possibly from a read-only folder, writes nothing)."""
  record_path = path(workdir, name)
  try:
    if json.loads(storage.read_text(record_path)) == record:
      return
  except (OSError, ValueError, UserError):
    pass
  with fileio.atomic_open(record_path) as f:
    json.dump(record, f, indent=2, sort_keys=True)


def model_record(model_cfg, centers: np.ndarray) -> dict:
  """What model.json and every checkpoint's `extra` say of the weights: the model's shape and
  the palette its tokens index."""
  return {"model": model_cfg.to_dict(), "palette": palette.identity(centers)}


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run config stored in workdir/config.json."""
  config_path = path(workdir, CONFIG_FILE)
  if not storage.isfile(config_path):
    raise MissingFileError(f"{config_path} does not exist: {workdir!r} is not a run folder "
                           "(train.py or igpt.import_openai makes one).")
  try:
    return ml_collections.ConfigDict(json.loads(storage.read_text(config_path)))
  except json.JSONDecodeError as e:
    raise UserError(f"{config_path} is not valid JSON ({e}).") from e


def checkpointer(workdir: str, keep: int = 1, readable: bool = False) -> Checkpointer:
  """The run's checkpoint manager (keeps the newest `keep` steps when saving). `readable`:
  for a reader, which needs a run folder with checkpoints (and creates nothing)."""
  if readable and not storage.isdir(path(workdir, CHECKPOINT_DIR)):
    what = "train the run first" if storage.isfile(path(workdir, CONFIG_FILE)) else (
        f"{workdir!r} is not a run folder (train.py or igpt.import_openai makes one)")
    raise MissingFileError(f"no checkpoint in {path(workdir, CHECKPOINT_DIR)}: {what}.")
  return Checkpointer(path(workdir, CHECKPOINT_DIR), keep=keep)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the run's checkpoint folders, by name only (no Orbax manager opened)."""
  ckpt_dir = path(workdir, CHECKPOINT_DIR)
  if not storage.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in storage.listdir(ckpt_dir) if n.isdigit())


def check_stored_config(workdir: str, config_json: dict, total_steps: int) -> None:
  """Stops a run whose config would change the model or data of the run already in `workdir`,
  or that asks for fewer steps than the run has made.

  The newest checkpoint whose `extra` reads holds the truth (config.json is only its copy,
  and may have been edited by hand); a folder without checkpoints is checked against its
  config.json, which its palette was made for. Safe changes (total_steps, cadences, ...) are
  logged. Reads only; raises workdir.WorkdirError listing the fields that differ.
  """
  stored, source = None, None
  if storage.isdir(path(workdir, CHECKPOINT_DIR)):
    with checkpointer(workdir) as ckpt:
      # A damaged one is moved aside later, by the restore.
      step, _, extra = ckpt.newest_that_reads(required_extra=("config",))
    if step is not None:
      stored, source = extra["config"], f"checkpoint {step}"
      if step > total_steps:
        raise workdirs.WorkdirError(
            f"the run in {workdir} is at step {step}, past train.total_steps="
            f"{total_steps}: there is nothing to train. Use a new --workdir for a "
            f"{total_steps}-step run, or train.total_steps >= {step} to go on.")
  config_path = path(workdir, CONFIG_FILE)
  if storage.isfile(config_path):
    try:
      on_file = json.loads(storage.read_text(config_path))
    except json.JSONDecodeError as e:
      raise UserError(f"{config_path} is not valid JSON ({e}); restore it from a checkpoint's "
                      "config or start a new --workdir.") from e
    if stored is None:
      stored, source = on_file, CONFIG_FILE
    elif on_file != stored:
      logging.info("%s differs from the config stored in %s (edited by hand?); the "
                   "checkpoint's config is the one checked, and config.json is rewritten.",
                   config_path, source)
  if stored is None:
    return
  safe = workdirs.check_identity(stored, config_json, workdir, source)
  if safe:
    logging.info("Resuming %s with changed settings: %s.", workdir, "; ".join(safe))


def choose_palette(spec, train_source, workdir: str) -> tuple[np.ndarray, bool]:
  """(the run's palette, whether it is new to the folder) without writing anything.

  workdir/palette.npy if present (a resumed run; `data.palette_path`, if set, must hold the
  same colours), else `data.palette_path`, else fitted on `data.palette_fit_pixels` training
  pixels (deterministic in `config.seed`): `palette.load_or_fit` either way.
  """
  stored, data, seed = path(workdir, PALETTE_FILE), spec.data, spec.config.seed
  vocab_size = spec.model.vocab_size
  if storage.exists(stored):
    centers = palette.load_or_fit(vocab_size, stored)
    if data.palette_path and not np.array_equal(palette.load_palette(data.palette_path),
                                                centers):
      raise workdirs.WorkdirError(
          f"{stored} (the run's palette) differs from data.palette_path={data.palette_path!r}; "
          "resume with the same palette or use a fresh workdir.")
    logging.info("Palette: reusing %s (%d colours).", stored, len(centers))
    return centers, False
  t0 = time.time()
  centers = palette.load_or_fit(
      vocab_size, data.palette_path, k=data.palette_size, seed=seed, what="data.palette_path",
      pixels=lambda: pipeline.sample_pixels(train_source, data.palette_fit_pixels, seed))
  logging.info("Palette: %s %d colours%s.", "read" if data.palette_path else "fitted",
               len(centers), f" from {data.palette_path}" if data.palette_path else
               f" on {data.palette_fit_pixels} pixels in {time.time() - t0:.1f}s")
  if len(centers) < vocab_size:
    # The rule for every entry point: tokens past the palette never occur in the data and
    # are never drawn (sampling keeps to the palette's colours).
    logging.warning("The palette has %d colours for the model's %d tokens: tokens %d-%d never "
                    "occur, and sampling draws only the palette's colours (set "
                    "data.palette_size=%d to drop them).", len(centers), vocab_size,
                    len(centers), vocab_size - 1, len(centers))
  return centers, True


def store_palette(workdir: str, centers: np.ndarray) -> None:
  """Saves the run's palette as workdir/palette.npy (whole), so a resumed run, sampling and
  probing encode the same way."""
  storage.makedirs(workdir)
  palette.save_palette(path(workdir, PALETTE_FILE), centers)
  logging.info("Palette: saved to %s.", path(workdir, PALETTE_FILE))


def open_data(spec) -> tuple:
  """The run's (train, val) sources, their first batches read once (an unreadable image there
  stops a new run before its folder exists); a classifier head must have a class for every
  label."""
  sources = tuple(readers.make_source(spec.data, split, spec.model.image_side)
                  for split in ("train", "val"))
  train_source, val_source = sources
  batch_size = spec.train.batch_size
  for source, indices in (
      (train_source, pipeline.batch_indices_at(len(train_source), 0, batch_size,
                                               spec.config.seed)),
      (val_source, np.arange(min(batch_size, len(val_source))))):
    (source.get_tokens if hasattr(source, "get_tokens") else source.get)(indices)
  if spec.objective.has_head:
    for source in sources:
      if source.num_classes is None:
        raise UserError(f"objective={spec.objective.name!r} needs labelled data, but "
                        f"{source.description} has no labels.")
      if source.num_classes > spec.objective.num_classes:
        raise UserError(
            f"finetune.num_classes={spec.objective.num_classes} but {source.description} "
            f"has {source.num_classes} classes (labels 0-{source.num_classes - 1}); set "
            f"--config.finetune.num_classes={source.num_classes}.")
  return sources


class TrainingRun:
  """A run folder opened for training (by `open_for_training`): locked, its config checked
  and written, its palette ready, its checkpoints open. Every write the trainer makes goes
  through here or to one of its paths."""

  def __init__(self, workdir: str, spec, data, centers: np.ndarray, ckpt: Checkpointer,
               read_only: Exception | None):
    self.workdir, self.spec, self.data, self.palette = workdir, spec, data, centers
    self.ckpt, self._read_only = ckpt, read_only
    self.is_writer = jax.process_index() == 0
    self.config_json = spec.to_json()
    self.model_record = model_record(spec.model, centers)
    self.metrics = metrics.MetricsWriter(path(workdir, METRICS_FILE), enabled=self.is_writer)
    self.profile_dir = path(workdir, PROFILE_DIR)
    self._tensorboard = None

  def restore(self, abstract_state) -> tuple[int, dict | None, dict]:
    """(start step, state, extra) of the newest checkpoint that reads whole, or (0, None, {}).

    Damaged checkpoints are moved aside; one made with another model or data stops the run.
    """
    saved, state, extra = self.ckpt.newest_that_reads(
        abstract_state, damaged="move", check_extra=self._check_identity,
        required_extra=("data", "config"))
    if saved is None:
      damaged = self.ckpt.damaged_steps()
      if damaged:  # starting over silently would throw the run away
        raise workdirs.WorkdirError(
            f"no checkpoint in {self.ckpt.directory} reads: the damaged ones are set aside as "
            f"{', '.join(damaged)}. To start this run over on purpose, delete or move them "
            "(or the whole checkpoints folder); or train in a new --workdir.")
      return 0, None, {}
    start_step = int(extra["data"]["next_step"])
    if start_step != int(jax.device_get(state["step"])):
      raise UserError(f"checkpoint {saved} is inconsistent: state step "
                      f"{int(jax.device_get(state['step']))}, data position {start_step}.")
    logging.info("Resumed from checkpoint step %d in %s.", saved, self.ckpt.directory)
    return start_step, state, extra

  def _check_identity(self, step: int, extra: dict) -> None:
    workdirs.check_identity(extra["config"], self.config_json, self.workdir,
                            f"checkpoint {step}")

  def begin(self, start_step: int) -> None:
    """Called before the first write: only a finished run can be evaluated from a read-only
    folder; records past `start_step` (logged after the checkpoint resumed) are dropped."""
    if self._read_only is not None and start_step < self.spec.train.total_steps:
      raise self._read_only
    self.metrics.truncate_after(start_step)

  def tensorboard(self, start_step: int) -> summaries.SummaryWriter:
    """The TensorBoard writer, dropping what a killed run wrote past `start_step`."""
    self._tensorboard = summaries.SummaryWriter(path(self.workdir, TENSORBOARD_DIR),
                                                enabled=self.is_writer, purge_step=start_step + 1)
    return self._tensorboard

  def sample_path(self, step: int) -> str:
    return storage.join(path(self.workdir, SAMPLES_DIR), f"step_{step:07d}.png")

  def save(self, step: int, state, extra: dict) -> None:
    """Starts saving checkpoint `step` (it finishes in the background) with the model's shape
    and palette beside the weights, and every record logged so far (an object store gets them
    now, not at the next periodic upload)."""
    self.check_saves()
    self.metrics.flush(force=True)
    if self._tensorboard is not None:
      self._tensorboard.sync(force=True)
    try:
      self.ckpt.save(step, state, {**extra, **self.model_record})
    except Exception as e:
      self._on_save_error(e)
      raise

  def check_saves(self) -> None:
    """Raises at once if a background save failed (a full disk stops the run at that save,
    naming the folder, with its partial files removed)."""
    try:
      self.ckpt.check_for_errors()
    except Exception as e:
      self._on_save_error(e)
      raise

  def _on_save_error(self, e: Exception) -> None:
    if workdirs.is_write_failure(e):
      workdirs.discard_partial_saves(self.ckpt.directory)
      raise workdirs.write_error(e, self.ckpt.directory) from e

  def best(self) -> "BestParams":
    return BestParams(path(self.workdir, BEST_DIR))


@contextlib.contextmanager
def open_for_training(spec, workdir: str):
  """Opens `workdir` for training the checked `spec`; yields a `TrainingRun`.

  JAX's compilation cache is on first (`train.compile_cache_dir`). The run's data
  (`open_data`) and palette are read before anything is written: for a new run before the
  folder is created, so a missing dataset leaves nothing behind. The folder is locked for the
  block (a second run on it fails at once; a read-only copy of a finished run can still be
  evaluated). A run already in the folder must have the same model and data (checked before
  anything is written). A refused write anywhere in the block (disk full, read-only,
  permission) raises workdir.WorkdirError naming the path.
  """
  compile_cache.enable(spec.train.compile_cache_dir)  # before anything compiles
  is_writer = jax.process_index() == 0
  chosen = None
  if not storage.exists(workdir):
    # A new run: its data and palette are read before the folder exists, so a missing or
    # unreadable dataset (or palette) leaves nothing behind.
    data = open_data(spec)
    chosen = choose_palette(spec, data[0], workdir) if is_writer else None
  lock = (workdirs.lock(workdir, LOCK_FILE, required=False) if is_writer
          else contextlib.nullcontext(None))
  with lock as read_only:
    try:
      config_json = spec.to_json()
      check_stored_config(workdir, config_json, spec.train.total_steps)
      if chosen is None:
        data = open_data(spec)  # readable before any write
        chosen = choose_palette(spec, data[0], workdir) if is_writer else None
      if is_writer:
        centers, is_new = chosen
        write_json(workdir, CONFIG_FILE, config_json)
        write_json(workdir, MODEL_FILE, model_record(spec.model, centers))
        if is_new:
          store_palette(workdir, centers)
      # Batches are a pure function of (seed, step) and this palette: resuming is exact.
      centers = distributed.broadcast_rows_from_process_0(chosen[0] if chosen else None, 3)
      # Closing waits for in-flight async saves, so the last good checkpoint is complete even
      # when training stops on a NaN (a SIGKILL loses only the save in flight).
      with checkpointer(workdir, keep=spec.train.keep_checkpoints) as ckpt:
        yield TrainingRun(workdir, spec, data, centers, ckpt, read_only)
    except workdirs.WorkdirError:
      workdirs.discard_partial_saves(path(workdir, CHECKPOINT_DIR))
      raise
    except Exception as e:
      if workdirs.is_write_failure(e, workdir):
        workdirs.discard_partial_saves(path(workdir, CHECKPOINT_DIR))
        raise workdirs.write_error(e, workdir) from e
      raise


class BestParams:
  """The params of a run's best validation accuracy, kept in `<workdir>/best`."""

  def __init__(self, directory: str):
    self.directory = directory
    record = {}  # survives a resume
    record_path = storage.join(directory, BEST_FILE)
    if storage.isfile(record_path):
      record = json.loads(storage.read_text(record_path))
    self.best, self.step = record.get("eval_accuracy", -1.0), record.get("step")

  def _checkpointer(self) -> Checkpointer:
    return Checkpointer(storage.join(self.directory, CHECKPOINT_DIR), keep=1)

  def update(self, step: int, accuracy: float, params) -> bool:
    """Saves `params` if `accuracy` beats the best so far; returns whether it did."""
    if accuracy <= self.best:
      return False
    self.best, self.step = accuracy, step
    with self._checkpointer() as ckpt:
      ckpt.save(step, {"params": params}, {"eval_accuracy": accuracy}, force=True)
    if jax.process_index() == 0:
      with fileio.atomic_open(storage.join(self.directory, BEST_FILE)) as f:
        json.dump({"step": step, "eval_accuracy": accuracy}, f)
    return True

  def restore(self, abstract_params):
    """The best params saved so far, laid out as `abstract_params`."""
    with self._checkpointer() as ckpt:
      state, _ = ckpt.restore(ckpt.latest_step(), {"params": abstract_params})
    return state["params"]
