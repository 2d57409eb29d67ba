"""Compute kernels of the iGPT block, kept apart from the model's definition.

- `attention(q, k, v, causal, implementation)`: one entry over three implementations:
  "blocked" (ours, exact softmax, fastest on CPU), "xla" (`jax.nn.dot_product_attention`'s XLA
  path) and "cudnn" (cuDNN flash attention on NVIDIA GPUs, bfloat16/float16 only).
  `resolve_attention` turns the config's "auto" into one of them for the running backend.
- `mlp` and `rms_norm`: the block's MLP and norm with hand-written backward passes (same math
  as autodiff; they spare XLA:CPU large transposed copies).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from igpt.errors import UserError

NORM_EPS = 1e-5
ATTENTION_CHOICES = ("auto", "blocked", "xla", "cudnn")
# cuDNN's flash attention (jax.nn.dot_product_attention, implementation="cudnn") takes
# head sizes up to 128 (256 on Hopper) in multiples of 8, in half precision only.
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MAX_HEAD_DIM = 128


def resolve_attention(requested: str, dtype: str, head_dim: int, backend: str) -> str:
  """The attention implementation to run: `requested`, or what "auto" means on `backend`.

  auto: "blocked" on CPU; on GPU "cudnn" when the compute dtype is half precision and the head
  size suits cuDNN, else "xla"; "xla" elsewhere (TPU). An explicit choice that cannot run
  raises ValueError naming `model.attention`.
  """
  if requested not in ATTENTION_CHOICES:
    raise UserError(f"model.attention={requested!r} is unknown: use one of "
                    f"{list(ATTENTION_CHOICES)}.")
  cudnn_ok = dtype in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM
  if requested == "auto":
    if backend == "cpu":
      return "blocked"
    return "cudnn" if backend == "gpu" and cudnn_ok else "xla"
  if requested == "cudnn":
    if backend != "gpu":
      raise UserError(f"model.attention='cudnn' needs an NVIDIA GPU, but JAX runs on "
                      f"{backend!r}; use 'auto', 'xla' or 'blocked'.")
    if not cudnn_ok:
      raise UserError(
          f"model.attention='cudnn' needs model.dtype bfloat16 or float16 and a head size "
          f"(d_model / num_heads) that is a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}; got "
          f"dtype {dtype!r} and head size {head_dim}. Use 'auto' or 'xla'.")
  return requested


def attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal: bool, implementation: str):
  """Softmax attention scaled by 1/sqrt(K) with a resolved `implementation` (not "auto")."""
  if implementation == "blocked":
    return blocked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal)
  if implementation not in ("xla", "cudnn"):
    raise ValueError(f"attention implementation {implementation!r} is not resolved; call "
                     "resolve_attention first.")
  return jax.nn.dot_product_attention(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale=1 / math.sqrt(q_BxLxHxK.shape[-1]),
      is_causal=causal, implementation=implementation)


def cached_attention(q_BxCxHxK, k_BxCxHxK, v_BxCxHxK, cache_k_BxHxSxK, cache_v_BxHxSxK, start):
  """Causal attention of C queries at positions start.. start+C-1 over a key/value cache.

  The chunk's own keys/values (`k`, `v`) come in apart from the cache, which holds positions
  before `start` (anything at or past it is masked): the caller writes them into the cache
  after this reads it, so XLA updates the loop-carried cache in place instead of copying it
  every step. The cache is [B, H, S, K]: with heads ahead of positions both matmuls are plain
  batched GEMMs over it. Scores in float32.
  """
  dtype = q_BxCxHxK.dtype
  scale = 1 / math.sqrt(q_BxCxHxK.shape[-1])
  f32 = lambda x: x.astype(jnp.float32)
  q_BxHxCxK = jnp.swapaxes(f32(q_BxCxHxK), 1, 2) * scale
  k_BxHxCxK, v_BxHxCxK = (jnp.swapaxes(f32(x), 1, 2) for x in (k_BxCxHxK, v_BxCxHxK))
  num_q, num_cached = q_BxCxHxK.shape[1], cache_k_BxHxSxK.shape[2]
  s_BxHxCxC = jnp.einsum("bhck,bhjk->bhcj", q_BxHxCxK, k_BxHxCxK)
  s_BxHxCxC = jnp.where(_causal_mask(num_q, num_q, 0), s_BxHxCxC, -1e30)
  if isinstance(start, int) and start == 0:  # a prefill from the start: nothing cached yet
    o_BxHxCxK = jnp.einsum("bhcj,bhjk->bhck", jax.nn.softmax(s_BxHxCxC, axis=-1), v_BxHxCxK)
    return jnp.swapaxes(o_BxHxCxK, 1, 2).astype(dtype)
  cached_S = jax.lax.broadcasted_iota(jnp.int32, (1, num_cached), 1) < start
  s_BxHxCxS = jnp.einsum("bhck,bhsk->bhcs", q_BxHxCxK, f32(cache_k_BxHxSxK))
  s_BxHxCxS = jnp.where(cached_S, s_BxHxCxS, -1e30)
  m_BxHxCx1 = jnp.maximum(jnp.max(s_BxHxCxS, axis=-1, keepdims=True),
                          jnp.max(s_BxHxCxC, axis=-1, keepdims=True))
  e_BxHxCxS = jnp.exp(s_BxHxCxS - m_BxHxCx1)
  e_BxHxCxC = jnp.exp(s_BxHxCxC - m_BxHxCx1)
  total_BxHxCx1 = jnp.sum(e_BxHxCxS, axis=-1, keepdims=True) + jnp.sum(e_BxHxCxC, axis=-1,
                                                                        keepdims=True)
  # Normalise the [C, K] output rather than the [C, S] probabilities: one pass fewer over S.
  o_BxHxCxK = (jnp.einsum("bhcs,bhsk->bhck", e_BxHxCxS, f32(cache_v_BxHxSxK))
               + jnp.einsum("bhcj,bhjk->bhck", e_BxHxCxC, v_BxHxCxK)) / total_BxHxCx1
  return jnp.swapaxes(o_BxHxCxK, 1, 2).astype(dtype)


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
def mlp(x_BxLxD, w_fc, w_proj):
  """quick_gelu(x @ w_fc) @ w_proj, with a hand-written backward (see `_mlp_bwd`)."""
  return _mlp_fwd(x_BxLxD, w_fc, w_proj)[0]


def _mlp_fwd(x_BxLxD, w_fc, w_proj):
  h_BxLxF = nn.with_logical_constraint(x_BxLxD @ w_fc, ("batch", "length", "mlp"))
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


mlp.defvjp(_mlp_fwd, _mlp_bwd)


@jax.custom_vjp
def rms_norm(x, g):
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


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
