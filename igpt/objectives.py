"""Training objectives as one table: what the model sees, and what it is scored on.

Each `Objective` says whether the model is causal, which batch keys it needs, how it adds its
model inputs to a batch (`prepare`: BERT's masks), its loss, what its evaluations report and
whether it adds a head. The run spec looks the configured `objective` up here once; nothing
branches on its name, so a new objective is one new entry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import optax

from igpt import class_head, losses, model
from igpt.errors import UserError
from igpt.model import ModelConfig

# prepare(objective, batch, rng) -> batch with the objective's model inputs added; the whole
# global batch is prepared before it is split into micro-batches, so gradient accumulation
# sees the same masks as one big step.
Prepare = Callable[["Objective", dict, "jax.Array"], dict]
# loss(model_cfg, params, batch) -> (per-example loss [B], example weight [B]); the batch
# loss is sum(loss * weight) / sum(weight). A weight of 0 drops an example (evaluation
# multiplies it by the padding mask).
Loss = Callable[[ModelConfig, dict, dict], tuple]


@dataclasses.dataclass(frozen=True)
class Objective:
  """One training objective; `configure` binds the run's settings (mask rate, classes)."""

  name: str
  causal: bool
  batch_keys: tuple[str, ...]
  prepare: Prepare
  loss: Loss
  description: str
  # What an evaluation reports (names in igpt.evaluation), and the metric whose best value's
  # params are kept in the run's best/ folder ("" = none).
  evaluators: tuple[str, ...] = ("loss",)
  keep_best_by: str = ""
  has_head: bool = False  # adds a classifier head (igpt.class_head) to the model's params
  masks: bool = False  # hides positions from the model at the run's bert_mask_prob
  mask_prob: float = 0.0  # with `masks`: the share of positions masked
  num_classes: int = 0  # classify: the head's classes

  def configure(self, config) -> "Objective":
    """This objective with the run config's settings, checked."""
    if self.masks:
      if not 0.0 < config.bert_mask_prob < 1.0:
        raise UserError(f"bert_mask_prob={config.bert_mask_prob} must be in (0, 1).")
      return dataclasses.replace(self, mask_prob=float(config.bert_mask_prob))
    if self.has_head:
      num_classes = int(config.finetune.num_classes)
      if num_classes < 2:
        raise UserError(f"objective={self.name!r} needs finetune.num_classes >= 2 (the "
                        "labelled data's classes); see configs/finetune.py.")
      return dataclasses.replace(self, num_classes=num_classes)
    return self

  def model_config(self, config) -> ModelConfig:
    """The model a run config trains with this objective: its `model` section, causal or
    not as this objective is, one output class per palette colour unless `model.vocab_size`
    is set."""
    return ModelConfig.from_config(
        config.model, causal=self.causal,
        vocab_size=config.model.vocab_size or config.data.palette_size)

  def prepare_batch(self, batch: dict, rng) -> dict:
    """`batch` with this objective's model inputs added (BERT's masks)."""
    return self.prepare(self, batch, rng)

  def init_params(self, model_cfg: ModelConfig, rng) -> dict:
    """The model's params plus any this objective adds (a fine-tuning head)."""
    params = model.init_params(model_cfg, rng)
    if self.has_head:
      params = {**params, **class_head.init_head(model_cfg.d_model, self.num_classes)}
    return params

  def param_axes(self, model_cfg: ModelConfig) -> dict:
    """Logical axis names of `init_params`' tree."""
    axes = model.logical_axes(model_cfg)
    if self.has_head:
      axes = {**axes, **class_head.head_axes()}
    return axes


def _unchanged(objective, batch, rng):
  del objective, rng
  return batch


def _ar_loss(model_cfg, params, batch):
  logits_BxLxV, _ = model.apply(model_cfg, params, batch["tokens"])
  _, per_example_B = losses.ar_loss(logits_BxLxV, batch["tokens"])
  return per_example_B, jnp.ones_like(per_example_B)


def _bert_prepare(objective, batch, rng):
  keep_BxL = losses.bert_keep_mask(rng, batch["tokens"].shape, objective.mask_prob)
  return {**batch, "keep": keep_BxL}


def _bert_loss(model_cfg, params, batch):
  logits_BxLxV, _ = model.apply(model_cfg, params, batch["tokens"], batch["keep"])
  _, per_example_B = losses.bert_loss(logits_BxLxV, batch["tokens"], batch["keep"])
  # An example with no masked position carries no loss.
  return per_example_B, (~batch["keep"]).any(axis=1).astype(jnp.float32)


def _classify_loss(model_cfg, params, batch):
  # The paper's fine-tuning loss: L_clf + L_gen, both per example.
  logits_BxC, logits_BxLxV = class_head.class_logits(model_cfg, params, batch["tokens"])
  clf_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
  _, gen_B = losses.ar_loss(logits_BxLxV, batch["tokens"])
  return clf_B + gen_B, jnp.ones_like(clf_B)


OBJECTIVES = {
    "ar": Objective("ar", causal=True, batch_keys=("tokens",), prepare=_unchanged,
                    loss=_ar_loss, description="next pixel (autoregressive)"),
    "bert": Objective("bert", causal=False, batch_keys=("tokens",), prepare=_bert_prepare,
                      loss=_bert_loss, description="masked pixels (p = bert_mask_prob)",
                      masks=True),
    "classify": Objective("classify", causal=True, batch_keys=("tokens", "label"),
                          prepare=_unchanged, loss=_classify_loss,
                          description="fine-tuning: linear head on mean-pooled ln_f + next pixel",
                          evaluators=("loss", "accuracy"), keep_best_by="eval_accuracy",
                          has_head=True),
}


def get(name: str) -> Objective:
  """The objective called `name` (not yet configured); a UserError lists the known ones."""
  if name not in OBJECTIVES:
    raise UserError(f"objective={name!r} is unknown: use one of {sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]


def weighted_mean(per_example_B, weight_B):
  """sum(loss * weight) / sum(weight) (0 when every weight is 0)."""
  return (per_example_B * weight_B).sum() / jnp.maximum(weight_B.sum(), 1.0)
