"""The two pretraining objectives of iGPT and the bits/dim conversion.

Losses are in nats per token (one token = one palette colour = one pixel). Bits per
dimension here follow the spec's convention: bits/dim = CE / ln 2 / 3, i.e. the per-pixel
cross-entropy spread over the pixel's three RGB sub-pixels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

BERT_MASK_PROB = 0.15


def bits_per_dim(nats_per_token):
  """Nats per pixel token -> bits per RGB sub-pixel (CE / ln 2 / 3)."""
  return nats_per_token / math.log(2) / 3


def token_cross_entropy(logits_BxLxV, tokens_BxL):
  """Per-token cross-entropy in nats, float32 [B, L]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), tokens_BxL)


def ar_loss(logits_BxLxV, tokens_BxL):
  """Next-pixel loss: mean CE over all positions and examples.

  The model already prepends SOS and drops the last pixel, so logit i predicts token i:
  there is NO shift here (shifting again would train it to predict two pixels ahead).
  Returns (scalar loss, per-example loss [B]).
  """
  ce_BxL = token_cross_entropy(logits_BxLxV, tokens_BxL)
  per_example_B = ce_BxL.mean(axis=1)
  return per_example_B.mean(), per_example_B


def bert_keep_mask(rng, shape, mask_prob: float = BERT_MASK_PROB):
  """True where a token is kept, False where it is masked (independently with `mask_prob`)."""
  return ~jax.random.bernoulli(rng, mask_prob, shape)


def bert_loss(logits_BxLxV, tokens_BxL, keep_BxL):
  """Masked-pixel loss: per-example mean CE over masked positions, then mean over examples.

  Unmasked positions contribute nothing. An example with no masked position (probability
  0.85^L, ~3e-5 at 8x8 and ~0 at 32x32) is left out of the batch mean rather than counted as 0.
  Returns (scalar loss, per-example loss [B]).
  """
  ce_BxL = token_cross_entropy(logits_BxLxV, tokens_BxL)
  masked_BxL = (~keep_BxL).astype(jnp.float32)
  num_masked_B = masked_BxL.sum(axis=1)
  per_example_B = (ce_BxL * masked_BxL).sum(axis=1) / jnp.maximum(num_masked_B, 1.0)
  has_mask_B = (num_masked_B > 0).astype(jnp.float32)
  loss = (per_example_B * has_mask_B).sum() / jnp.maximum(has_mask_B.sum(), 1.0)
  return loss, per_example_B
