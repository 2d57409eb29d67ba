"""Sampling from a causal iGPT: sampling controls and a KV-cached, compiled sampler.

- `Settings`: temperature, top-k, top-p (nucleus) and greedy, checked by `Settings.check`.
- `filter_logits` / `sample_token`: the controls applied to one position's logits.
- `sample_many(cfg, params, prompts_BxN, settings, seed, batch_size)`: any number of prompts
  in fixed-size batches over every device, with a progress line (what sample.py runs).
- `sample(cfg, params, prompt_BxN, rng, settings, ...)`: completes every image after its
  prompt (its tokens checked by `check_prompt`) or from nothing and returns the tokens
  [B, L]. The prompt goes through the model in one pass (prefill); then every remaining
  position runs inside a `jax.lax.fori_loop` under `jax.jit`, one token per image per step
  over the key/value cache.

The loop runs in a few segments, each compiled for a fixed cache length (the end of the
segment): a step attends only over the part of the cache that can be filled, not over the whole
image, and the caller gets a progress callback between segments. The random key of position p
is `fold_in(rng, p)`, so the tokens are a pure function of (params, prompt, rng, settings),
whatever the segmentation or the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from igpt import model, sharding
from igpt.errors import UserError
from igpt.model import ModelConfig

# Cache lengths grow in segments of about seq_len / SEGMENTS positions (at least
# MIN_SEGMENT_LEN): more segments read less of the cache per step but compile more loops.
# Four read on average 5/8 of the full cache per step (the ideal is 1/2). On a 2-core CPU,
# 8 layers / width 256 / batch 4 sampled 1,182 tokens/s with four segments (3.4 s to
# compile), 1,202 with eight (7.5 s) and 986 with sixteen (16.6 s).
SEGMENTS = 4
MIN_SEGMENT_LEN = 128


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a token is drawn from a position's logits (hashable: it is static under jit)."""

  temperature: float = 1.0  # logits are divided by it; ignored when greedy
  top_k: int = 0  # keep the k most likely tokens; 0 = all
  top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p
  greedy: bool = False  # always the most likely token (argmax)

  def check(self, vocab_size: int | None = None) -> "Settings":
    """Returns self; a UserError naming the bad setting otherwise."""
    if not self.greedy and not self.temperature > 0:
      raise UserError(f"temperature={self.temperature} must be > 0 (or set greedy=True for "
                      "the most likely token).")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p} must be in (0, 1] (1 = off).")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off).")
    if vocab_size is not None and self.top_k > vocab_size:
      raise UserError(f"top_k={self.top_k} exceeds the model's {vocab_size} tokens.")
    return self


def filter_logits(logits_BxV, temperature, top_k, top_p):
  """Temperature-scaled float32 logits with tokens outside top-k / top-p set to -inf.

  The controls are Python numbers (a `Settings`': a filter that is off is not traced at all)
  or traced arrays (the demo's per-request controls, where top_k 0 and top_p 1 keep every
  token); the kept tokens are the same either way. Ties at the k-th logit and at the top-p
  threshold are kept.
  """
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  vocab = logits_BxV.shape[-1]
  traced = isinstance(top_k, jax.Array) or isinstance(top_p, jax.Array)
  if not traced and not 0 < top_k < vocab and top_p >= 1:
    return logits_BxV  # nothing to filter: no sort inside the decode loop
  sorted_BxV = jax.lax.top_k(logits_BxV, vocab)[0]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, k - 1, 1, axis=1)
  logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  # Tokens sorted by probability, after top-k: keep each one whose more likely predecessors
  # hold less than p of the mass, i.e. the smallest prefix whose mass reaches p. The last
  # kept logit is the threshold.
  sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  kept_Bx1 = jnp.sum(before_BxV < top_p, axis=-1, keepdims=True)
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, kept_Bx1 - 1, axis=-1)
  threshold_Bx1 = jnp.where(top_p < 1, threshold_Bx1, -jnp.inf)
  return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def gumbel_noise(rng, batch: int, vocab_size: int, begin: int, end: int):
  """Gumbel noise float32 [end - begin, B, V]: row i is position begin+i's noise per token.

  Drawn up front, outside the decode loop: a threefry draw inside the loop costs a small
  model more than its layers on CPU. Position p's noise comes from `fold_in(rng, p)`, so it
  does not depend on how the positions are split into segments.
  """
  draw = lambda p: jax.random.gumbel(jax.random.fold_in(rng, p), (batch, vocab_size))
  return jax.vmap(draw)(jnp.arange(begin, end))


def sample_token(logits_BxV, gumbel_BxV, settings: Settings):
  """One token int32 [B] per row of logits, given Gumbel noise per row and token.

  Gumbel-max: argmax(logits / T + g) is distributed as softmax(logits / T), and it costs one
  reduction, where an inverse-CDF draw needs a softmax and a cumulative sum (a dozen small
  kernels per step on CPU). Tokens filtered out by top-k / top-p have -inf logits and are
  never chosen.
  """
  if settings.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered_BxV = filter_logits(logits_BxV, settings.temperature, settings.top_k, settings.top_p)
  return jnp.argmax(filtered_BxV + gumbel_BxV, axis=-1).astype(jnp.int32)


def segment_ends(seq_len: int, segment_len: int | None = None) -> list[int]:
  """Cache lengths of the loop's segments: multiples of `segment_len`, ending at seq_len."""
  if segment_len is None:
    segment_len = max(MIN_SEGMENT_LEN, math.ceil(seq_len / SEGMENTS))
  if segment_len < 1:
    raise UserError(f"segment_len={segment_len} must be >= 1.")
  return list(range(segment_len, seq_len, segment_len)) + [seq_len]


# ---------------------------------------------------------------------------------------------
# Compiled pieces


@functools.partial(jax.jit, static_argnums=(0, 3))
def prefill(cfg: ModelConfig, params, prompt_BxN, cache_len: int):
  """The cache after positions [0, N) of the prompt (their logits are not needed)."""
  cache = model.init_cache(cfg, prompt_BxN.shape[0], cache_len)
  prev_BxN = jnp.pad(prompt_BxN[:, :-1], ((0, 0), (1, 0)))
  return model.decode(cfg, params, cache, prev_BxN, 0)[1]


def decode_loop(cfg: ModelConfig, params, cache, tokens_BxL, noise_SxBxV, noise_begin, start,
                stop, choose):
  """Samples positions [start, stop) into tokens_BxL, one decode step each (to trace inside
  a jitted function): position p's token is `choose(logits_BxV, noise_SxBxV[p - noise_begin])`.
  Returns (cache, tokens_BxL)."""

  def step(p, carry):
    cache, tokens_BxL = carry
    prev_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxL, jnp.maximum(p - 1, 0), 1, axis=1)
    logits_Bx1xV, cache = model.decode(cfg, params, cache, prev_Bx1, p)
    token_B = choose(logits_Bx1xV[:, 0], noise_SxBxV[p - noise_begin])
    tokens_BxL = jax.lax.dynamic_update_slice_in_dim(tokens_BxL, token_B[:, None], p, axis=1)
    return cache, tokens_BxL

  return jax.lax.fori_loop(start, stop, step, (cache, tokens_BxL))


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8), donate_argnums=(3,))
def _segment(cfg: ModelConfig, params, cache, tokens_BxL, rng, start, begin: int, stop: int,
             settings: Settings):
  """Samples positions [start, stop) into tokens_BxL, growing the cache to `stop` first.

  `begin` <= start is the segment's static first position (start is later when a prompt
  ends inside the segment): the noise is drawn for [begin, stop).
  """
  choose = lambda logits_BxV, gumbel_BxV: sample_token(logits_BxV, gumbel_BxV, settings)
  noise_SxBxV = gumbel_noise(rng, tokens_BxL.shape[0], cfg.vocab_size, begin, stop)
  # The fused q|k|v weights are made once per segment, not per step.
  return decode_loop(cfg, model.decode_params(params), model.pad_cache(cache, stop), tokens_BxL,
                     noise_SxBxV, begin, start, stop, choose)


# ---------------------------------------------------------------------------------------------
# The sampler


def batch_mesh(devices=None):
  """A mesh over `devices` (default: all) that splits the batch over every one of them."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices), 1, 1), sharding.MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _place(params, prompt_BxN, tokens_BxL, mesh):
  """Params replicated and the batch split over the mesh's batch axes (None: as they are)."""
  if mesh is None:
    return params, prompt_BxN, tokens_BxL
  batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  return params, jax.device_put(prompt_BxN, batch), jax.device_put(tokens_BxL, batch)


def check_prompt(prompt_BxN, vocab_size: int) -> None:
  """A UserError unless the prompt is integer tokens [B, N] in [0, vocab_size).

  Checked once on the host, before anything is compiled: inside the model a token past the
  vocabulary reads another token's embedding (or NaN) and nothing says so.
  """
  prompt = np.asarray(prompt_BxN)
  if prompt.ndim != 2:
    raise UserError(f"prompt_BxN must be tokens [batch, positions]; got shape {prompt.shape}.")
  if not prompt.size:
    return
  if not (np.issubdtype(prompt.dtype, np.integer) and prompt.dtype != np.bool_):
    raise UserError(f"prompt_BxN must hold integer tokens in [0, {vocab_size}); got dtype "
                    f"{prompt.dtype}.")
  bad = (prompt < 0) | (prompt >= vocab_size)
  if not bad.any():
    return
  b, n = (int(i) for i in np.argwhere(bad)[0])
  value = int(prompt[b, n])
  if n == 0 and value == vocab_size:
    fix = (f"{value} is a start-of-sequence token, as at the front of transformers' ImageGPT "
           "input_ids: drop that first column (the model supplies its own start).")
  else:
    fix = "pass palette indices (igpt.palette.encode of the images with the model's palette)."
  raise UserError(f"prompt_BxN[{b}, {n}] = {value} is outside the model's tokens "
                  f"[0, {vocab_size}) ({int(bad.sum())} such values): {fix}")


def sample(cfg: ModelConfig, params, prompt_BxN, rng, settings: Settings = Settings(), *,
           batch_size: int | None = None, segment_len: int | None = None, mesh=None,
           progress: Callable[[int, int], None] | None = None):
  """Tokens int32 [B, seq_len]: the prompt's N tokens kept, the rest sampled.

  `prompt_BxN` is an int array of tokens in [0, vocab_size) (N may be 0; others raise a
  UserError naming the first bad one) or None for unconditional samples of `batch_size`
  images. `rng` is a JAX key. With `mesh` the batch is split over its batch
  axes (B must divide evenly) and params are replicated. `progress(done, total)` is called
  after the prefill and after each segment with the positions done so far.
  """
  if not cfg.causal:
    raise UserError("sampling needs a causal (autoregressive) model; this one is bidirectional.")
  settings = settings.check(cfg.vocab_size)
  if prompt_BxN is None:
    if not batch_size:
      raise UserError("give a prompt or a batch_size for unconditional samples.")
    prompt_BxN = np.zeros((batch_size, 0), np.int32)
  check_prompt(prompt_BxN, cfg.vocab_size)
  prompt_BxN = jnp.asarray(prompt_BxN, jnp.int32)
  batch, num_prompt = prompt_BxN.shape
  length = cfg.seq_len
  if num_prompt > length:
    raise UserError(f"the prompt has {num_prompt} tokens but the model has {length} positions.")
  if mesh is not None and batch % sharding.data_parallel_size(mesh):
    raise UserError(f"batch {batch} does not split over {sharding.data_parallel_size(mesh)} "
                    "devices; use a multiple of the device count.")
  tokens_BxL = jnp.pad(prompt_BxN, ((0, 0), (0, length - num_prompt)))
  params, prompt_BxN, tokens_BxL = _place(params, prompt_BxN, tokens_BxL, mesh)

  all_ends = segment_ends(length, segment_len)
  ends = [e for e in all_ends if e > num_prompt]
  if not ends:  # nothing left to sample
    return tokens_BxL
  if num_prompt:
    cache = prefill(cfg, params, prompt_BxN, ends[0])
  else:
    cache = model.init_cache(cfg, batch, 1)
    if mesh is not None:
      cache = jax.device_put(cache, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  if progress:
    progress(num_prompt, length)
  start, begin = num_prompt, max([0] + [e for e in all_ends if e <= num_prompt])
  for stop in ends:
    cache, tokens_BxL = _segment(cfg, params, cache, tokens_BxL, rng, jnp.int32(start), begin,
                                 stop, settings)
    start = begin = stop
    if progress:
      tokens_BxL.block_until_ready()
      progress(stop, length)
  return tokens_BxL


class _Progress:
  """Logs pixels sampled, tokens/s and ETA over all batches of a run."""

  def __init__(self, total_pixels: int, num_prompt: int):
    self.total, self.num_prompt = total_pixels, num_prompt
    self.t0 = time.perf_counter()
    self.last = -1

  def batch(self, base: int, num_images: int):
    """The sampler's callback for a batch of `num_images` real images after `base` pixels."""
    def report(done, length):
      del length
      pixels = base + (done - self.num_prompt) * num_images
      if pixels == self.last:  # a batch's start repeats the previous batch's end
        return
      self.last = pixels
      elapsed = time.perf_counter() - self.t0
      rate = pixels / elapsed if elapsed > 0 else 0.0
      eta = f"{(self.total - pixels) / rate:.0f}s" if rate else "?"
      logging.info("sampled %d/%d pixels | %.0f tokens/s | ETA %s", pixels, self.total, rate, eta)
    return report


def sample_many(cfg: ModelConfig, params, prompts_BxN: np.ndarray, settings: Settings,
                seed: int, batch_size: int, segment_len: int | None = None) -> np.ndarray:
  """Tokens [B, L] for every prompt row (N may be 0), `batch_size` rows at a time, with a
  progress line (pixels, tokens/s, ETA) as it goes.

  Batch i draws from `fold_in(key(seed), i)`; the last batch is padded to full size so the
  sampler compiles once. The batch is split over all devices (rounded up to fit them).
  """
  devices = jax.devices()
  total, num_prompt = prompts_BxN.shape
  batch_size = math.ceil(min(batch_size, total) / len(devices)) * len(devices)
  mesh = batch_mesh(devices) if len(devices) > 1 else None
  new_pixels = cfg.seq_len - num_prompt
  progress = _Progress(total * new_pixels, num_prompt)
  out = []
  for i, start in enumerate(range(0, total, batch_size)):
    chunk = prompts_BxN[start:start + batch_size]
    report = progress.batch(start * new_pixels, len(chunk))
    padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0)))
    rng = jax.random.fold_in(jax.random.key(seed), i)
    tokens = sample(cfg, params, padded, rng, settings, segment_len=segment_len, mesh=mesh,
                    progress=report)
    out.append(np.asarray(tokens)[:len(chunk)])
  return np.concatenate(out)
