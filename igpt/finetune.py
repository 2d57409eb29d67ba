"""Fine-tuning a pretrained iGPT for classification: the pieces the trainer calls.

The objective is `classify` in `igpt.objectives` (cross-entropy of the linear head of
`igpt.classifier` on the mean-pooled `ln_f` stream plus the generative loss, as in the
paper). This module gives the
trainer what that objective needs beyond a loss:

- `resolve_config(config)`: with `init_from=RUN`, the model section and palette of that run;
- `load_pretrained(state, shardings, config, mesh)`: the run's params into a fresh state;
- `Accuracy`: held-out classification accuracy (validation each eval, test at the end);
- `BestKeeper`: keeps the params with the best validation accuracy in `<workdir>/best`;
- `augment(images, rng)`: CIFAR augmentation (4-pixel reflection pad, random crop, flip).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from igpt import fileio, metrics, objectives, palette, pipeline, readers, run, sharding
from igpt.classifier import HEAD, class_logits
from igpt.checkpoint import Checkpointer

BEST_DIR = "best"
BEST_FILE = "best.json"


# ----------------------------------------------------------------------------------------
# Config and the pretrained params.


def resolve_config(config):
  """With `init_from` set, the config with the pretrained run's model and palette (in place).

  Also checks a classifying objective's settings.
  """
  if objectives.get(config.objective).init_head:
    num_classes = config.get("finetune", {}).get("num_classes", 0)
    if num_classes < 2:
      raise ValueError(f"objective={config.objective!r} needs finetune.num_classes >= 2 (the "
                       "labelled data's classes); see configs/finetune.py.")
  source = config.get("init_from", "")
  if not source:
    return config
  pretrained = run.read_config(source)
  for key in ("num_layers", "d_model", "num_heads", "image_side", "vocab_size"):
    config.model[key] = pretrained.model.get(key, 0 if key == "vocab_size" else None)
  palette_path = run.path(source, run.PALETTE_FILE)
  if not os.path.isfile(palette_path):
    raise FileNotFoundError(f"{palette_path} does not exist: init_from={source!r} has no "
                            "palette.")
  config.data.palette_path = palette_path
  config.data.palette_size = int(pretrained.data.palette_size)
  return config


def load_pretrained(state: dict, state_shardings, config, mesh) -> dict:
  """`state` with the transformer params replaced by those of `config.init_from` (the head
  and the optimiser state stay fresh)."""
  pretrained = run.load_run(config.init_from, mesh=mesh)
  params = {**pretrained.params, HEAD: state["params"][HEAD]}
  params = jax.device_put(params, state_shardings["params"])
  return {**state, "params": params}


# ----------------------------------------------------------------------------------------
# Accuracy and the best checkpoint.


class Accuracy:
  """Classification accuracy of params over a split's fixed evaluation batches."""

  def __init__(self, trainer, state_shardings, source, centers, batch_size: int,
               num_batches: int | None = None):
    mesh = trainer.mesh

    def correct(params, batch):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(trainer.rules):
        logits_BxC, _ = class_logits(trainer.model_cfg, params, batch["tokens"])
      hit_B = (logits_BxC.argmax(-1) == batch["label"]).astype(jnp.float32)
      return (hit_B * batch["mask"]).sum(), batch["mask"].sum()

    replicated = sharding.replicated(mesh)
    self._fn = jax.jit(correct, in_shardings=(state_shardings["params"],
                                              sharding.batch_sharding(mesh)),
                       out_shardings=replicated)
    self._batches = [
        sharding.global_batch({k: b[k] for k in ("tokens", "label", "mask")}, mesh)
        for b in pipeline.eval_batches(source, centers, batch_size, num_batches,
                                       jax.process_index(), jax.process_count())]

  def __call__(self, params) -> float:
    sums = jax.device_get([self._fn(params, b) for b in self._batches])
    hits, count = (sum(float(x) for x in xs) for xs in zip(*sums))
    return hits / max(count, 1.0)


class BestKeeper:
  """Saves params to `<workdir>/best` whenever validation accuracy beats the best so far."""

  def __init__(self, workdir: str):
    self.directory = run.path(workdir, BEST_DIR)
    record = {}  # survives a resume
    path = os.path.join(self.directory, BEST_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        record = json.load(f)
    self.best, self.step = record.get("eval_accuracy", -1.0), record.get("step")

  def _checkpointer(self) -> Checkpointer:
    return Checkpointer(os.path.join(self.directory, "checkpoints"), keep=1)

  def update(self, step: int, accuracy: float, params) -> bool:
    if accuracy <= self.best:
      return False
    self.best, self.step = accuracy, step
    with self._checkpointer() as ckpt:
      ckpt.save(step, {"params": params}, {"eval_accuracy": accuracy}, force=True)
    if jax.process_index() == 0:
      with fileio.atomic_open(os.path.join(self.directory, BEST_FILE)) as f:
        json.dump({"step": step, "eval_accuracy": accuracy}, f)
    return True

  def restore(self, abstract_params):
    """The best params saved so far, laid out as `abstract_params`."""
    with self._checkpointer() as ckpt:
      state, _ = ckpt.restore(ckpt.latest_step(), {"params": abstract_params})
    return state["params"]


# ----------------------------------------------------------------------------------------
# Augmentation.


def augment(images_BxSxSx3: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: reflection-pad by `pad` pixels, random crop back, random flip."""
  b, s = images_BxSxSx3.shape[:2]
  padded = np.pad(images_BxSxSx3, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  tops, lefts = rng.integers(0, 2 * pad + 1, b), rng.integers(0, 2 * pad + 1, b)
  flips = rng.random(b) < 0.5
  out = np.empty_like(images_BxSxSx3)
  for i in range(b):
    crop = padded[i, tops[i]:tops[i] + s, lefts[i]:lefts[i] + s]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def augmented_batch_at(source, centers, step: int, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> dict:
  """`pipeline.batch_at`'s batch with `augment` applied before tokenising; the crops and
  flips are a pure function of (seed, step, process), so a resumed run repeats them."""
  batch = pipeline.image_batch_at(source, step, batch_size, seed, process_index, process_count)
  rng = np.random.default_rng((seed, step, process_index))
  images = augment(batch["image"], rng)
  return {"tokens": palette.encode(images, centers).astype(np.int32), "label": batch["label"]}


def test_accuracy(config, trainer, state_shardings, abstract_params, centers,
                  best: BestKeeper) -> dict:
  """Test accuracy of the best-validation params (the number to report)."""
  source = readers.make_source(config.data, "test", config.model.image_side)
  params = best.restore(abstract_params)
  accuracy = Accuracy(trainer, state_shardings, source, centers, config.train.batch_size)(params)
  metrics.log("test accuracy %.4f (%d images) with the params of step %s (best eval accuracy "
              "%.4f)", accuracy, len(source), best.step, best.best)
  return {"test_accuracy": accuracy, "best_eval_accuracy": best.best, "best_step": best.step}
