"""The fine-tuning classifier: a bias-free linear head on the mean-pooled `ln_f` stream.

Its weights live in the params tree under `clf` (the original release's name), beside the
transformer's; the `classify` objective trains both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from igpt import model

HEAD = "clf"


def init_head(model_cfg, config, rng) -> dict:
  """{'clf': {'w': zeros [d, classes]}}: bias-free and zero-initialised, as in the release."""
  del rng
  return {HEAD: {"w": jnp.zeros((model_cfg.d_model, int(config.finetune.num_classes)),
                                jnp.float32)}}


def head_axes(model_cfg, config) -> dict:
  del model_cfg, config
  return {HEAD: {"w": jax.sharding.PartitionSpec("embed", None)}}


def body_params(params) -> dict:
  """The transformer's params without the head."""
  return {k: v for k, v in params.items() if k != HEAD}


def class_logits(model_cfg, params, tokens_BxL):
  """(classifier logits [B, C], token logits [B, L, V]) from one forward pass."""
  logits_BxLxV, hidden = model.apply(model_cfg, body_params(params), tokens_BxL)
  pooled_BxD = hidden["ln_f"].astype(jnp.float32).mean(axis=1)
  return pooled_BxD @ params[HEAD]["w"], logits_BxLxV
