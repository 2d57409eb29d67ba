"""Sampling speed: our KV-cached compiled sampler vs transformers' `generate()`, side by side.

Both sample every position of an image from nothing (ours: `igpt.sampling.sample`; the
reference: `ImageGPTForCausalImageModeling.generate` with `do_sample=True, use_cache=True`
from the SOS token) with random weights of the same shape, same batch and number of new
tokens. Reports tokens/s and ms per decode step (one token per image), median of `--runs`
runs after one warm-up, the two sides alternating run by run; our compile time is reported
apart.

  python bench/bench_sample.py --sizes 4x128x4@16:1,8x256x8:4,s:1,s:4
  python bench/bench_sample.py --sizes s:1,s:16 --dtype bfloat16   # GPU: torch under autocast

SIZE is `s|m|l|xl` (paper sizes) or `LAYERSxWIDTHxHEADS`, `@SIDE` sets the image side
(default 32), `:BATCH` the batch (default 1). `--skip_torch` times ours only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from igpt import config, model, sampling


def parse_sizes(spec: str):
  """'4x128x4@16:1,s:4' -> [(name, layers, width, heads, side, batch)]: `igpt.config`'s
  size list, with an optional `@SIDE` (default 32) after a size."""
  out = []
  for item in filter(None, spec.split(",")):
    size, _, batch = item.partition(":")
    shape, _, side = size.partition("@")
    _, layers, width, heads, batch = config.parse_sizes(f"{shape}:{batch or 1}")[0]
    out.append((size, layers, width, heads, int(side or 32), batch))
  return out


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def ours(layers, width, heads, side, batch, dtype):
  """A call that samples one batch of whole images with igpt.sampling.sample."""
  cfg = model.ModelConfig(num_layers=layers, d_model=width, num_heads=heads, seq_len=side * side,
                          vocab_size=512, dtype=dtype)
  params = model.init_params(cfg, jax.random.key(0))
  params["wtet"] = 0.02 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  calls = iter(range(1 << 30))

  def run():
    rng = jax.random.key(next(calls))
    sampling.sample(cfg, params, None, rng, batch_size=batch).block_until_ready()

  return run


def reference(layers, width, heads, side, batch, dtype):
  """A call that samples one batch of whole images with transformers' generate()."""
  import torch  # noqa: PLC0415
  from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: PLC0415

  seq_len = side * side
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  cfg = ImageGPTConfig(vocab_size=513, n_positions=seq_len, n_embd=width, n_layer=layers,
                       n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  net = ImageGPTForCausalImageModeling(cfg).eval().to(device)
  sos = torch.full((batch, 1), cfg.vocab_size - 1, dtype=torch.long, device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def run():
    with torch.inference_mode(), autocast:
      net.generate(input_ids=sos, attention_mask=torch.ones_like(sos), max_new_tokens=seq_len,
                   do_sample=True, use_cache=True, top_k=0,
                   pad_token_id=cfg.vocab_size - 1)
    if device == "cuda":
      torch.cuda.synchronize()

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="4x128x4@16:1,8x256x8:4,s:1,s:4")
  parser.add_argument("--runs", type=int, default=3, help="timed runs per side after a warm-up")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--skip_torch", action="store_true")
  args = parser.parse_args()
  try:
    import torch  # noqa: PLC0415
    torch.set_num_threads(os.cpu_count() or 1)
  except ImportError:
    args.skip_torch = True
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}, "
        f"median of {args.runs} runs per side after a warm-up, the sides alternating; a step = one "
        "token per image")
  print(f"{'size':<14} {'batch':>5} {'tokens':>6} {'compile_s':>9} {'ours_tok/s':>10} "
        f"{'ours_ms/step':>12} {'ref_tok/s':>9} {'ref_ms/step':>11} {'speedup':>7}")
  for name, layers, width, heads, side, batch in parse_sizes(args.sizes):
    seq_len = side * side
    sides = {"ours": ours(layers, width, heads, side, batch, args.dtype)}
    if not args.skip_torch:
      sides["ref"] = reference(layers, width, heads, side, batch, args.dtype)
    first = {k: timed(run) for k, run in sides.items()}  # warm-up (ours: with compile)
    times = {k: [] for k in sides}
    for _ in range(args.runs):  # alternating, so a drift in the machine's speed hits both
      for k, run in sides.items():
        times[k].append(timed(run))
    ours_s = statistics.median(times["ours"])
    line = (f"{name:<14} {batch:>5} {seq_len:>6} {first['ours'] - ours_s:>9.1f} "
            f"{batch * seq_len / ours_s:>10.1f} {1e3 * ours_s / seq_len:>12.3f}")
    if "ref" in sides:
      ref_s = statistics.median(times["ref"])
      line += (f" {batch * seq_len / ref_s:>9.1f} {1e3 * ref_s / seq_len:>11.3f} "
               f"{ref_s / ours_s:>6.1f}x")
    print(line, flush=True)


if __name__ == "__main__":
  main()
