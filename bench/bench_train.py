"""Benchmark of the real iGPT train step: tokens/s, images/s, achieved FLOP/s and MFU.

Times `igpt.train.make_train_step` (forward, backward, Adam with beta2 0.95, the trainer's
metrics) on random tokens, for each requested size and batch:

  python bench/bench_train.py --sizes s:1,8x256x8:4
  python bench/bench_train.py --config configs/igpt_s.py --config.model.dtype=bfloat16 \
      --batch_sizes 32,64 --steps 10

`--sizes`: a comma list of SIZE[:BATCH], SIZE a paper size (s, m, l, xl) or
LAYERSxWIDTHxHEADS (32x32 images), BATCH 1 by default. `--config`: a config file loaded
exactly as train.py loads it (`--config.x=y` overrides, `file.py:variant`), timed at each of
`--batch_sizes` (default: its train.batch_size). Per size: one compile (timed separately),
`--warmup` untimed steps, then `--steps` timed steps, each ended by `block_until_ready`; the
table shows the median step (and the spread, (max - min) / median, as a noise gauge).

FLOPs follow `igpt.metrics.flops_per_token`: 6 N + 12 L d T per token for forward + backward
(N = matmul weights incl. the output head; attention over the full T x T square). MFU is
against `--peak_gflops` if given, else the per-device table of igpt.metrics (GPU/TPU), else, on CPU,
a float32 matmul peak measured here with `jnp.dot` (said so in the header).

Runs unchanged on CPU and GPU: the mesh, shardings and jit come from igpt.train, over all
local devices (pure FSDP by default, as in training).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from igpt import config as igpt_config
from igpt import metrics, sharding, spec, train
from igpt.model import ModelConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (as train.py).")
_SIZES = flags.DEFINE_string("sizes", "", "Comma list of SIZE[:BATCH] (s|m|l|xl or LxDxH).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", [], "Batches to time --config at.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the compile.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps.")
_PEAK_GFLOPS = flags.DEFINE_float(
    "peak_gflops", 0.0, "Peak GFLOP/s per device for MFU (default: table, or measured on CPU).")


def size_config(size: str):
  """A run config for SIZE: a paper size name or LxDxH (32x32 images)."""
  if size in igpt_config.PAPER_SIZES:
    return igpt_config.paper_config(size)
  layers, width, heads = (int(v) for v in size.lower().split("x"))
  return igpt_config.base_config(num_layers=layers, d_model=width, num_heads=heads,
                                 image_side=32)


def configs_to_time():
  """[(label, config)] from --sizes and/or --config x --batch_sizes, batch sizes set."""
  out = []
  for item in filter(None, _SIZES.value.split(",")):
    size, _, batch = item.partition(":")
    out.append((size, size_config(size), int(batch or 1)))
  if _CONFIG.value is not None:
    for batch in _BATCH_SIZES.value or [_CONFIG.value.train.batch_size]:
      out.append(("config", _CONFIG.value, int(batch)))
  if not out:
    raise app.UsageError("give --sizes and/or --config.")
  timed = []
  for label, config, batch in out:
    config = config.copy_and_resolve_references()
    config.train.batch_size, config.train.grad_accum_steps = batch, 1
    timed.append((label, config))
  return timed


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
  """Builds the train state and step for `config`; returns compile time and step times."""
  run_spec = spec.resolve(config)
  mesh = sharding.make_mesh(run_spec.config.mesh)
  model_cfg = run_spec.model
  setup = train.TrainSetup.build(run_spec, mesh)
  state, state_shardings = train.create_train_state(setup, jax.random.key(0))
  step = train.make_train_step(setup, state_shardings)
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


def main(argv):
  del argv
  sizes = configs_to_time()
  peak, peak_src = peak_flops(_PEAK_GFLOPS.value)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {jax.device_count()} x {dev.platform}:{dev.device_kind}; "
        f"peak {peak / 1e9:.0f} GFLOP/s/device ({peak_src}); median of {_STEPS.value} steps "
        f"after {_WARMUP.value} warm-up; FLOPs = 6N + 12LdT per token (fwd+bwd)")
  print(f"{'config':<14} {'batch':>5} {'dtype':>8} {'attn':>7} {'compile_s':>9} {'ms/step':>9} "
        f"{'min_ms':>9} {'spread%':>8} {'tokens/s':>9} {'images/s':>9} {'GFLOP/s':>8} "
        f"{'MFU%':>6} {'loss':>7}")
  for label, config in sizes:
    r = time_train_step(config, _WARMUP.value, _STEPS.value)
    cfg: ModelConfig = r["model_cfg"]
    med = statistics.median(r["times"])
    spread = 100 * (max(r["times"]) - min(r["times"])) / med
    batch = config.train.batch_size
    tok_s = batch * cfg.seq_len / med
    flop_s = tok_s * metrics.flops_per_token(cfg)
    mfu = flop_s / (peak * r["devices"])
    print(f"{label:<14} {batch:>5} {cfg.dtype:>8} {cfg.attention_implementation():>7} "
          f"{r['compile_s']:>9.1f} {1e3 * med:>9.1f} "
          f"{1e3 * min(r['times']):>9.1f} {spread:>8.1f} {tok_s:>9.1f} {batch / med:>9.3f} "
          f"{flop_s / 1e9:>8.1f} {100 * mfu:>6.1f} {r['loss']:>7.3f}", flush=True)

if __name__ == "__main__":
  app.run(main)
