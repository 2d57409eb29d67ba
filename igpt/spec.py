"""The run spec: a run config resolved and checked once, before any data, device or folder work.

    spec = resolve(config)          # raises one clear ValueError for a config that cannot run
    spec.model, spec.objective, spec.mesh_shape, spec.rules, spec.config.train.batch_size

`resolve` is the only place a run config is validated and the only place its derived objects
(the model's shape, the configured objective, the mesh sizes, the sharding rules, the attention
kernel) are made; everything downstream takes the spec. `model_config` derives the model of a
stored run config (a run folder's config.json) the same way, for readers.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from igpt import config as config_lib
from igpt import objectives, palette, run, sharding, storage
from igpt.errors import MissingFileError, UserError
from igpt.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A checked run: its frozen config and what is derived from it."""

  config: ml_collections.FrozenConfigDict  # every field set (the schema's defaults filled in)
  model: ModelConfig
  objective: objectives.Objective  # configured (mask rate, classes)
  mesh_shape: dict  # {'data', 'fsdp', 'tensor'} sizes over every device
  rules: tuple  # logical axis -> mesh axes
  attention: str  # the attention kernel `model.attention` resolves to here
  process_count: int

  @property
  def train(self):
    return self.config.train

  @property
  def data(self):
    return self.config.data

  def to_json(self) -> dict:
    """The config as stored in config.json and every checkpoint (the run's identity)."""
    return run.config_to_json(self.config)


def complete(config) -> ml_collections.ConfigDict:
  """`config` with every schema field it lacks set to its default (a run folder written
  before a field existed reads as if it held the default)."""
  # A deep, unlocked copy (ConfigDict(config) would share the nested sections).
  out = ml_collections.ConfigDict(
      config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  for field, default in config_lib.default_fields().items():
    *sections, name = field.split(".")
    node = out
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    if name not in node:
      node[name] = default
  return out


def model_config(config) -> ModelConfig:
  """The model of a run config: its `model` section, causal or not by its objective, with one
  output class per palette colour unless `model.vocab_size` is set."""
  return ModelConfig.from_config(
      config.model, causal=objectives.get(config.objective).causal,
      vocab_size=config.model.vocab_size or config.data.palette_size)


def _take_init_from(config) -> None:
  """With `init_from` set, the pretrained run's model section and palette (in place)."""
  source = config.init_from
  if not source:
    return
  if not run.checkpoint_steps(source):
    raise MissingFileError(f"init_from={source!r} has no checkpoint in "
                           f"{run.path(source, run.CHECKPOINT_DIR)}: train that run first, or "
                           "set init_from='' to start from a fresh init.")
  pretrained = complete(run.read_config(source))
  for key in ("num_layers", "d_model", "num_heads", "image_side", "vocab_size"):
    config.model[key] = pretrained.model[key]
  palette_path = run.path(source, run.PALETTE_FILE)
  if not storage.isfile(palette_path):
    raise MissingFileError(f"{palette_path} does not exist: init_from={source!r} has no "
                           "palette.")
  config.data.palette_path = palette_path
  config.data.palette_size = int(pretrained.data.palette_size)


def _check_optim(o) -> None:
  if not o.lr > 0:
    raise UserError(f"optim.lr={o.lr} must be > 0.")
  for name in ("b1", "b2"):
    if not 0 <= o[name] < 1:
      raise UserError(f"optim.{name}={o[name]} must be in [0, 1).")
  if not o.eps > 0:
    raise UserError(f"optim.eps={o.eps} must be > 0.")
  for name in ("weight_decay", "clip_grad_norm"):
    if o[name] < 0:
      raise UserError(f"optim.{name}={o[name]} must be >= 0 (0: off).")


def resolve(config, num_devices: int | None = None, process_count: int | None = None) -> RunSpec:
  """The checked spec of a run config on `num_devices` devices over `process_count` processes
  (default: what JAX sees). Raises ValueError naming the field and the fix; device-free and
  cheap, so a bad run fails in seconds."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  known = config_lib.default_fields()
  for field in config_lib.flatten(config.to_dict()):
    if field not in known:
      raise UserError(f"{field} is not a run config field; igpt/config.py lists them (with "
                      "their defaults).")
  config = complete(config)  # a private copy; the caller's config is untouched
  _take_init_from(config)
  objective = objectives.get(config.objective).configure(config)
  model_cfg = model_config(config)
  attention = model_cfg.attention_implementation()  # a forced kernel that cannot run here
  if config.data.augment and config.data.source == "openai_npy":
    raise UserError("data.augment=True crops and flips images, but data.source='openai_npy' "
                    "holds palette tokens; set --config.data.augment=False.")

  sizes = sharding.mesh_shape(config.mesh, num_devices)
  dp = sharding.data_parallel_size(sizes)
  t = config.train
  if t.batch_size < 1:
    raise UserError(f"train.batch_size={t.batch_size} must be >= 1.")
  _check_optim(config.optim)
  accum = t.grad_accum_steps
  if accum < 1:
    raise UserError(f"train.grad_accum_steps={accum} must be >= 1.")
  if t.batch_size % (dp * accum):
    raise UserError(
        f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
        f"(mesh data x fsdp = {sizes['data']} x {sizes['fsdp']} = {dp}) times "
        f"train.grad_accum_steps={accum}; each device needs a whole micro-batch.")
  if t.batch_size % process_count:
    raise UserError(f"train.batch_size={t.batch_size} is not divisible by the "
                    f"{process_count} processes.")
  if process_count > 1 and dp % process_count:
    raise UserError(
        f"the data-parallel size {dp} must be a multiple of the {process_count} processes, "
        "so every process feeds its own rows of the batch.")
  if t.total_steps < 1:
    raise UserError(f"train.total_steps={t.total_steps} must be >= 1.")
  if not 0 <= config.optim.warmup_steps < t.total_steps:
    raise UserError(f"optim.warmup_steps={config.optim.warmup_steps} must be in "
                    f"[0, train.total_steps={t.total_steps}).")
  if config.optim.schedule not in ("cosine", "constant"):
    raise UserError(f"optim.schedule={config.optim.schedule!r}: use 'cosine' or 'constant'.")
  for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
               "keep_checkpoints"):
    if t[name] < 1:
      raise UserError(f"train.{name}={t[name]} must be >= 1.")
  if t.sample_every_steps < 0 or t.sample_num_images < 1:
    raise UserError(f"train.sample_every_steps={t.sample_every_steps} must be >= 0 (0: no "
                    f"samples) and train.sample_num_images={t.sample_num_images} >= 1.")
  if t.sample_every_steps and not objective.causal:
    raise UserError(f"train.sample_every_steps={t.sample_every_steps}: only autoregressive "
                    f"models sample; objective {objective.name!r} does not. Set it to 0.")
  for name, zero in (("num_workers", "batches made in the loop"),
                     ("prefetch_batches", "2 per worker")):
    if config.data[name] < 0:
      raise UserError(f"data.{name}={config.data[name]} must be >= 0 (0: {zero}).")
  for name in ("profile_start_step", "profile_num_steps"):
    if t[name] < 0:
      raise UserError(f"train.{name}={t[name]} must be >= 0 (profile_num_steps=0: no trace).")
  if config.data.palette_size > model_cfg.vocab_size:
    raise UserError(
        f"model.vocab_size={model_cfg.vocab_size} is smaller than data.palette_size="
        f"{config.data.palette_size}: every palette colour needs a token.")
  if config.data.palette_path:
    if not storage.exists(config.data.palette_path):
      raise UserError(f"data.palette_path={config.data.palette_path!r} does not exist; "
                      "give an existing .npy palette or '' to fit one from the training data.")
    given = palette.load_palette(config.data.palette_path)  # a [k, 3] array in [-1, 1]
    palette.check_fits(given, model_cfg.vocab_size,
                       f"data.palette_path={config.data.palette_path!r}")
  rules = sharding.rules_from_config(config)  # unknown mesh axes in sharding_rules
  return RunSpec(config=ml_collections.FrozenConfigDict(config), model=model_cfg,
                 objective=objective, mesh_shape=sizes, rules=rules, attention=attention,
                 process_count=process_count)
