"""A trained model as every user of one sees it: one type, from a run folder or a transformers
ImageGPT folder.

    m = load(workdir="runs/tiny")                                  # a run (newest checkpoint)
    m = load(hf="imagegpt-small/", palette="kmeans_centers.npy")   # a transformers folder
    m.model_cfg, m.params, m.palette, m.step, m.image_side

`probe.py`, `sample.py`, feature extraction and fine-tuning's `init_from` all read models
through here. `save_run` writes a params-only run folder (an imported model) that `load_run`
reads like any trained one.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from absl import logging

from igpt import class_head, model, palette as palette_lib, run, sharding, spec as spec_lib, storage
from igpt import config as config_lib
from igpt.convert import hf as convert_hf
from igpt.errors import MissingFileError, UserError
from igpt.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A model's shape, params and palette, and where they came from."""

  model_cfg: ModelConfig
  params: dict  # the transformer's (what model.apply, sampling and features take)
  palette: np.ndarray | None  # float32 [k, 3] in [-1, 1]; None: it reads only tokens
  description: str  # for reports: "run runs/tiny at step 500"
  identity: str  # for caches: which weights these are
  step: int | None = None
  workdir: str = ""  # the run folder ("" for a transformers folder)
  config: ml_collections.ConfigDict | None = None  # the run's config (None for transformers)
  rules: tuple = sharding.DEFAULT_RULES
  head: dict = dataclasses.field(default_factory=dict)  # a fine-tuned run's classifier head

  @property
  def image_side(self) -> int:
    return self.model_cfg.image_side

  @property
  def data(self):
    """The run's `data` config section (None for a transformers folder)."""
    return self.config.data if self.config is not None else None


def abstract_params(model_cfg: ModelConfig, mesh=None, rules=()):
  """Shapes of `model_cfg`'s params with shardings: replicated on one device, or laid out on
  `mesh` by the logical-axis `rules`."""
  shapes = jax.eval_shape(lambda: model.init_params(model_cfg, jax.random.key(0)))
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, shapes)
  else:
    shardings = sharding.logical_to_shardings(model.logical_axes(model_cfg), shapes, mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _restore_tree(ckpt, step: int, model_cfg: ModelConfig, mesh, rules) -> dict:
  """What to read of checkpoint `step`'s params: the model's, plus any head the checkpoint
  holds beside them (by its key), replicated."""
  tree = abstract_params(model_cfg, mesh, rules)
  _, head = class_head.split_head(ckpt.params_shapes(step))
  place = (sharding.replicated(mesh) if mesh is not None
           else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  head = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place), head)
  return {"params": {**tree, **head}}


def stored_model(extra: dict) -> ModelConfig:
  """The model a checkpoint's `extra` describes. Checkpoints written before the model's shape
  was stored with them hold only the run config: their model is derived from it as training
  derived it then."""
  if "model" in extra:
    return ModelConfig.from_dict(extra["model"])
  return spec_lib.model_config(config_lib.complete(extra["config"]))


def load_run(workdir: str, step: int | None = None, mesh=None,
             palette: str | None = None) -> TrainedModel:
  """The model of the run in `workdir` at `step` (default: the newest checkpoint that reads).

  The checkpoint says what it holds: the model's shape and the run's config are read from its
  `extra`, and only the params are read (no optimiser state), onto the first local device
  or, with `mesh`, sharded by the run's logical-axis rules. A fine-tuned run's classifier head
  comes apart, in `.head`. A damaged newest checkpoint is skipped with a warning for the next
  older one; nothing in the folder is changed. `palette` (a .npy file) replaces the run's own.
  """
  def tree(found: int, extra: dict) -> dict:
    rules = sharding.rules_from_config(config_lib.complete(extra["config"])) if mesh else ()
    return _restore_tree(ckpt, found, stored_model(extra), mesh, rules)

  with run.checkpointer(workdir, readable=True) as ckpt:
    found, restored, extra = ckpt.newest_that_reads(
        tree, step=None if step is None else int(step), damaged="skip",
        required_extra=("config",))
  if found is None:
    raise MissingFileError(f"no checkpoint in {ckpt.directory} that reads: train the run "
                           "first (a damaged one is named in the warnings above).")
  config = config_lib.complete(extra["config"])
  model_cfg = stored_model(extra)
  palette_path = palette or run.path(workdir, run.PALETTE_FILE)
  centers = palette_lib.load_or_fit(model_cfg.vocab_size, palette_path)
  if not palette and extra.get("palette", {}).get("sha256") not in (
      None, palette_lib.identity(centers)["sha256"]):
    raise UserError(f"{palette_path} is not the palette checkpoint {found} was trained with "
                    "(its colours differ); restore the run's palette.npy, or give the right "
                    "one with --palette.")
  params, head = class_head.split_head(dict(restored["params"]))
  return TrainedModel(model_cfg=model_cfg, params=params, palette=centers,
                      description=f"run {workdir} at step {found}",
                      identity=f"run:{storage.absolute(workdir)}@{found}", step=found,
                      workdir=workdir, config=config, rules=sharding.rules_from_config(config),
                      head=head)


def pretrained(workdir: str) -> spec_lib.Pretrained:
  """What a run started from `workdir` (`init_from`) takes of it: the model's shape of its
  newest checkpoint that reads, and its palette."""
  found = None
  if run.checkpoint_steps(workdir):
    with run.checkpointer(workdir) as ckpt:
      found, _, extra = ckpt.newest_that_reads(damaged="skip", required_extra=("config",))
  if found is None:
    raise MissingFileError(f"init_from={workdir!r} has no checkpoint that reads in "
                           f"{run.path(workdir, run.CHECKPOINT_DIR)}: train that run first, or "
                           "set init_from='' to start from a fresh init.")
  palette_path = run.path(workdir, run.PALETTE_FILE)
  if not storage.isfile(palette_path):
    raise MissingFileError(f"{palette_path} does not exist: init_from={workdir!r} has no "
                           "palette.")
  model_cfg = stored_model(extra)
  centers = palette_lib.load_or_fit(model_cfg.vocab_size, palette_path)
  return spec_lib.Pretrained(model=model_cfg, palette_path=palette_path,
                             palette_size=len(centers))


def load_hf(hf_dir: str, palette_path: str | None = None) -> TrainedModel:
  """The model of a transformers ImageGPT folder, with the palette file its tokens use (none:
  it can read only pre-tokenised data)."""
  model_cfg, params = convert_hf.load_hf_checkpoint(storage.local_copy(hf_dir))
  centers = (palette_lib.load_or_fit(model_cfg.vocab_size, palette_path) if palette_path
             else None)
  return TrainedModel(model_cfg=model_cfg, params=jax.tree.map(jax.numpy.asarray, params),
                      palette=centers, description=f"{hf_dir}",
                      identity=f"hf:{storage.absolute(hf_dir)}")


def load(*, workdir: str | None = None, hf: str | None = None, palette: str | None = None,
         step: int | None = None, mesh=None) -> TrainedModel:
  """The model of a run folder (`workdir`, `step`) or of a transformers folder (`hf`, with
  `palette`); exactly one of the two. `palette` with a run folder replaces the run's own."""
  ModelSource(workdir, step, hf, palette).check()
  if workdir:
    return load_run(workdir, step, mesh, palette)
  return load_hf(hf, palette)


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where a model comes from, as an entry point's flags name it (see `load`)."""

  workdir: str | None = None
  step: int | None = None
  hf: str | None = None
  palette: str | None = None

  def check(self) -> None:
    """Refuses a source that names no model, or two."""
    if bool(self.workdir) == bool(self.hf):
      raise UserError("give exactly one of --workdir (a run folder) and --hf (a transformers "
                      "ImageGPT folder).")
    if self.hf and self.step is not None:
      raise UserError("--step picks a checkpoint of --workdir; a --hf folder has one model.")

  def load(self, mesh=None) -> TrainedModel:
    return load(workdir=self.workdir, hf=self.hf, palette=self.palette, step=self.step,
                mesh=mesh)


def random_init(like: TrainedModel, seed: int) -> TrainedModel:
  """A freshly initialised model of `like`'s shape (same palette): a probe's control."""
  # Jitted: eager Flax init is slow, and jit lays the params out once.
  params = jax.jit(model.init_params, static_argnums=0)(like.model_cfg, jax.random.key(seed))
  return dataclasses.replace(like, params=params, identity=f"random-init:{seed}", step=0,
                             description=f"random init (seed {seed}) of the same shape",
                             head={})


def save_run(workdir: str, config, centers: np.ndarray, params: dict, step: int = 0) -> None:
  """Writes a params-only run (config.json, model.json, palette.npy, checkpoints/<step>/params).

  For models that were not trained here (an imported checkpoint); `load_run` reads it.
  """
  model_cfg = spec_lib.model_config(config)
  centers = palette_lib.load_or_fit(model_cfg.vocab_size, centers)
  expected = jax.tree.map(lambda s: s.shape, abstract_params(model_cfg))
  got = jax.tree.map(np.shape, params)
  if expected != got:
    raise UserError(f"params do not match the config's model {model_cfg}.")
  storage.makedirs(workdir)
  config_json = config_lib.to_json(config)
  record = run.model_record(model_cfg, centers)
  run.write_json(workdir, run.CONFIG_FILE, config_json)
  run.write_json(workdir, run.MODEL_FILE, record)
  palette_lib.save_palette(run.path(workdir, run.PALETTE_FILE), centers)
  with run.checkpointer(workdir) as ckpt:
    ckpt.save(step, {"params": jax.tree.map(jax.numpy.asarray, params)},
              {"data": {"next_step": step, "seed": config.seed}, "config": config_json,
               **record})


def load_for_sampling(source: "ModelSource") -> TrainedModel:
  """The model of `source` as a sampler needs it: with a palette to turn its tokens into
  pixels, restricted to the tokens that palette can show."""
  source.check()
  if source.hf and not source.palette:
    raise UserError("--hf needs --palette (a [k, 3] .npy of colours in [-1, 1], like "
                    "kmeans_centers.npy).")
  loaded = source.load()
  if len(loaded.palette) < loaded.model_cfg.vocab_size:
    if source.palette:
      # A palette from outside that lacks colours is most likely another model's.
      raise UserError(f"the palette {source.palette} has {len(loaded.palette)} colours but the "
                      f"model has {loaded.model_cfg.vocab_size} tokens: use the palette it was "
                      "trained with.")
    # A run trained on a smaller palette (its training said so): its other tokens never
    # occurred, and they are never drawn.
    logging.info("the run's palette has %d colours for %d tokens: sampling only those.",
                 len(loaded.palette), loaded.model_cfg.vocab_size)
    model_cfg, params = model.restrict_vocab(loaded.model_cfg, loaded.params,
                                             len(loaded.palette))
    loaded = dataclasses.replace(loaded, model_cfg=model_cfg, params=params)
  return loaded
