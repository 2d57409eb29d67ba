"""Training objectives as one table: what the model sees, and what it is scored on.

Each `Objective` says whether the model is causal, which batch keys it needs, how it adds its
model inputs to a batch (`prepare`: BERT's masks) and its loss. The trainer looks the
configured `objective` up here and never branches on its name, so a new objective (say a
classification loss for fine-tuning) is one new entry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import optax

from igpt import classifier, losses, model
from igpt.model import ModelConfig

# prepare(batch, rng, config) -> batch with the objective's model inputs added; the whole
# global batch is prepared before it is split into micro-batches, so gradient accumulation
# sees the same masks as one big step.
Prepare = Callable[[dict, "jax.Array", object], dict]
# loss(model_cfg, params, batch) -> (per-example loss [B], example weight [B]); the batch
# loss is sum(loss * weight) / sum(weight). A weight of 0 drops an example (evaluation
# multiplies it by the padding mask).
Loss = Callable[[ModelConfig, dict, dict], tuple]
# init_head(model_cfg, config, rng) -> params the objective adds to the model's (a classifier
# head); head_axes(model_cfg, config) -> their logical axis names, for sharding.
InitHead = Callable[[ModelConfig, object, "jax.Array"], dict]
HeadAxes = Callable[[ModelConfig, object], dict]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  causal: bool
  batch_keys: tuple[str, ...]
  prepare: Prepare
  loss: Loss
  description: str
  init_head: InitHead | None = None
  head_axes: HeadAxes | None = None

  def init_params(self, model_cfg: ModelConfig, config, rng) -> dict:
    """The model's params plus any this objective adds (a fine-tuning head)."""
    params = model.init_params(model_cfg, rng)
    if self.init_head:
      params = {**params, **self.init_head(model_cfg, config, rng)}
    return params

  def param_axes(self, model_cfg: ModelConfig, config) -> dict:
    """Logical axis names of `init_params`' tree."""
    axes = model.logical_axes(model_cfg)
    if self.head_axes:
      axes = {**axes, **self.head_axes(model_cfg, config)}
    return axes


def _unchanged(batch, rng, config):
  del rng, config
  return batch


def _ar_loss(model_cfg, params, batch):
  logits_BxLxV, _ = model.apply(model_cfg, params, batch["tokens"])
  _, per_example_B = losses.ar_loss(logits_BxLxV, batch["tokens"])
  return per_example_B, jnp.ones_like(per_example_B)


def _bert_prepare(batch, rng, config):
  keep_BxL = losses.bert_keep_mask(rng, batch["tokens"].shape, config.bert_mask_prob)
  return {**batch, "keep": keep_BxL}


def _bert_loss(model_cfg, params, batch):
  logits_BxLxV, _ = model.apply(model_cfg, params, batch["tokens"], batch["keep"])
  _, per_example_B = losses.bert_loss(logits_BxLxV, batch["tokens"], batch["keep"])
  # An example with no masked position carries no loss.
  return per_example_B, (~batch["keep"]).any(axis=1).astype(jnp.float32)


def _classify_loss(model_cfg, params, batch):
  # The paper's fine-tuning loss: L_clf + L_gen, both per example.
  logits_BxC, logits_BxLxV = classifier.class_logits(model_cfg, params, batch["tokens"])
  clf_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
  _, gen_B = losses.ar_loss(logits_BxLxV, batch["tokens"])
  return clf_B + gen_B, jnp.ones_like(clf_B)


OBJECTIVES = {
    "ar": Objective("ar", causal=True, batch_keys=("tokens",), prepare=_unchanged,
                    loss=_ar_loss, description="next pixel (autoregressive)"),
    "bert": Objective("bert", causal=False, batch_keys=("tokens",), prepare=_bert_prepare,
                      loss=_bert_loss, description="masked pixels (p = bert_mask_prob)"),
    "classify": Objective("classify", causal=True, batch_keys=("tokens", "label"),
                          prepare=_unchanged, loss=_classify_loss,
                          description="fine-tuning: linear head on mean-pooled ln_f + next pixel",
                          init_head=classifier.init_head, head_axes=classifier.head_axes),
}


def get(name: str) -> Objective:
  """The objective called `name`; a ValueError lists the known ones."""
  if name not in OBJECTIVES:
    raise ValueError(f"objective={name!r} is unknown: use one of {sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]


def weighted_mean(per_example_B, weight_B):
  """sum(loss * weight) / sum(weight) (0 when every weight is 0)."""
  return (per_example_B * weight_B).sum() / jnp.maximum(weight_B.sum(), 1.0)
