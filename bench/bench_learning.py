"""What pretraining on real images buys: pretrain on a CIFAR folder, probe every layer, one table.

  python bench/bench_learning.py --cifar_dir .../cifar-10-batches-py
  python bench/bench_learning.py --cifar_dir DIR --workdir runs/learn --set data.palette_size=128

Runs `train.py --config configs/cifar_cpu.py` (any `--config`; `--set field=value` overrides
a field, as `--config.field=value` would) on the folder, then `probe.py` on the run with every
layer concatenated too (`--probe_set field=value` overrides its settings, e.g. pool_grid=2),
then a linear probe on the raw pixels (the same splits, standardised, the same L2 sweep).
Prints bits/dim, probe test accuracy per layer (pretrained and the random-init control), the
concatenation, raw pixels, and the CPU seconds (user + system) of pretraining and probing. A finished run in --workdir is probed again without retraining.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags

from igpt import config as config_lib
from igpt import linear_probe, readers, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CIFAR_DIR = flags.DEFINE_string("cifar_dir", None, "A cifar-10-batches-py folder.")
_CONFIG = flags.DEFINE_string("config", os.path.join(REPO, "configs", "cifar_cpu.py"),
                              "Run config file for the pretraining.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_learning", "Run folder.")
_SET = flags.DEFINE_multi_string("set", [], "field=value: a run config override.")
_VAL_EXAMPLES = flags.DEFINE_integer("val_examples", 500, "Probe validation carve.")
_PROBE_SET = flags.DEFINE_multi_string("probe_set", [], "field=value: a probe config override "
                                       "(configs/probe.py), e.g. pool_grid=2.")
flags.mark_flags_as_required(["cifar_dir"])


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _timed(args: list[str]) -> tuple[float, float]:
  """Runs a command to its end (its output passes through); (CPU seconds, wall seconds)."""
  cpu0, t0 = _children_cpu_s(), time.time()
  subprocess.run(args, cwd=REPO, check=True)
  return _children_cpu_s() - cpu0, time.time() - t0


def _data_section(cifar_dir: str, val_examples: int) -> ml_collections.ConfigDict:
  data = config_lib.data_section()
  data.update(source="cifar", name="cifar10", path=cifar_dir, val_examples=val_examples)
  return data


def raw_pixel_probe(data, image_side: int, l2_grid) -> dict:
  """A linear probe on the standardised raw pixels of the probe's splits."""
  splits = {}
  for split in ("train", "val", "test"):
    source = readers.make_source(data, split, image_side)
    images, labels = source.get(np.arange(len(source)))
    splits[split] = linear_probe.Split(images.reshape(len(images), -1).astype(np.float32),
                                       np.asarray(labels, np.int32))
  num_classes = int(max(s.y.max() for s in splits.values()) + 1)
  return linear_probe.probe(splits["train"], splits["val"], splits["test"], num_classes,
                            l2_grid)


def _probe_l2_grid() -> tuple:
  """probe.py's L2 sweep (configs/probe.py), so raw pixels get the same search."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("probe_config",
                                                os.path.join(REPO, "configs", "probe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return tuple(float(v) for v in module.get_config().l2_grid)


def main(argv):
  del argv
  workdir, data_dir = os.path.abspath(_WORKDIR.value), os.path.abspath(_CIFAR_DIR.value)
  overrides = [f"--config.{s}" for s in _SET.value]
  train_cpu_s, train_wall_s = _timed(
      [sys.executable, "train.py", "--config", _CONFIG.value, "--workdir", workdir,
       f"--config.data.path={data_dir}", *overrides])
  probe_cpu_s, probe_wall_s = _timed(
      [sys.executable, "probe.py", "--workdir", workdir, "--config.data.source=cifar",
       "--config.data.name=cifar10", f"--config.data.path={data_dir}",
       f"--config.data.val_examples={_VAL_EXAMPLES.value}", "--config.concat_layers=all",
       "--config.batch_size=128", *[f"--config.{s}" for s in _PROBE_SET.value]])
  with open(run.path(run.path(workdir, run.PROBE_DIR), "results_cifar10.json")) as f:
    results = json.load(f)
  with open(run.path(workdir, run.METRICS_FILE)) as f:
    evals = [r for r in map(json.loads, f) if "eval_bits_per_dim" in r]
  image_side = int(run.read_config(workdir).model.image_side)
  raw = raw_pixel_probe(_data_section(data_dir, _VAL_EXAMPLES.value), image_side,
                        _probe_l2_grid())

  pre, ctl = results["pretrained"], results.get("random_init", {})
  ctl_by_layer = {r["layer"]: r["test_accuracy"] for r in ctl.get("layers", [])}
  print(f"\nbits/dim (validation, final): {evals[-1]['eval_bits_per_dim']:.4f} at step "
        f"{evals[-1]['step']}")
  print(f"{'features':>26}  {'test acc %':>10}  {'random init %':>13}")
  for r in pre["layers"]:
    print(f"{'layer ' + str(r['layer']):>26}  {100 * r['test_accuracy']:>10.2f}  "
          f"{100 * ctl_by_layer.get(r['layer'], float('nan')):>13.2f}")
  best = pre["best_layer"]
  print(f"{'best layer by val (' + str(best['layer']) + ')':>26}  "
        f"{100 * best['test_accuracy']:>10.2f}")
  if "concat" in pre:
    print(f"{'all layers concatenated':>26}  {100 * pre['concat']['test_accuracy']:>10.2f}  "
          f"{100 * ctl.get('concat', {}).get('test_accuracy', float('nan')):>13.2f}")
  print(f"{'raw pixels':>26}  {100 * raw['test_accuracy']:>10.2f}")
  print(f"examples: {results['examples']}; pretraining {train_cpu_s:.0f} CPU-s "
        f"({train_cpu_s / 60:.1f} CPU-min, {train_wall_s:.0f} s wall), probing "
        f"{probe_cpu_s:.0f} CPU-s")


if __name__ == "__main__":
  app.run(main)
