"""The fine-tuning classifier: a bias-free linear head on the mean-pooled `ln_f` stream.

Its weights live in the params tree under `clf` (the original release's name), beside the
transformer's; the `classify` objective trains both. A reader tells head from model by that
key alone (`split_head`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from igpt import model

HEAD = "clf"


def init_head(d_model: int, num_classes: int) -> dict:
  """{'clf': {'w': zeros [d, classes]}}: bias-free and zero-initialised, as in the release."""
  return {HEAD: {"w": jnp.zeros((d_model, num_classes), jnp.float32)}}


def head_axes() -> dict:
  return {HEAD: {"w": jax.sharding.PartitionSpec("embed", None)}}


def split_head(params) -> tuple[dict, dict]:
  """(the transformer's params, the head's: {'clf': ...} or {})."""
  body = {k: v for k, v in params.items() if k != HEAD}
  return body, {k: v for k, v in params.items() if k == HEAD}


def class_logits(model_cfg, params, tokens_BxL):
  """(classifier logits [B, C], token logits [B, L, V]) from one forward pass."""
  body, head = split_head(params)
  logits_BxLxV, hidden = model.apply(model_cfg, body, tokens_BxL)
  pooled_BxD = hidden["ln_f"].astype(jnp.float32).mean(axis=1)
  return pooled_BxD @ head[HEAD]["w"], logits_BxLxV
