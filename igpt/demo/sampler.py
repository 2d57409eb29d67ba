"""A streaming sampler that compiles once per model, whatever the settings and the prompt.

`igpt.sampling.sample` specialises its compiled loops on the prompt's length and on the
`Settings` (static there): fast for one command, but a server answering any settings would
compile for each new combination. Here every input has one shape:

- the batch is always `batch` rows (a request's rows first, then copies of its first);
- the tokens are always [B, L], the prompt's length N traced: `sampling.prefill` runs all L
  positions (the cache past the prompt holds garbage that the steps mask, then overwrite);
- temperature, top-k, top-p and greedy are traced arrays (`traced_controls`);
- `steps` samples `chunk` positions per call from a traced first position, and the caller
  gets the tokens between calls (what the page shows as they come).

The noise of position p is igpt.sampling's (`gumbel(fold_in(key(seed), p), (B, V))`) and the
filter is `sampling.filter_logits` with traced controls, so with the same batch size, seed
and settings this draws `sampling.sample`'s tokens (the tests check it).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from igpt import model, sampling
from igpt.errors import UserError
from igpt.model import ModelConfig


def traced_controls(settings: sampling.Settings) -> dict:
  """The sampling controls as arrays (traced under jit, so new values do not recompile)."""
  return {"temperature": np.float32(1.0 if settings.greedy else settings.temperature),
          "top_k": np.int32(settings.top_k), "top_p": np.float32(settings.top_p),
          "greedy": np.bool_(settings.greedy)}


def sample_token(logits_BxV, gumbel_BxV, controls: dict):
  """One token int32 [B] per row: Gumbel-max over the filtered logits, or the argmax."""
  filtered_BxV = sampling.filter_logits(logits_BxV, controls["temperature"], controls["top_k"],
                                        controls["top_p"])
  drawn_B = jnp.argmax(filtered_BxV + gumbel_BxV, axis=-1)
  return jnp.where(controls["greedy"], jnp.argmax(logits_BxV, axis=-1), drawn_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(2,))
def steps(cfg: ModelConfig, params, cache, tokens_BxL, seed, first, num_prompt, chunk: int,
          controls: dict):
  """Samples the positions of [first, first + chunk) at or past num_prompt into tokens_BxL."""
  batch = tokens_BxL.shape[0]
  rng = jax.random.key(seed)
  draw = lambda p: jax.random.gumbel(jax.random.fold_in(rng, p), (batch, cfg.vocab_size))
  noise_CxBxV = jax.vmap(draw)(first + jnp.arange(chunk))

  choose = lambda logits_BxV, gumbel_BxV: sample_token(logits_BxV, gumbel_BxV, controls)
  return sampling.decode_loop(cfg, params, cache, tokens_BxL, noise_CxBxV, first,
                              jnp.maximum(first, num_prompt),
                              jnp.minimum(first + chunk, cfg.seq_len), choose)


class FixedSampler:
  """`batch` images at a time, `chunk` positions per compiled call, for one model."""

  def __init__(self, cfg: ModelConfig, params, batch: int, chunk: int):
    if not cfg.causal:
      raise UserError("sampling needs a causal (autoregressive) model; this one is "
                      "bidirectional.")
    self.cfg, self.batch, self.chunk = cfg, int(batch), int(chunk)
    self.device = jax.local_devices()[0]
    self.params = jax.jit(model.decode_params)(params)  # fused once, for every call

  def stream(self, tokens_BxL: np.ndarray, num_prompt: int, seed: int,
             settings: sampling.Settings,
             stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (positions done, tokens int32 [B, L]) after the prefill and after each chunk;
    the first num_prompt tokens of each row are kept. Ends early once `stop()` is true."""
    length = self.cfg.seq_len
    if tokens_BxL.shape != (self.batch, length):
      raise UserError(f"tokens must be [{self.batch}, {length}]; got {tokens_BxL.shape}.")
    sampling.check_prompt(tokens_BxL, self.cfg.vocab_size)
    # Committed to the device, like every later call's tokens (the previous call's output):
    # an uncommitted first input would compile `steps` a second time.
    tokens = jax.device_put(np.asarray(tokens_BxL, np.int32), self.device)
    controls = traced_controls(settings.check(self.cfg.vocab_size))
    # All L positions (a fixed shape): those past the prompt are masked, then rewritten.
    cache = sampling.prefill(self.cfg, self.params, tokens, length)
    yield num_prompt, np.array(tokens)
    for first in range(num_prompt - num_prompt % self.chunk, length, self.chunk):
      if stop():
        return
      cache, tokens = steps(self.cfg, self.params, cache, tokens, np.uint32(seed),
                            np.int32(first), np.int32(num_prompt), self.chunk, controls)
      yield min(first + self.chunk, length), np.array(tokens)
