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

`load_run(workdir)` gives what every entry point needs to use a trained model (config,
palette, params) without the trainer or its optimiser; `save_run` writes a params-only run
(an imported model) that `load_run` reads like any trained one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from igpt import fileio, objectives, palette, sharding, workdir as workdirs
from igpt.checkpoint import Checkpointer, TreeMismatchError
from igpt.model import ModelConfig

CONFIG_FILE = "config.json"
PALETTE_FILE = "palette.npy"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
SAMPLES_DIR = "samples"
CHECKPOINT_DIR = "checkpoints"


def path(workdir: str, name: str) -> str:
  """`workdir/name` for one of the layout's names above."""
  return os.path.join(workdir, name)


def model_config(config) -> ModelConfig:
  """The model of a run config: its `model` section, causal or not by its objective, with one
  output class per palette colour unless `model.vocab_size` is set."""
  return ModelConfig.from_config(
      config.model, causal=objectives.get(config.objective).causal,
      vocab_size=config.model.get("vocab_size", 0) or config.data.palette_size)


def config_to_json(config) -> dict:
  """The config as a JSON-ready dict (what config.json and every checkpoint store)."""
  return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config_json: dict) -> None:
  """Writes workdir/config.json atomically (not at all if it already says the same)."""
  config_path = path(workdir, CONFIG_FILE)
  try:
    with open(config_path) as f:
      if json.load(f) == config_json:
        return  # a rerun of a finished run, possibly from a read-only folder, writes nothing
  except (OSError, ValueError):
    pass
  with fileio.atomic_open(config_path) as f:
    json.dump(config_json, f, indent=2, sort_keys=True)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run config stored in workdir/config.json."""
  config_path = path(workdir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: {workdir!r} is not a run folder "
                            "(train.py or igpt.import_openai makes one).")
  try:
    with open(config_path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON ({e}).") from e


def check_stored_config(workdir: str, config_json: dict, log) -> None:
  """Stops a run whose config would change the model or data of the run already in `workdir`.

  The newest checkpoint whose `extra` reads holds the truth (config.json is only its copy,
  and may have been edited by hand); a folder without checkpoints is checked against its
  config.json, which its palette was made for. Safe changes (total_steps, cadences, ...) are
  logged. Reads only; raises workdir.WorkdirError listing the fields that differ.
  """
  stored, source = None, None
  if os.path.isdir(path(workdir, CHECKPOINT_DIR)):
    with checkpointer(workdir) as ckpt:
      for step in reversed(ckpt.all_steps()):
        try:
          stored, source = ckpt.read_extra(step)["config"], f"checkpoint {step}"
          break
        except Exception:  # noqa: BLE001  (damaged: the restore sets it aside later)
          continue
  config_path = path(workdir, CONFIG_FILE)
  if os.path.isfile(config_path):
    try:
      with open(config_path) as f:
        on_file = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path} is not valid JSON ({e}); restore it from a checkpoint's "
                       "config or start a new --workdir.") from e
    if stored is None:
      stored, source = on_file, CONFIG_FILE
    elif on_file != stored:
      log("%s differs from the config stored in %s (edited by hand?); the checkpoint's "
          "config is the one checked, and config.json is rewritten.", config_path, source)
  if stored is None:
    return
  safe = workdirs.check_identity(stored, config_json, workdir, source)
  if safe:
    log("Resuming %s with changed settings: %s.", workdir, "; ".join(safe))


def checkpointer(workdir: str, keep: int = 1) -> Checkpointer:
  """The run's checkpoint manager (keeps the newest `keep` steps when saving)."""
  return Checkpointer(path(workdir, CHECKPOINT_DIR), keep=keep)


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained (or imported) model as entry points use it."""

  workdir: str
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  palette: np.ndarray  # float32 [k, 3] in [-1, 1]
  params: dict  # the transformer's (what model.apply, sampling and features take)
  step: int
  head: dict = dataclasses.field(default_factory=dict)  # a fine-tuned run's classifier head


def _head_names(config, model_cfg: ModelConfig) -> list[str]:
  """Top-level names of the params a run's objective adds to the model's (a fine-tuning head)."""
  objective = objectives.get(config.objective)
  if not objective.init_head:
    return []
  return sorted(jax.eval_shape(lambda: objective.init_head(model_cfg, config, jax.random.key(0))))


def abstract_params(model_cfg: ModelConfig, mesh=None, rules=(), config=None):
  """Shapes of `model_cfg`'s params with shardings: replicated on one device, or laid out on
  `mesh` by the logical-axis `rules`. With a run `config` whose objective adds params (a
  fine-tuning head), those are included."""
  objective = objectives.get(config.objective if config is not None else "ar")  # ar: no head
  shapes = jax.eval_shape(lambda: objective.init_params(model_cfg, config, jax.random.key(0)))
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, shapes)
  else:
    shardings = sharding.logical_to_shardings(objective.param_axes(model_cfg, config), shapes,
                                              mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def load_run(workdir: str, step: int | None = None, mesh=None) -> Run:
  """Config, palette and params of the run in `workdir` at `step` (default: the newest).

  Only the params are read (no optimiser state), onto the first local device or, with `mesh`,
  sharded by the run's logical-axis rules. A fine-tuned run's classifier head comes apart,
  in `Run.head`. Without `step`, a newest checkpoint that does not read (a damaged file) is
  skipped with a warning for the next older one; nothing in the folder is changed.
  """
  config = read_config(workdir)
  model_cfg = model_config(config)
  palette_path = path(workdir, PALETTE_FILE)
  if not os.path.isfile(palette_path):
    raise FileNotFoundError(f"{palette_path} does not exist: the run in {workdir!r} has no "
                            "palette (was it started and killed before its first checkpoint?).")
  centers = palette.load_palette(palette_path)
  palette.check_fits(centers, model_cfg.vocab_size, palette_path)
  rules = sharding.rules_from_config(config) if mesh is not None else ()
  abstract = {"params": abstract_params(model_cfg, mesh, rules, config)}
  with checkpointer(workdir) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train the run first (or "
                              "let it reach train.checkpoint_every_steps).")
    if step is not None:
      step = int(step)
      if step not in steps:
        raise ValueError(f"No checkpoint for step {step} in {ckpt.directory}; available steps: "
                         f"{steps}.")
    candidates = [step] if step is not None else steps[::-1]
    for i, candidate in enumerate(candidates):
      try:
        restored, _ = ckpt.restore(candidate, abstract)
        break
      except TreeMismatchError:
        raise  # another model, not a damaged file
      except Exception as e:  # noqa: BLE001  (whatever a damaged file raises)
        workdirs.quiet_orbax_teardown()
        reason = workdirs.one_line(e)
        if i + 1 == len(candidates):
          others = [s for s in steps if s != candidate]
          raise ValueError(
              f"checkpoint {candidate} in {ckpt.directory} does not read ({reason})"
              + (f"; pick another with --step (available: {others})." if others else ".")
          ) from e
        logging.warning("Checkpoint %s in %s does not read (%s); using step %s instead.",
                        candidate, ckpt.directory, reason, candidates[i + 1])
    step = candidate
  params = dict(restored["params"])
  head = {name: params.pop(name) for name in _head_names(config, model_cfg)}
  return Run(workdir=workdir, config=config, model_cfg=model_cfg,
             palette=np.asarray(centers, np.float32), params=params, step=step, head=head)


def save_run(workdir: str, config, centers: np.ndarray, params: dict, step: int = 0) -> None:
  """Writes a params-only run (config.json, palette.npy, checkpoints/<step>/params).

  For models that were not trained here (an imported checkpoint); `load_run` reads it.
  """
  model_cfg = model_config(config)
  centers = palette.check_palette(centers, "the palette")
  palette.check_fits(centers, model_cfg.vocab_size, "the palette")
  expected = jax.tree.map(lambda s: s.shape, abstract_params(model_cfg))
  got = jax.tree.map(np.shape, params)
  if expected != got:
    raise ValueError(f"params do not match the config's model {model_cfg}.")
  os.makedirs(workdir, exist_ok=True)
  config_json = config_to_json(config)
  write_config(workdir, config_json)
  palette.save_palette(path(workdir, PALETTE_FILE), centers)
  with checkpointer(workdir) as ckpt:
    ckpt.save(step, {"params": jax.tree.map(jax.numpy.asarray, params)},
              {"data": {"next_step": step, "seed": config.seed}, "config": config_json})
