"""A run is a folder; this module is the only one that knows its layout.

    <workdir>/config.json         the resolved run config (written at the start of a run)
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
a params-only run (an imported model): `igpt.trained.load_run`, `igpt.trained.save_run`.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from igpt import distributed, fileio, metrics, palette, pipeline, storage, summaries
from igpt import workdir as workdirs
from igpt.checkpoint import Checkpointer
from igpt.errors import MissingFileError, UserError

CONFIG_FILE = "config.json"
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


def config_to_json(config) -> dict:
  """The config as a JSON-ready dict (what config.json and every checkpoint store)."""
  return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config_json: dict) -> None:
  """Writes workdir/config.json atomically (not at all if it already says the same)."""
  config_path = path(workdir, CONFIG_FILE)
  try:
    if json.loads(storage.read_text(config_path)) == config_json:
      return  # a rerun of a finished run, possibly from a read-only folder, writes nothing
  except (OSError, ValueError, UserError):
    pass
  with fileio.atomic_open(config_path) as f:
    json.dump(config_json, f, indent=2, sort_keys=True)


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


def read_palette(workdir: str) -> np.ndarray:
  """The run's palette (float32 [k, 3])."""
  palette_path = path(workdir, PALETTE_FILE)
  if not storage.isfile(palette_path):
    raise MissingFileError(f"{palette_path} does not exist: the run in {workdir!r} has no "
                           "palette (was it started and killed before its first checkpoint?).")
  return np.asarray(palette.load_palette(palette_path), np.float32)


def checkpointer(workdir: str, keep: int = 1) -> Checkpointer:
  """The run's checkpoint manager (keeps the newest `keep` steps when saving)."""
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
      for step in reversed(ckpt.all_steps()):
        try:
          extra = ckpt.read_extra(step)
          stored, source = extra["config"], f"checkpoint {step}"
        except Exception:  # noqa: BLE001  (damaged: the restore sets it aside later)
          continue
        if step > total_steps:
          raise workdirs.WorkdirError(
              f"the run in {workdir} is at step {step}, past train.total_steps="
              f"{total_steps}: there is nothing to train. Use a new --workdir for a "
              f"{total_steps}-step run, or train.total_steps >= {step} to go on.")
        break
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


def choose_palette(spec, train_source, workdir: str) -> tuple[np.ndarray, str]:
  """(the run's palette, what it is) without writing anything.

  workdir/palette.npy if present (a resumed run), else `data.palette_path` as is, else fitted
  on `data.palette_fit_pixels` training pixels (deterministic in `config.seed`). "what":
  "stored", "given" or "fitted".
  """
  palette_path = path(workdir, PALETTE_FILE)
  data = spec.data
  given, vocab_size = data.palette_path, spec.model.vocab_size
  if storage.exists(palette_path):
    centers = palette.load_palette(palette_path)
    if given and not np.array_equal(palette.load_palette(given), centers):
      raise workdirs.WorkdirError(
          f"{palette_path} (the run's palette) differs from data.palette_path={given!r}; "
          "resume with the same palette or use a fresh workdir.")
    logging.info("Palette: reusing %s (%d colours).", palette_path, len(centers))
    how = "stored"
  elif given:
    centers, how = palette.load_palette(given), "given"
  else:
    t0 = time.time()
    centers = pipeline.fit_palette(train_source, data.palette_size, data.palette_fit_pixels,
                                   spec.config.seed)
    logging.info("Palette: fitted %d colours on %d pixels in %.1fs.", len(centers),
                 data.palette_fit_pixels, time.time() - t0)
    how = "fitted"
  palette.check_fits(centers, vocab_size, f"the palette {given or palette_path}")
  if len(centers) < vocab_size:
    # The rule for every entry point: tokens past the palette never occur in the data and
    # are never drawn (sampling keeps to the palette's colours).
    logging.warning("The palette has %d colours for the model's %d tokens: tokens %d-%d never "
                    "occur, and sampling draws only the palette's colours (set "
                    "data.palette_size=%d to drop them).", len(centers), vocab_size,
                    len(centers), vocab_size - 1, len(centers))
  return np.asarray(centers, np.float32), how


def prepare_palette(spec, train_source, workdir: str) -> np.ndarray:
  """The run's palette (`choose_palette`), stored as workdir/palette.npy so a resumed run
  encodes the same way."""
  centers, how = choose_palette(spec, train_source, workdir)
  _store_palette(workdir, centers, how)
  return centers


def _store_palette(workdir: str, centers: np.ndarray, how: str) -> None:
  if how == "stored":
    return
  storage.makedirs(workdir)
  palette.save_palette(path(workdir, PALETTE_FILE), centers)  # atomic: never half a file
  logging.info("Palette: %s %d colours, saved to %s.", how, len(centers),
               path(workdir, PALETTE_FILE))


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
    self.metrics = metrics.MetricsWriter(path(workdir, METRICS_FILE), enabled=self.is_writer)
    self.profile_dir = path(workdir, PROFILE_DIR)
    self._tensorboard = None

  def restore(self, abstract_state) -> tuple[int, dict | None, dict]:
    """(start step, state, extra) of the newest checkpoint that reads whole, or (0, None, {}).

    Damaged checkpoints are moved aside; one made with another model or data stops the run.
    """
    def check_extra(step: int, extra: dict) -> None:
      workdirs.check_identity(extra["config"], self.config_json, self.workdir,
                              f"checkpoint {step}")

    saved, state, extra = workdirs.restore_newest(self.ckpt, abstract_state, check_extra,
                                                  logging.info)
    if saved is None:
      folder = self.ckpt.directory
      damaged = sorted(n for n in (storage.listdir(folder) if storage.isdir(folder) else [])
                       if ".damaged" in n)
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
    """Starts saving checkpoint `step` (it finishes in the background), with every record
    logged so far (an object store gets them now, not at the next periodic upload)."""
    self.check_saves()
    self.metrics.flush(force=True)
    if self._tensorboard is not None:
      self._tensorboard.sync(force=True)
    try:
      self.ckpt.save(step, state, extra)
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
def open_for_training(spec, workdir: str, open_data):
  """Opens `workdir` for training the checked `spec`; yields a `TrainingRun`.

  `open_data()` -> the run's (train, val) sources: for a new run it is called before the
  folder is created, so a missing dataset leaves nothing behind. The folder is locked for the
  block (a second run on it fails at once; a read-only copy of a finished run can still be
  evaluated). A run already in the folder must have the same model and data (checked before
  anything is written). A refused write anywhere in the block (disk full, read-only,
  permission) raises workdir.WorkdirError naming the path.
  """
  is_writer = jax.process_index() == 0
  chosen = None
  if not storage.exists(workdir):
    # A new run: its data and palette are read before the folder exists, so a missing or
    # unreadable dataset (or palette) leaves nothing behind.
    data = open_data()
    chosen = choose_palette(spec, data[0], workdir) if is_writer else None
  lock = (workdirs.lock(workdir, LOCK_FILE, required=False) if is_writer
          else contextlib.nullcontext(None))
  with lock as read_only:
    try:
      config_json = spec.to_json()
      check_stored_config(workdir, config_json, spec.train.total_steps)
      if chosen is None:
        data = open_data()  # readable before any write
        chosen = choose_palette(spec, data[0], workdir) if is_writer else None
      if is_writer:
        write_config(workdir, config_json)
        _store_palette(workdir, *chosen)
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
