"""Probe-feature extraction speed: ours (`igpt.features`) against transformers' ImageGPTModel.

Both sides compute every layer's hidden states for the same batch of random 512-colour
images and pool them over positions: ours is one jitted forward returning all layers' pooled
features; the reference is `ImageGPTModel(..., output_hidden_states=True)` under
`torch.no_grad()` with the same pooling in torch. fp32, median of the timed batches after
warm-up (and, for ours, after the compile, reported apart). Run side by side in one process:

  python bench/bench_features.py --sizes s:1 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from igpt.config import parse_sizes

from bench_torch_reference import time_steps  # the script's folder is on sys.path


def ours(layers, width, heads, batch, seq_len, tokens_BxL, warmup, steps):
  """(compile seconds, step times) of igpt.features over all layers, one device."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from igpt import features, model, sharding  # pylint: disable=g-import-not-at-top
  cfg = model.ModelConfig(num_layers=layers, d_model=width, num_heads=heads, seq_len=seq_len)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
  params, _ = features.place_params(cfg, params, mesh, sharding.DEFAULT_RULES)
  fn = features.make_feature_fn(cfg, tuple(range(layers)), "norm", mesh, sharding.DEFAULT_RULES)
  tokens = sharding.global_batch({"t": tokens_BxL}, mesh)["t"]
  t0 = time.perf_counter()
  fn(params, tokens).block_until_ready()
  compile_s = time.perf_counter() - t0
  return compile_s, time_steps(lambda: fn(params, tokens).block_until_ready(), warmup, steps)


def reference(layers, width, heads, batch, seq_len, tokens_BxL, warmup, steps):
  """Step times of transformers' ImageGPTModel with all hidden states, pooled the same way."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import ImageGPTConfig, ImageGPTModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = ImageGPTConfig(vocab_size=513, n_positions=seq_len, n_embd=width, n_layer=layers,
                       n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  net = ImageGPTModel(cfg).eval()
  x = torch.as_tensor(tokens_BxL, dtype=torch.long)
  input_ids = torch.cat([torch.full((batch, 1), 512, dtype=torch.long), x[:, :-1]], dim=1)

  def step():
    with torch.no_grad():
      hidden = net(input_ids=input_ids, output_hidden_states=True).hidden_states[1:]
      return [(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).mean(1) for h in hidden]

  return time_steps(step, warmup, steps)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="s:1", help="comma list of SIZE:BATCH; SIZE = s|m|l or "
                 "LAYERSxWIDTHxHEADS")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--skip_reference", action="store_true", help="time ours only")
  args = p.parse_args()
  print(f"{'config':<12} {'batch':>5} {'impl':<14} {'ms/batch':>9} {'images/s':>9} "
        f"{'compile_s':>9}  speed-up")
  for name, layers, width, heads, batch in parse_sizes(args.sizes):
    tokens = np.random.default_rng(0).integers(0, 512, (batch, args.seq_len)).astype(np.int32)
    compile_s, t_ours = ours(layers, width, heads, batch, args.seq_len, tokens, args.warmup,
                             args.steps)
    med_ours = statistics.median(t_ours)
    print(f"{name:<12} {batch:>5} {'igpt (JAX)':<14} {1e3 * med_ours:>9.1f} "
          f"{batch / med_ours:>9.3f} {compile_s:>9.1f}", flush=True)
    if args.skip_reference:
      continue
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
    med_ref = statistics.median(reference(layers, width, heads, batch, args.seq_len, tokens,
                                          args.warmup, args.steps))
    print(f"{name:<12} {batch:>5} {'transformers':<14} {1e3 * med_ref:>9.1f} "
          f"{batch / med_ref:>9.3f} {'':>9}  {med_ref / med_ours:.2f}x", flush=True)


if __name__ == "__main__":
  main()
