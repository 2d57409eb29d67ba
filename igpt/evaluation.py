"""Held-out evaluation: what an objective's table entry names (`Objective.evaluators`), run over
fixed batches that are tokenised once.

    batches = eval_batches(source, centers, mesh, batch_size, num_batches)
    evaluate = Evaluation(setup, param_shardings, batches, rng)
    evaluate(params)   # {'eval_loss', 'eval_bits_per_dim', 'eval_examples'[, 'eval_accuracy']}

Evaluators: "loss" (the objective's loss in nats/token and bits/dim) and "accuracy" (a
classifier head's top-1 accuracy).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from igpt import class_head, losses, pipeline, sharding

EVAL_KEYS = ("tokens", "label", "mask")


def eval_batches(source, centers, mesh, batch_size: int, num_batches: int | None = None) -> list:
  """Global, fixed evaluation batches of `source` ({'tokens', 'label', 'mask'}; see
  `pipeline.eval_batches`), this process's rows of each."""
  return [sharding.global_batch({k: b[k] for k in EVAL_KEYS}, mesh)
          for b in pipeline.eval_batches(source, centers, batch_size, num_batches,
                                         jax.process_index(), jax.process_count())]


def make_loss_step(setup, param_shardings):
  """Jitted `loss(params, batch, rng) -> (loss_sum, num_examples)` on one held-out batch.

  `batch` holds the objective's keys and 'mask' (float32 [B], 0 for the rows that pad the
  last eval batch); loss_sum adds the per-example losses (nats/token) of the rows that count.
  """
  mesh, objective = setup.mesh, setup.objective

  def loss_fn(params, batch, rng):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(setup.rules):
      batch = objective.prepare_batch(batch, rng)
      per_example_B, weight_B = objective.loss(setup.model_cfg, params, batch)
      weight_B = weight_B * batch["mask"]
      return (per_example_B * weight_B).sum(), weight_B.sum()

  replicated = sharding.replicated(mesh)
  return jax.jit(loss_fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh),
                                        replicated),
                 out_shardings=replicated)


def mean_loss(loss_step, params, batches, rng) -> dict:
  """Mean held-out loss over the examples of `batches`: nats/token and bits/dim (= nats / ln 2
  / 3, per RGB sub-pixel).

  Batch i uses `fold_in(rng, i)` (BERT masks), so every evaluation sees the same masks.
  """
  sums = [loss_step(params, b, jax.random.fold_in(rng, i)) for i, b in enumerate(batches)]
  loss_sum, count = (sum(float(x) for x in xs) for xs in zip(*jax.device_get(sums)))
  loss = loss_sum / max(count, 1.0)
  return {"eval_loss": loss, "eval_bits_per_dim": float(losses.bits_per_dim(loss)),
          "eval_examples": int(count)}


def make_accuracy_step(setup, param_shardings):
  """Jitted `correct(params, batch) -> (hits, num_examples)` of a classifier head."""
  mesh = setup.mesh

  def correct(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(setup.rules):
      logits_BxC, _ = class_head.class_logits(setup.model_cfg, params, batch["tokens"])
    hit_B = (logits_BxC.argmax(-1) == batch["label"]).astype(jnp.float32)
    return (hit_B * batch["mask"]).sum(), batch["mask"].sum()

  return jax.jit(correct, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def accuracy(accuracy_step, params, batches) -> float:
  """Top-1 accuracy over the examples of `batches`."""
  sums = jax.device_get([accuracy_step(params, b) for b in batches])
  hits, count = (sum(float(x) for x in xs) for xs in zip(*sums))
  return hits / max(count, 1.0)


class Evaluation:
  """Every evaluator the run's objective names, over fixed batches: `__call__(params)`."""

  def __init__(self, setup, param_shardings, batches: list, rng):
    self.batches, self.rng = batches, rng
    names = setup.objective.evaluators
    unknown = set(names) - {"loss", "accuracy"}
    if unknown:
      raise ValueError(f"objective {setup.objective.name!r} names unknown evaluators "
                       f"{sorted(unknown)}.")
    self._loss = make_loss_step(setup, param_shardings) if "loss" in names else None
    self._accuracy = make_accuracy_step(setup, param_shardings) if "accuracy" in names else None

  def __call__(self, params) -> dict:
    out = {}
    if self._loss is not None:
      out.update(mean_loss(self._loss, params, self.batches, self.rng))
    if self._accuracy is not None:
      out["eval_accuracy"] = accuracy(self._accuracy, params, self.batches)
    return out

  def accuracy(self, params, batches) -> float:
    """The accuracy of `params` on other batches (the test split at the end of a run)."""
    return accuracy(self._accuracy, params, batches)
