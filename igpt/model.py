"""The iGPT transformer (Chen et al. 2020) as pure Flax Linen modules.

`init_params(cfg, rng)` gives the params pytree; `apply(cfg, params, tokens_BxL)` returns
`(logits_BxLxV, hidden)`, where logit i predicts token i (SOS is prepended inside the model)
and `hidden` maps names to activations, named like the params that produce them:

- ``"embed"``: the block input (SOS-shifted token embeddings + positions),
- ``"h_{i}"``: the residual stream after block i (the output of params ``h_{i}``; raw, not
  normalised),
- ``"ln_f"``: the final normalised stream the output head reads.

Decode mode (`init_cache`, `decode`) runs the same params one or a few positions at a time
over a key/value cache, for sampling.

Every param and activation carries logical axis names (``batch``, ``length``, ``embed``,
``heads``, ``kv``, ``mlp``, ``vocab``); `igpt.sharding` maps them to mesh axes. Without a mesh
they are no-ops, so the same module runs on one CPU. The kernels (attention implementations,
the MLP and norm with hand-written backward passes) live in `igpt.kernels`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from igpt import kernels
from igpt.errors import UserError

Dtype = Any
NORM_EPS = kernels.NORM_EPS
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of an iGPT model. `seq_len` = image_side**2."""

  num_layers: int
  d_model: int
  num_heads: int
  seq_len: int
  vocab_size: int = 512
  causal: bool = True  # False: bidirectional (the BERT objective: no mask, no SOS shift).
  dtype: str = "float32"  # compute dtype; params are always float32
  remat: bool = False  # rematerialise each block in the backward pass
  attention: str = "auto"  # auto | blocked | xla | cudnn | splash (kernels.resolve_attention)

  def __post_init__(self):
    for name in ("num_layers", "d_model", "num_heads", "seq_len", "vocab_size"):
      if getattr(self, name) < 1:
        raise UserError(f"model.{name}={getattr(self, name)} must be >= 1.")
    if self.d_model % self.num_heads:
      raise UserError(
          f"model.d_model={self.d_model} is not divisible by model.num_heads="
          f"{self.num_heads}; pick a head count that divides the width.")
    if self.dtype not in DTYPES:
      raise UserError(f"model.dtype={self.dtype!r}: use one of {list(DTYPES)}.")
    if self.attention not in kernels.ATTENTION_CHOICES:
      raise UserError(f"model.attention={self.attention!r} is unknown: use one of "
                      f"{list(kernels.ATTENTION_CHOICES)}.")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def image_side(self) -> int:
    """Pixels per image side (the model reads square images of side**2 = seq_len tokens)."""
    side = math.isqrt(self.seq_len)
    if side * side != self.seq_len:
      raise UserError(f"seq_len={self.seq_len} is not a square: this model reads no image.")
    return side

  def to_dict(self) -> dict:
    """The fields as JSON-ready values (stored beside the weights: `from_dict` rebuilds it)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: dict) -> "ModelConfig":
    """The model `to_dict` describes; unknown fields (a newer igpt's) are refused."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise UserError(f"the stored model has fields {unknown} this igpt does not know (written "
                      "by a newer version?); upgrade igpt to read it.")
    return cls(**fields)

  @classmethod
  def from_config(cls, model_config, *, causal: bool, vocab_size: int) -> "ModelConfig":
    """Builds from a run config's `model` section; `causal` comes from the objective and
    `vocab_size` from `model.vocab_size` or the palette (see `igpt.spec.resolve`)."""
    return cls(num_layers=model_config.num_layers, d_model=model_config.d_model,
               num_heads=model_config.num_heads, seq_len=model_config.image_side**2,
               vocab_size=vocab_size, causal=causal, dtype=model_config.dtype,
               remat=model_config.remat, attention=model_config.attention)

  def attention_implementation(self, backend: str | None = None) -> str:
    """The attention kernel this config runs on `backend` (default: JAX's)."""
    return kernels.resolve_attention(self.attention, self.dtype, self.head_dim, self.seq_len,
                                     backend or jax.default_backend())


def param_count(cfg: ModelConfig) -> int:
  """Parameters of `cfg` in the original (bias-free) layout, counted without allocating."""
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  shapes = jax.eval_shape(lambda t: IGPT(cfg).init(jax.random.key(0), t), tokens)
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
    return kernels.rms_norm(x.astype(jnp.float32), g).astype(self.dtype)


class Attention(nn.Module):
  """Multi-head causal (or bidirectional) attention; `decode` keeps a key/value cache."""

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, start):
    cfg = self.cfg
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)

    def weight(name, stddev):
      return self.param(name, nn.with_logical_partitioning(_normal(stddev), ("embed", "heads", "kv")),
                        (d, h, hd), jnp.float32).astype(dtype)

    if self.decode:
      # One matmul for a decode step's few rows (a small model's step is bound by the number
      # of kernels it runs): decode reads the fused `qkv` weight of `decode_params`, made once
      # outside a sampling loop (XLA does not hoist a concatenation out of the loop itself).
      w_qkv = self.param("qkv", _normal(1 / math.sqrt(d)), (d, 3 * h, hd), jnp.float32)
      qkv_BxLx3HxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, w_qkv.astype(dtype))
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = jnp.split(qkv_BxLx3HxK, 3, axis=2)
    else:
      # Three matmuls, not one fused [d, 3H, hd]: concatenating head-sharded weights would
      # move them between devices under tensor parallelism.
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
          jnp.einsum("bld,dhk->blhk", x_BxLxD, weight(name, 1 / math.sqrt(d)))
          for name in ("q", "k", "v"))
    names = ("batch", "length", "heads", "kv")
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (_constrain(t, names) for t in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    if self.decode:
      o_BxLxHxK = self._cached(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, start)
    else:
      o_BxLxHxK = kernels.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, cfg.causal,
                                    cfg.attention_implementation())
    o_BxLxHxK = _constrain(o_BxLxHxK, names)
    w_out = self.param(
        "c_proj",
        nn.with_logical_partitioning(_normal(1 / math.sqrt(d * cfg.num_layers)), ("heads", "kv", "embed")),
        (h, hd, d), jnp.float32)
    return jnp.einsum("blhk,hkd->bld", o_BxLxHxK, w_out.astype(dtype))

  def _cached(self, q_BxCxHxK, k_BxCxHxK, v_BxCxHxK, start):
    """Writes this chunk's keys/values at [start, start+C) and attends over the cache.

    The cache is [B, H, S, K] (heads before positions) so both attention matmuls read it in
    place; S is whatever length the given cache has (`init_cache(..., length)`), which lets a
    sampler attend only over the part that is filled so far.
    """
    batch, _, h, hd = k_BxCxHxK.shape
    shape, dtype = (batch, h, self.cfg.seq_len, hd), k_BxCxHxK.dtype
    cache_k = self.variable("cache", "k", jnp.zeros, shape, dtype)
    cache_v = self.variable("cache", "v", jnp.zeros, shape, dtype)
    out_BxCxHxK = kernels.cached_attention(q_BxCxHxK, k_BxCxHxK, v_BxCxHxK, cache_k.value,
                                           cache_v.value, start)
    # Written after the read above and made to depend on it (the `where` only differs once
    # the output is already NaN): XLA then updates the loop-carried cache in place. Without
    # the dependency it cannot order the read before the write and copies the cache twice
    # per step.
    after_read = jnp.isnan(out_BxCxHxK[0, 0, 0, 0])
    at = (0, 0, start, 0)
    for cache, new_BxCxHxK in ((cache_k, k_BxCxHxK), (cache_v, v_BxCxHxK)):
      new_BxHxCxK = jnp.swapaxes(new_BxCxHxK, 1, 2).astype(cache.value.dtype)
      new_BxHxCxK = jnp.where(after_read, jnp.zeros_like(new_BxHxCxK), new_BxHxCxK)
      cache.value = jax.lax.dynamic_update_slice(cache.value, new_BxHxCxK, at)
    return out_BxCxHxK


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
    return kernels.mlp(x_BxLxD, w_fc.astype(dtype), w_proj.astype(dtype))


class Block(nn.Module):
  """Pre-norm GPT-2 block: a = h + Attn(ln_1(h)); h = a + MLP(ln_2(a))."""

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, h_BxLxD, start):
    dtype = jnp.dtype(self.cfg.dtype)
    attn = Attention(self.cfg, self.decode, name="attn")
    a_BxLxD = h_BxLxD + attn(RMSNorm(dtype, name="ln_1")(h_BxLxD), start)
    out_BxLxD = a_BxLxD + MLP(self.cfg, name="mlp")(RMSNorm(dtype, name="ln_2")(a_BxLxD))
    return _constrain(out_BxLxD, ("batch", "length", "embed"))


class IGPT(nn.Module):
  """iGPT decoder over int tokens in [0, vocab_size).

  Full pass (`decode=False`): `tokens_BxL` are the image's first L tokens; logit i predicts
  token i. `keep_BxL` (non-causal models only): False where a token is masked (embedding zeroed).

  Decode mode (`decode=True`, causal only): `tokens_BxC` are the tokens *before* positions
  start .. start+C-1 (token p-1 for position p; ignored at position 0, which reads SOS), so
  logit i predicts the token at position start+i. Keys and values go to the `cache` collection.
  """

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BxL, keep_BxL=None, start=0):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    batch, length = tokens_BxL.shape
    if length > cfg.seq_len:
      raise UserError(f"got {length} tokens but the model has {cfg.seq_len} positions.")
    if self.decode and not cfg.causal:
      raise UserError("decode mode needs a causal (autoregressive) model.")
    wte = self.param("wte", nn.with_logical_partitioning(_normal(0.02), ("vocab", "embed")),
                     (cfg.vocab_size, cfg.d_model), jnp.float32)
    wpe = self.param("wpe", nn.with_logical_partitioning(_normal(0.01), ("length", "embed")),
                     (cfg.seq_len, cfg.d_model), jnp.float32)
    if cfg.causal:
      sos = self.param("sos", nn.with_logical_partitioning(_normal(0.02), ("embed",)),
                       (cfg.d_model,), jnp.float32)
      if self.decode:
        prev_BxL = tokens_BxL
      else:
        # Input p is token p-1: logit i then predicts token i (no shift in the loss).
        prev_BxL = jnp.pad(tokens_BxL[:, :-1], ((0, 0), (1, 0)))
      position_L = start + jnp.arange(length)
      x_BxLxD = jnp.where((position_L == 0)[None, :, None], sos,
                          jnp.take(wte, prev_BxL, axis=0))
    else:
      x_BxLxD = jnp.take(wte, tokens_BxL, axis=0)
      if keep_BxL is not None:
        x_BxLxD = x_BxLxD * keep_BxL[..., None].astype(x_BxLxD.dtype)
    wpe_LxD = jax.lax.dynamic_slice_in_dim(wpe, start, length, axis=0)
    h_BxLxD = (x_BxLxD + wpe_LxD).astype(dtype)
    h_BxLxD = _constrain(h_BxLxD, ("batch", "length", "embed"))

    hidden = {"embed": h_BxLxD}
    block_cls = nn.remat(Block) if cfg.remat and not self.decode else Block
    for i in range(cfg.num_layers):
      h_BxLxD = block_cls(cfg, self.decode, name=f"h_{i}")(h_BxLxD, start)
      hidden[f"h_{i}"] = h_BxLxD
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


def init_cache(cfg: ModelConfig, batch_size: int, length: int | None = None) -> dict:
  """An empty key/value cache for `decode`: per block, k and v [B, H, length, K] zeros in the
  compute dtype. `length` (default `seq_len`) bounds the positions it can hold; `pad_cache`
  grows it."""
  length = cfg.seq_len if length is None else length
  if not 1 <= length <= cfg.seq_len:
    raise UserError(f"cache length {length} must be in [1, {cfg.seq_len}].")
  # The layout `Attention._cached` declares, built directly: tracing the model for its
  # shapes took longer than sampling a whole small image.
  shape = (batch_size, cfg.num_heads, length, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, cfg.dtype)
  return {f"h_{i}": {"attn": {"k": zeros(), "v": zeros()}} for i in range(cfg.num_layers)}


def pad_cache(cache: dict, length: int) -> dict:
  """`cache` grown (zero-padded at the end) to hold `length` positions."""
  def grow(x):
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
  return jax.tree.map(grow, cache)


def decode(cfg: ModelConfig, params, cache, prev_tokens_BxC, start):
  """Runs positions start .. start+C-1 through the cache: returns (logits_BxCxV, new cache).

  `params` are `decode_params(params)` (a sampling loop makes them once), or plain params,
  fused here on every call. `prev_tokens_BxC[:, i]` is the token at position start+i-1 (any
  value at position 0, which reads SOS); logit i predicts the token at position start+i.
  `start` may be traced. Feeding a prompt t_0..t_{n-1} as [0, t_0, ..., t_{n-1}] from start 0
  (n+1 positions) leaves the cache ready and logit n predicting the first unknown token.
  """
  if "qkv" not in params["h_0"]["attn"]:
    params = decode_params(params)
  (logits_BxCxV, _), mutated = IGPT(cfg, decode=True).apply(
      {"params": params, "cache": cache}, prev_tokens_BxC, None, start, mutable=["cache"])
  return logits_BxCxV, mutated["cache"]


def decode_params(params) -> dict:
  """The params `decode` runs on: per block, `attn/q`, `k`, `v` replaced by their
  concatenation `attn/qkv` [d, 3H, K]."""
  blocks = {}
  for name, block in params.items():
    if name.startswith("h_"):
      attn = dict(block["attn"])
      qkv = jnp.concatenate([attn.pop("q"), attn.pop("k"), attn.pop("v")], axis=1)
      block = {**block, "attn": {**attn, "qkv": qkv}}
    blocks[name] = block
  return blocks


def restrict_vocab(cfg: ModelConfig, params, vocab_size: int) -> tuple[ModelConfig, dict]:
  """The model over its first `vocab_size` tokens only: the embedding and output-head rows of
  the rest dropped, so it can neither read nor predict them (its softmax is the original's
  renormalised over the tokens kept)."""
  if not 1 <= vocab_size <= cfg.vocab_size:
    raise UserError(f"vocab_size={vocab_size} must be in [1, {cfg.vocab_size}].")
  if vocab_size == cfg.vocab_size:
    return cfg, params
  params = {**params, "wte": params["wte"][:vocab_size], "wtet": params["wtet"][:vocab_size]}
  return dataclasses.replace(cfg, vocab_size=vocab_size), params


def logical_axes(cfg: ModelConfig):
  """The params pytree with each leaf replaced by its tuple of logical axis names."""
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda t: IGPT(cfg).init(jax.random.key(0), t), tokens)["params"]
  return nn.get_partition_spec(boxed)
