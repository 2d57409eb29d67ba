"""Benchmark of the persistent compilation cache: the train step compiled cold vs from disk.

  python bench/bench_compile_cache.py                       # configs/tiny.py, 3 runs each
  python bench/bench_compile_cache.py --config configs/igpt_s.py --runs 2

Builds the train state and train step for `--config` (as bench_train.py does) and times
`.lower(...)` and `.compile()` of the step, each run in a fresh process (JAX's in-memory cache
empty), in three modes:
  off:  no persistent cache (what every start cost before);
  cold: an empty cache folder (a miss: compile, then write the entry);
  warm: the folder a cold run filled (a hit: read the entry, no XLA compile).
Prints the median (and min, max) per mode, the cache outcome `igpt.compile_cache.watch` saw,
and the whole process's wall time (imports, state, lower, compile).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "tiny.py"), "Run config file (as train.py).")
_RUNS = flags.DEFINE_integer("runs", 3, "Fresh processes per mode.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Internal: one child run's cache ('off').")


def compile_once(config, cache_dir: str) -> dict:
  """In this process: enable the cache, build the train step, time lower and compile."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from igpt import compile_cache, sharding, spec, train  # noqa: PLC0415

  compile_cache.enable(cache_dir)
  run_spec = spec.resolve(config)
  mesh = sharding.make_mesh(run_spec.config.mesh)
  setup = train.TrainSetup.build(run_spec, mesh)
  state, state_shardings = train.create_train_state(setup, jax.random.key(0))
  tokens = np.zeros((config.train.batch_size, run_spec.model.seq_len), np.int32)
  batch = sharding.global_batch({"tokens": tokens}, mesh)
  t0 = time.perf_counter()
  lowered = train.make_train_step(setup, state_shardings).lower(state, batch,
                                                                  jax.random.key(1))
  lower_s = time.perf_counter() - t0
  with compile_cache.watch() as compiled:
    lowered.compile()
  return {"lower_s": lower_s, "compile_s": compiled.seconds, "outcome": compiled.outcome,
          "line": compile_cache.describe(compiled)}


def child_run(cache_dir: str) -> dict:
  """One fresh process compiling with `cache_dir`; adds its wall time."""
  args = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--cache_dir={cache_dir}"]
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  t0 = time.perf_counter()
  proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"child run failed:\n{proc.stderr[-4000:]}")
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


def main(argv):
  del argv
  config = _CONFIG.value.copy_and_resolve_references()
  if _CACHE_DIR.value is not None:
    print(json.dumps(compile_once(config, _CACHE_DIR.value)))
    return
  results = {"off": [], "cold": [], "warm": []}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(_RUNS.value):
      results["off"].append(child_run("off"))
      folder = os.path.join(tmp, f"cache{i}")
      results["cold"].append(child_run(folder))
      results["warm"].append(child_run(folder))
  m = config.model
  print(f"train step of {m.num_layers}x{m.d_model}x{m.num_heads} at {m.image_side}x"
        f"{m.image_side}, batch {config.train.batch_size}; median of {_RUNS.value} fresh "
        f"processes per mode (min-max)")
  print(f"{'mode':<5} {'outcome':>8} {'lower_s':>8} {'compile_s':>20} {'process_s':>20}")
  for mode, runs in results.items():
    outcomes = "/".join(sorted({r["outcome"] for r in runs}))
    cells = []
    for key in ("compile_s", "process_s"):
      values = [r[key] for r in runs]
      cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
    lower = statistics.median(r["lower_s"] for r in runs)
    print(f"{mode:<5} {outcomes:>8} {lower:>8.2f} {cells[0]:>20} {cells[1]:>20}")


if __name__ == "__main__":
  app.run(main)
