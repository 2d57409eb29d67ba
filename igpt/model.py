"""The iGPT transformer (Chen et al. 2020) as pure Flax Linen modules.

`IGPT(...).init(rng, tokens)` gives the params pytree; `IGPT(...).apply(params, tokens)`
returns `(logits_BxLxV, hidden)` where `hidden` maps names to activations:

- ``"embed"``: the block input (SOS-shifted token embeddings + positions),
- ``"block_{i}"``: the residual stream after block i (raw, not normalised),
- ``"ln_f"``: the final normalised stream the output head reads.

Every param and activation carries logical axis names (``batch``, ``length``, ``embed``,
``heads``, ``kv``, ``mlp``, ``vocab``, ``layers``); `igpt.sharding` maps them to mesh axes.
Without a mesh they are no-ops, so the same module runs on one CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORM_EPS = 1e-5
SOS_ID = 512  # Hugging Face's row for the start-of-sequence vector.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of an iGPT model. `seq_len` = image_side**2."""

  num_layers: int
  d_model: int
  num_heads: int
  seq_len: int
  vocab_size: int = 512
  causal: bool = True  # False: the BERT objective (no mask, no SOS shift).
  dtype: str = "float32"  # compute dtype; params are always float32
  remat: bool = False  # rematerialise each block in the backward pass

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by model.num_heads="
          f"{self.num_heads}; pick a head count that divides the width.")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"model.dtype={self.dtype!r}: use 'float32' or 'bfloat16'.")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    """Builds from a run config (`config.model`, `config.objective`)."""
    m = config.model
    objective = config.get("objective", "ar")
    if objective not in ("ar", "bert"):
      raise ValueError(f"objective={objective!r} is unknown: use 'ar' or 'bert'.")
    return cls(num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads,
               seq_len=m.image_side**2, vocab_size=m.vocab_size,
               causal=objective == "ar", dtype=m.get("dtype", "float32"),
               remat=m.get("remat", False))


def param_count(cfg: ModelConfig) -> int:
  """Parameters of `cfg` in the original (bias-free) layout, counted without allocating."""
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  shapes = jax.eval_shape(lambda: IGPT(cfg).init(jax.random.key(0), tokens))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def _constrain(x, names):
  return nn.with_logical_constraint(x, names)


def _normal(stddev):
  return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
  """iGPT's norm: x * rsqrt(mean(x^2) + eps) * g, no mean-centring, no bias."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    g = self.param("g", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                   (x.shape[-1],), jnp.float32)
    # Statistics in float32 even under bfloat16 compute.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + NORM_EPS)
    return (y * g).astype(self.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)

    def proj(name, stddev):
      w = self.param(name, nn.with_logical_partitioning(_normal(stddev), ("embed", "heads", "kv")),
                     (d, h, hd), jnp.float32)
      return jnp.einsum("bld,dhk->blhk", x_BxLxD, w.astype(dtype))

    q_BxLxHxK = proj("q", 1 / math.sqrt(d))
    k_BxLxHxK = proj("k", 1 / math.sqrt(d))
    v_BxLxHxK = proj("v", 1 / math.sqrt(d))
    names = ("batch", "length", "heads", "kv")
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (_constrain(t, names) for t in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    o_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale=1 / math.sqrt(hd), is_causal=cfg.causal)
    o_BxLxHxK = _constrain(o_BxLxHxK, names)
    w_out = self.param(
        "c_proj",
        nn.with_logical_partitioning(_normal(1 / math.sqrt(d * cfg.num_layers)), ("heads", "kv", "embed")),
        (h, hd, d), jnp.float32)
    return jnp.einsum("blhk,hkd->bld", o_BxLxHxK, w_out.astype(dtype))


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
    w_fc = self.param("c_fc", nn.with_logical_partitioning(_normal(0.02), ("embed", "mlp")),
                      (d, 4 * d), jnp.float32)
    w_proj = self.param("c_proj", nn.with_logical_partitioning(_normal(0.02), ("mlp", "embed")),
                        (4 * d, d), jnp.float32)
    h_BxLxF = x_BxLxD @ w_fc.astype(dtype)
    h_BxLxF = _constrain(h_BxLxF * jax.nn.sigmoid(1.702 * h_BxLxF), ("batch", "length", "mlp"))
    return h_BxLxF @ w_proj.astype(dtype)


class Block(nn.Module):
  """Pre-norm GPT-2 block: a = h + Attn(ln_1(h)); h = a + MLP(ln_2(a))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxLxD):
    dtype = jnp.dtype(self.cfg.dtype)
    a_BxLxD = h_BxLxD + Attention(self.cfg, name="attn")(RMSNorm(dtype, name="ln_1")(h_BxLxD))
    out_BxLxD = a_BxLxD + MLP(self.cfg, name="mlp")(RMSNorm(dtype, name="ln_2")(a_BxLxD))
    return _constrain(out_BxLxD, ("batch", "length", "embed"))


class IGPT(nn.Module):
  """iGPT decoder. Call with int tokens [B, L] (L <= seq_len) in [0, vocab_size).

  `keep_BxL` (BERT only): False where a token is masked; its embedding is zeroed.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, keep_BxL=None):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    batch, length = tokens_BxL.shape
    if length > cfg.seq_len:
      raise ValueError(f"got {length} tokens but the model has {cfg.seq_len} positions.")
    wte = self.param("wte", nn.with_logical_partitioning(_normal(0.02), ("vocab", "embed")),
                     (cfg.vocab_size, cfg.d_model), jnp.float32)
    wpe = self.param("wpe", nn.with_logical_partitioning(_normal(0.01), ("length", "embed")),
                     (cfg.seq_len, cfg.d_model), jnp.float32)
    x_BxLxD = jnp.take(wte, tokens_BxL, axis=0)
    if cfg.causal:
      # Prepend SOS and drop the last pixel, so logit i predicts token i (no shift in the loss).
      sos = self.param("sos", nn.with_logical_partitioning(_normal(0.02), ("embed",)),
                       (cfg.d_model,), jnp.float32)
      sos_Bx1xD = jnp.broadcast_to(sos, (batch, 1, cfg.d_model))
      x_BxLxD = jnp.concatenate([sos_Bx1xD, x_BxLxD[:, :-1]], axis=1)
    elif keep_BxL is not None:
      x_BxLxD = x_BxLxD * keep_BxL[..., None].astype(x_BxLxD.dtype)
    h_BxLxD = (x_BxLxD + wpe[:length]).astype(dtype)
    h_BxLxD = _constrain(h_BxLxD, ("batch", "length", "embed"))

    hidden = {"embed": h_BxLxD}
    block_cls = nn.remat(Block) if cfg.remat else Block
    for i in range(cfg.num_layers):
      h_BxLxD = block_cls(cfg, name=f"h_{i}")(h_BxLxD)
      hidden[f"block_{i}"] = h_BxLxD
    h_BxLxD = RMSNorm(dtype, name="ln_f")(h_BxLxD)
    hidden["ln_f"] = h_BxLxD

    # Untied output head, as in the original (`wtet`).
    wtet = self.param("wtet", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab", "embed")),
                      (cfg.vocab_size, cfg.d_model), jnp.float32)
    logits_BxLxV = jnp.einsum("bld,vd->blv", h_BxLxD, wtet.astype(dtype))
    logits_BxLxV = _constrain(logits_BxLxV.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits_BxLxV, hidden


def init_params(cfg: ModelConfig, rng) -> dict:
  """Fresh params (plain float32 arrays, partitioning metadata stripped)."""
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  return nn.meta.unbox(IGPT(cfg).init(rng, tokens))["params"]


def apply(cfg: ModelConfig, params, tokens_BxL, keep_BxL=None):
  """Pure forward pass: returns (logits_BxLxV float32, hidden dict)."""
  return IGPT(cfg).apply({"params": params}, tokens_BxL, keep_BxL)


def logical_axes(cfg: ModelConfig):
  """The params pytree with each leaf replaced by its tuple of logical axis names."""
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda: IGPT(cfg).init(jax.random.key(0), tokens))["params"]
  return nn.get_partition_spec(boxed)
