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
from igpt import workdir as workdirs
from igpt.checkpoint import TreeMismatchError
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

  def __post_init__(self):
    if self.palette is not None:
      palette_lib.check_fits(self.palette, self.model_cfg.vocab_size,
                             f"the palette of {self.description}")

  @property
  def image_side(self) -> int:
    return self.model_cfg.image_side

  def within_palette(self) -> "TrainedModel":
    """This model restricted to the tokens its palette can show (all of them when the palette
    has a colour per token): what sampling draws from."""
    if self.palette is None or len(self.palette) >= self.model_cfg.vocab_size:
      return self
    model_cfg, params = model.restrict_vocab(self.model_cfg, self.params, len(self.palette))
    return dataclasses.replace(self, model_cfg=model_cfg, params=params)

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


def load_run(workdir: str, step: int | None = None, mesh=None) -> TrainedModel:
  """The model of the run in `workdir` at `step` (default: the newest checkpoint).

  Only the params are read (no optimiser state), onto the first local device or, with `mesh`,
  sharded by the run's logical-axis rules. A fine-tuned run's classifier head comes apart,
  in `.head`. Without `step`, a newest checkpoint that does not read (a damaged file) is
  skipped with a warning for the next older one; nothing in the folder is changed.
  """
  config = spec_lib.complete(run.read_config(workdir))
  model_cfg = spec_lib.model_config(config)
  centers = run.read_palette(workdir)
  rules = sharding.rules_from_config(config)
  with run.checkpointer(workdir) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise MissingFileError(f"no checkpoint in {ckpt.directory}: train the run first (or "
                             "let it reach train.checkpoint_every_steps).")
    if step is not None:
      step = int(step)
      if step not in steps:
        raise UserError(f"No checkpoint for step {step} in {ckpt.directory}; available steps: "
                        f"{steps}.")
    candidates = [step] if step is not None else steps[::-1]
    for i, candidate in enumerate(candidates):
      try:
        tree = _restore_tree(ckpt, candidate, model_cfg, mesh, rules if mesh else ())
        restored, _ = ckpt.restore(candidate, tree)
        break
      except TreeMismatchError:
        raise  # another model, not a damaged file
      except Exception as e:  # noqa: BLE001  (whatever a damaged file raises)
        reason = workdirs.one_line(e)
        if i + 1 == len(candidates):
          others = [s for s in steps if s != candidate]
          raise UserError(
              f"checkpoint {candidate} in {ckpt.directory} does not read ({reason})"
              + (f"; pick another with --step (available: {others})." if others else ".")
          ) from e
        logging.warning("Checkpoint %s in %s does not read (%s); using step %s instead.",
                        candidate, ckpt.directory, reason, candidates[i + 1])
    step = candidate
  params, head = class_head.split_head(dict(restored["params"]))
  return TrainedModel(model_cfg=model_cfg, params=params, palette=centers,
                      description=f"run {workdir} at step {step}",
                      identity=f"run:{storage.absolute(workdir)}@{step}", step=step,
                      workdir=workdir, config=config, rules=rules, head=head)


def load_hf(hf_dir: str, palette_path: str | None = None) -> TrainedModel:
  """The model of a transformers ImageGPT folder, with the palette file its tokens use (none:
  it can read only pre-tokenised data)."""
  model_cfg, params = convert_hf.load_hf_checkpoint(storage.local_copy(hf_dir))
  centers = (np.asarray(palette_lib.load_palette(palette_path), np.float32)
             if palette_path else None)
  return TrainedModel(model_cfg=model_cfg, params=jax.tree.map(jax.numpy.asarray, params),
                      palette=centers, description=f"{hf_dir}",
                      identity=f"hf:{storage.absolute(hf_dir)}")


def load(*, workdir: str | None = None, hf: str | None = None, palette: str | None = None,
         step: int | None = None, mesh=None) -> TrainedModel:
  """The model of a run folder (`workdir`, `step`) or of a transformers folder (`hf`, with
  `palette`); exactly one of the two. `palette` with a run folder replaces the run's own."""
  ModelSource(workdir, step, hf, palette).check()
  if hf:
    return load_hf(hf, palette)
  m = load_run(workdir, step, mesh)
  if palette:
    m = dataclasses.replace(m, palette=np.asarray(palette_lib.load_palette(palette), np.float32))
  return m


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
  """Writes a params-only run (config.json, palette.npy, checkpoints/<step>/params).

  For models that were not trained here (an imported checkpoint); `load_run` reads it.
  """
  model_cfg = spec_lib.model_config(config)
  centers = palette_lib.check_palette(centers, "the palette")
  palette_lib.check_fits(centers, model_cfg.vocab_size, "the palette")
  expected = jax.tree.map(lambda s: s.shape, abstract_params(model_cfg))
  got = jax.tree.map(np.shape, params)
  if expected != got:
    raise UserError(f"params do not match the config's model {model_cfg}.")
  storage.makedirs(workdir)
  config_json = run.config_to_json(config)
  run.write_config(workdir, config_json)
  palette_lib.save_palette(run.path(workdir, run.PALETTE_FILE), centers)
  with run.checkpointer(workdir) as ckpt:
    ckpt.save(step, {"params": jax.tree.map(jax.numpy.asarray, params)},
              {"data": {"next_step": step, "seed": config.seed}, "config": config_json})
