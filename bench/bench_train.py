"""Benchmark of the real iGPT train step: tokens/s, images/s, achieved FLOP/s and MFU.

Times `igpt.train.make_train_step` (forward, backward, Adam with beta2 0.95, the trainer's
metrics) on random tokens, for each requested size and batch:

  python bench/bench_train.py --sizes s:1,8x256x8:4
  python bench/bench_train.py --sizes configs/igpt_s.py:8 --steps 10 --peak_gflops 150

SIZE is a paper size (s, m, l, xl), LAYERSxWIDTHxHEADS (32x32 images), or a config file with
`get_config()`; BATCH defaults to 1. Per size: one compile (timed separately), `--warmup`
untimed steps, then `--steps` timed steps, each ended by `block_until_ready`; the table shows
the median step (and the spread, (max - min) / median, as a noise gauge).

FLOPs follow `igpt.metrics.flops_per_token`: 6 N + 12 L d T per token for forward + backward
(N = matmul weights incl. the output head; attention over the full T x T square). MFU is
against `--peak_gflops` if given, else the trainer's per-device table (GPU/TPU), else, on CPU,
a float32 matmul peak measured here with `jnp.dot` (said so in the header).

Runs unchanged on CPU and GPU: the mesh, shardings and jit come from the trainer, over all
local devices (pure FSDP by default, as in training).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from igpt import config as igpt_config  # noqa: E402
from igpt import metrics, sharding, train  # noqa: E402
from igpt.model import ModelConfig  # noqa: E402


def load_config(size: str):
  """A run config for SIZE: a paper size name, LxDxH, or a config file path."""
  if size.endswith(".py"):
    spec = importlib.util.spec_from_file_location("bench_cfg", size)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()
  if size in igpt_config.PAPER_SIZES:
    return igpt_config.paper_config(size)
  layers, width, heads = (int(v) for v in size.lower().split("x"))
  return igpt_config.base_config(num_layers=layers, d_model=width, num_heads=heads,
                                 image_side=32)


def parse_sizes(spec: str, default_batch: int):
  """'s:1,8x256x8:4' -> [(label, config)] with train.batch_size set."""
  out = []
  for item in spec.split(","):
    size, _, batch = item.rpartition(":") if ":" in item else (item, "", "")
    config = load_config(size)
    config.train.batch_size = int(batch or default_batch)
    config.train.grad_accum_steps = 1
    label = os.path.splitext(os.path.basename(size))[0]
    out.append((label, config))
  return out


def measure_matmul_peak_flops(n: int = 2048, reps: int = 7) -> float:
  """Best float32 FLOP/s of an n x n x n `jnp.dot` on the default device (a peak proxy).

  The best of `reps`, not the median: a peak is what the machine can do, and on a shared
  CPU the median mostly measures the neighbours.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / min(times)


def peak_flops(override_gflops: float) -> tuple[float, str]:
  """(peak FLOP/s per device, where it came from)."""
  if override_gflops > 0:
    return override_gflops * 1e9, "--peak_gflops"
  kind = jax.devices()[0].device_kind
  table = metrics.peak_flops_per_device(kind)
  if table:
    return table, f"datasheet bf16 peak for {kind!r}"
  return measure_matmul_peak_flops(), "measured: best fp32 2048^3 jnp.dot of 7"


def time_train_step(config, warmup: int, steps: int) -> dict:
  """Builds the trainer's state and step for `config`; returns compile time and step times."""
  mesh = sharding.make_mesh(config.mesh)
  model_cfg = train.validate_config(config, jax.device_count())
  state, state_shardings = train.create_train_state(config, mesh, jax.random.key(0))
  step = train.make_train_step(config, mesh, state_shardings)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model_cfg.vocab_size, (config.train.batch_size, model_cfg.seq_len))
  batch = sharding.global_batch({"tokens": tokens.astype(np.int32)}, mesh)
  key = jax.random.key(1)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  times = []
  with jax.set_mesh(mesh):
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, step_metrics = compiled(state, batch, jax.random.fold_in(key, i))
      jax.block_until_ready((state, step_metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  loss = float(step_metrics["loss"])
  return {"model_cfg": model_cfg, "devices": mesh.size, "compile_s": compile_s,
          "times": times, "loss": loss}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="s:1,8x256x8:4",
                 help="comma list of SIZE[:BATCH]; SIZE = s|m|l|xl, LxDxH or a config .py")
  p.add_argument("--batch", type=int, default=1, help="batch where SIZE has none")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--peak_gflops", type=float, default=0.0,
                 help="peak GFLOP/s per device for MFU (default: table, or measured on CPU)")
  args = p.parse_args()

  sizes = parse_sizes(args.sizes, args.batch)
  peak, peak_src = peak_flops(args.peak_gflops)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {jax.device_count()} x {dev.platform}:{dev.device_kind}; "
        f"peak {peak / 1e9:.0f} GFLOP/s/device ({peak_src}); median of {args.steps} steps "
        f"after {args.warmup} warm-up; FLOPs = 6N + 12LdT per token (fwd+bwd)")
  print(f"{'config':<14} {'batch':>5} {'compile_s':>9} {'ms/step':>9} {'min_ms':>9} "
        f"{'spread%':>8} {'tokens/s':>9} {'images/s':>9} {'GFLOP/s':>8} {'MFU%':>6} {'loss':>7}")
  for label, config in sizes:
    r = time_train_step(config, args.warmup, args.steps)
    cfg: ModelConfig = r["model_cfg"]
    med = statistics.median(r["times"])
    spread = 100 * (max(r["times"]) - min(r["times"])) / med
    batch = config.train.batch_size
    tok_s = batch * cfg.seq_len / med
    flop_s = tok_s * train.flops_per_token(cfg)
    mfu = flop_s / (peak * r["devices"])
    print(f"{label:<14} {batch:>5} {r['compile_s']:>9.1f} {1e3 * med:>9.1f} "
          f"{1e3 * min(r['times']):>9.1f} {spread:>8.1f} {tok_s:>9.1f} {batch / med:>9.3f} "
          f"{flop_s / 1e9:>8.1f} {100 * mfu:>6.1f} {r['loss']:>7.3f}", flush=True)

if __name__ == "__main__":
  main()
