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
import functools
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
      raise ValueError(f"model.dtype={self.dtype!r}: use 'float32', 'bfloat16' or 'float16'.")

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


# Query rows per block of the blocked attention. On a 2-core AVX-512 CPU, 128 was fastest:
# attention fwd+bwd at head_dim 32 took 17% longer with 64 and 60% longer with 256; the
# iGPT-S train step was 22% slower with 64 and the same with 256.
ATTENTION_BLOCK = 128


def _causal_mask(num_q, num_k, q_start):
  """True where query q_start + i may attend to key j (j <= q_start + i)."""
  q_i = jax.lax.broadcasted_iota(jnp.int32, (num_q, num_k), 0) + q_start
  k_j = jax.lax.broadcasted_iota(jnp.int32, (num_q, num_k), 1)
  return k_j <= q_i


def _attention_fwd_parts(q, k, v, q_start, causal):
  """q [B,H,C,K] (pre-scaled), k/v [B,H,S,K] -> (o, e, l) with e = exp(s - max), l = sum e."""
  s = jnp.einsum("bhqk,bhsk->bhqs", q, k)
  if causal:
    s = jnp.where(_causal_mask(q.shape[2], k.shape[2], q_start), s, -1e30)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.exp(s - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  # Normalise the [C,K] output rather than the [C,S] probabilities: one pass fewer over S.
  return jnp.einsum("bhqs,bhsk->bhqk", e, v) / l, e, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_block(q, k, v, q_start, causal):
  return _attention_fwd_parts(q, k, v, q_start, causal)[0]


def _attention_block_fwd(q, k, v, q_start, causal):
  o, e, l = _attention_fwd_parts(q, k, v, q_start, causal)
  return o, (q, k, v, o, e, l)


def _attention_block_bwd(q_start, causal, res, do):
  # The softmax backward with the [C,S] passes cut to the minimum: rowsum(p * dp) is
  # rowsum(do * o) (a [C,K] product), and 1/l is folded into do instead of into e.
  q, k, v, o, e, l = res
  do_l = do / l
  dv = jnp.einsum("bhqs,bhqk->bhsk", e, do_l)
  dp = jnp.einsum("bhqk,bhsk->bhqs", do_l, v)
  delta = jnp.sum(do * o, axis=-1, keepdims=True) / l
  ds = e * (dp - delta)
  dq = jnp.einsum("bhqs,bhsk->bhqk", ds, k)
  dk = jnp.einsum("bhqs,bhqk->bhsk", ds, q)
  return dq, dk, dv


_attention_block.defvjp(_attention_block_fwd, _attention_block_bwd)


def blocked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal, block=ATTENTION_BLOCK):
  """Softmax attention for CPUs: exact (no online softmax), with a lean custom backward.

  Causal queries are taken `block` rows at a time against only the keys up to the block's
  last row, which skips nearly half of the L x L scores and their exp/backward passes.
  """
  scale = 1 / math.sqrt(q_BxLxHxK.shape[-1])
  # Scores, softmax and their gradients in float32 whatever the compute dtype.
  dtype = q_BxLxHxK.dtype
  q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  q = q * scale
  length = q.shape[2]
  if not causal or length <= block:
    o_BxHxLxK = _attention_block(q, k, v, 0, causal)
  else:
    outs = []
    for start in range(0, length, block):
      end = min(start + block, length)
      outs.append(_attention_block(q[:, :, start:end], k[:, :, :end], v[:, :, :end], start, causal))
    o_BxHxLxK = jnp.concatenate(outs, axis=2)
  return jnp.swapaxes(o_BxHxLxK, 1, 2).astype(dtype)


def _quick_gelu(h):
  return h * jax.nn.sigmoid(1.702 * h)


@jax.custom_vjp
def _mlp(x_BxLxD, w_fc, w_proj):
  """quick_gelu(x @ w_fc) @ w_proj, with a hand-written backward (see `_mlp_bwd`)."""
  return _mlp_fwd(x_BxLxD, w_fc, w_proj)[0]


def _mlp_fwd(x_BxLxD, w_fc, w_proj):
  h_BxLxF = _constrain(x_BxLxD @ w_fc, ("batch", "length", "mlp"))
  return _quick_gelu(h_BxLxF) @ w_proj, (x_BxLxD, h_BxLxF, w_fc, w_proj)


def _mlp_bwd(res, dy_BxLxD):
  # Autodiff's backward made XLA:CPU transpose the [B*L, 4d] gradient (a slow strided copy)
  # before the weight-gradient matmul; this one contracts the token axes directly and runs
  # the whole MLP forward + backward ~2x faster on CPU. Same math, recomputes the sigmoid.
  x_BxLxD, h_BxLxF, w_fc, w_proj = res
  sig_BxLxF = jax.nn.sigmoid(1.702 * h_BxLxF)
  a_BxLxF = h_BxLxF * sig_BxLxF
  dw_proj = jnp.einsum("blf,bld->fd", a_BxLxF, dy_BxLxD)
  da_BxLxF = dy_BxLxD @ w_proj.T
  dh_BxLxF = da_BxLxF * (sig_BxLxF + 1.702 * a_BxLxF * (1 - sig_BxLxF))
  dw_fc = jnp.einsum("bld,blf->df", x_BxLxD, dh_BxLxF)
  return dh_BxLxF @ w_fc.T, dw_fc, dw_proj


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


@jax.custom_vjp
def _rms_norm(x, g):
  """x * rsqrt(mean(x^2) + eps) * g over the last axis (float32), hand-written backward."""
  return _rms_norm_fwd(x, g)[0]


def _rms_norm_fwd(x, g):
  r = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + NORM_EPS)
  return x * r * g, (x, r, g)


def _rms_norm_bwd(res, dy):
  # One fused pass per output instead of autodiff's chain of broadcasts and reductions
  # (the norms' backward was ~10% of the iGPT-S step on CPU).
  x, r, g = res
  dyg = dy * g
  dg = jnp.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)
  dx = r * (dyg - x * (r * r) * jnp.mean(dyg * x, axis=-1, keepdims=True))
  return dx, dg


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nn.Module):
  """iGPT's norm: x * rsqrt(mean(x^2) + eps) * g, no mean-centring, no bias."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    g = self.param("g", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                   (x.shape[-1],), jnp.float32)
    # Statistics in float32 even under bfloat16 compute.
    return _rms_norm(x.astype(jnp.float32), g).astype(self.dtype)


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

    # Three matmuls, not one fused [d, 3H, hd]: concatenating head-sharded weights would
    # move them between devices under tensor parallelism.
    q_BxLxHxK = proj("q", 1 / math.sqrt(d))
    k_BxLxHxK = proj("k", 1 / math.sqrt(d))
    v_BxLxHxK = proj("v", 1 / math.sqrt(d))
    names = ("batch", "length", "heads", "kv")
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (_constrain(t, names) for t in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    if jax.default_backend() == "cpu":
      o_BxLxHxK = blocked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, cfg.causal)
    else:
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
    return _mlp(x_BxLxD, w_fc.astype(dtype), w_proj.astype(dtype))


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
