"""Compute kernels of the iGPT block, kept apart from the model's definition.

- `attention(q, k, v, causal, implementation)`: one entry over four implementations:
  "blocked" (ours, exact softmax, fastest on CPU), "xla" (`jax.nn.dot_product_attention`'s XLA
  path), "cudnn" (cuDNN flash attention on NVIDIA GPUs, bfloat16/float16 only) and "splash"
  (JAX's Pallas splash attention kernel for TPUs, float32/bfloat16).
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
ATTENTION_CHOICES = ("auto", "blocked", "xla", "cudnn", "splash")
# cuDNN's flash attention (jax.nn.dot_product_attention, implementation="cudnn") takes
# head sizes up to 128 (256 on Hopper) in multiples of 8, in half precision only.
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MAX_HEAD_DIM = 128
# The splash kernel's query and key tiles (JAX's default block sizes, not tuned on a TPU):
# it needs the sequence length to be a multiple of them. It takes any head size, also ones
# off the TPU's 128 lanes (64, 96, 192). TPUs do not compute in float16, so that stays with
# XLA.
SPLASH_BLOCK = 128
_SPLASH_DTYPES = ("float32", "bfloat16")


def resolve_attention(requested: str, dtype: str, head_dim: int, seq_len: int,
                      backend: str) -> str:
  """The attention implementation to run: `requested`, or what "auto" means on `backend`.

  auto: "blocked" on CPU; on GPU "cudnn" when the compute dtype is half precision and the head
  size suits cuDNN, else "xla"; on TPU "splash" when the sequence length is a multiple of
  `SPLASH_BLOCK` and the dtype float32 or bfloat16, else "xla"; "xla" elsewhere. An explicit
  choice that cannot run raises UserError naming `model.attention`. `requested` is one of
  ATTENTION_CHOICES (`ModelConfig` checks the name).
  """
  cudnn_ok = dtype in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM
  splash_ok = dtype in _SPLASH_DTYPES and seq_len % SPLASH_BLOCK == 0
  if requested == "auto":
    if backend == "cpu":
      return "blocked"
    if backend == "tpu":
      return "splash" if splash_ok else "xla"
    return "cudnn" if backend == "gpu" and cudnn_ok else "xla"
  # A forced kernel: the backend it needs, and what it needs of the model there.
  needs = {
      "cudnn": ("gpu", "an NVIDIA GPU", cudnn_ok,
                f"model.dtype bfloat16 or float16 and a head size (d_model / num_heads) that is "
                f"a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}; got dtype {dtype!r} and head "
                f"size {head_dim}"),
      "splash": ("tpu", "a TPU", splash_ok,
                 f"a sequence length (model.image_side squared) that is a multiple of "
                 f"{SPLASH_BLOCK} (an image side that is a multiple of 16) and model.dtype "
                 f"float32 or bfloat16; got length {seq_len} and dtype {dtype!r}"),
  }
  if requested in needs:
    needed_backend, device, fits, requirement = needs[requested]
    if backend != needed_backend:
      raise UserError(f"model.attention={requested!r} needs {device}, but JAX runs on "
                      f"{backend!r}; use 'auto', 'xla' or 'blocked'.")
    if not fits:
      raise UserError(f"model.attention={requested!r} needs {requirement}. Use 'auto' or 'xla'.")
  return requested


def attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal: bool, implementation: str):
  """Softmax attention scaled by 1/sqrt(K) with a resolved `implementation` (not "auto")."""
  if implementation == "blocked":
    return blocked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal)
  if implementation == "splash":
    return splash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal)
  if implementation not in ("xla", "cudnn"):
    raise ValueError(f"attention implementation {implementation!r} is not resolved; call "
                     "resolve_attention first.")
  return jax.nn.dot_product_attention(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale=1 / math.sqrt(q_BxLxHxK.shape[-1]),
      is_causal=causal, implementation=implementation)


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, num_heads: int, causal: bool, interpret: bool):
  # Imported here: only TPU runs (and the CPU tests, in interpret mode) need Pallas' TPU
  # kernels. Built once per shape, as the mask's block tables are worked out in numpy; made
  # concrete even when first asked for inside a trace, so the cache holds no tracers.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  shape = (length, length)
  mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * num_heads), head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _divisible_spec(spec, shape, mesh):
  """`spec` with each dimension left whole where its mesh axes do not divide it."""
  fitted = []
  for dim, axes in zip(shape, spec):
    names = axes if isinstance(axes, tuple) else () if axes is None else (axes,)
    fitted.append(axes if dim % math.prod(mesh.shape[n] for n in names) == 0 else None)
  return jax.sharding.PartitionSpec(*fitted)


def splash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal, interpret=False):
  """Softmax attention through JAX's Pallas splash kernel for TPUs.

  The kernel takes one example's [H, L, K] and no scale: the batch is vmapped over it and q
  scaled first. L must be a multiple of `SPLASH_BLOCK`. Under a device mesh it runs in a
  shard_map over the batch and head axes of the logical rules: XLA cannot partition a Pallas
  call, and would gather every input whole onto each device instead. `interpret` runs the
  kernel's body through Pallas' interpreter on any backend (slow: for tests).
  """
  length = q_BxLxHxK.shape[1]
  if length % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs a length that is a multiple of {SPLASH_BLOCK}; "
                     f"got {length}.")
  scale = 1 / math.sqrt(q_BxLxHxK.shape[-1])

  def run(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK):
    kernel = _splash_kernel(length, q_BxLxHxK.shape[2], causal, interpret)
    q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = (jnp.swapaxes(x, 1, 2)
                                       for x in (q_BxLxHxK * scale, k_BxLxHxK, v_BxLxHxK))
    return jnp.swapaxes(jax.vmap(kernel)(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK), 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
  # Whole sequences and head vectors per device, whatever the rules say of `length`.
  spec = _divisible_spec(nn.logical_to_mesh_axes(("batch", None, "heads", None)),
                         q_BxLxHxK.shape, mesh)
  # check_vma=False: the kernel's outputs declare no varying mesh axes, which the check needs.
  return jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)


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
