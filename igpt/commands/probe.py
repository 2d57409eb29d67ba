"""The body of `probe.py`: extract features, fit probes, write the results.

    model = trained.load(workdir="runs/tiny")        # or hf=..., palette=...
    results = run_probes(config, model, out_dir)     # config: igpt.config.probe_settings()

Outputs in `out_dir` (a run's `probe/` folder by default): `results_<data>.json`,
`accuracy_vs_layer_<data>.png` and the feature cache `features/`.
"""

from __future__ import annotations

import json
import re
import time

import jax
import numpy as np
from absl import logging

from igpt import cli, compile_cache, features, fileio, linear_probe, readers, run, sharding
from igpt import config as config_lib
from igpt import storage, trained
from igpt.errors import UserError
from igpt.linear_probe import Split

FEATURES_DIR = "features"  # inside the output folder: the feature cache


# ----------------------------------------------------------------------------------------
# Data


def _head(source, n: int):
  """The first `n` examples of `source` (all of it when n <= 0 or n >= len)."""
  if n <= 0 or n >= len(source):
    return source
  return readers.subset(source, np.arange(n), f"{source.description} (first {n})")


def labelled_sources(data_cfg, image_side: int) -> dict:
  """{'train', 'val', 'test'} sources; UserError when the data has no labels or a split is
  empty."""
  out = {}
  for split in ("train", "val", "test"):
    source = _head(readers.make_source(data_cfg, split, image_side),
                   int(data_cfg.max_examples_per_split))
    if len(source) == 0:
      raise UserError(f"the {split} split ({source.description}) is empty.")
    if source.num_classes is None:
      raise UserError(f"{source.description} has no labels: a probe needs labelled data "
                      "(class subfolders, a label array, or a labelled dataset).")
    out[split] = source
  return out


def _data_key(data_cfg, split: str, image_side: int) -> dict:
  key = data_cfg.to_dict()
  if key.get("path"):
    key["path"] = storage.absolute(key["path"])
  return {**key, "split": split, "image_side": image_side}


def _tag(data_cfg) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", data_cfg.name or data_cfg.source)


# ----------------------------------------------------------------------------------------
# Probing


def _extract(probed: trained.TrainedModel, config, sources, layers, mesh, cache_dir):
  """{split: ({layer: [N, D]}, labels [N])} of the model over every split."""
  if probed.palette is None and not all(hasattr(s, "get_tokens") for s in sources.values()):
    raise UserError("this data is images: give the checkpoint's palette file (--palette) to "
                    "turn them into tokens.")
  extractor = features.FeatureExtractor(
      probed.model_cfg, probed.params, probed.palette, mesh, rules=probed.rules, pooling=config.pooling,
      batch_size=config.batch_size, cache_dir=cache_dir, identity=probed.identity,
      pool_grid=config.pool_grid)
  out = {split: extractor.features(source, _data_key(config.data, split, probed.image_side), layers)
         for split, source in sources.items()}
  for split, (_, labels) in out.items():
    if len(labels) and labels.min() < 0:
      raise UserError(f"{sources[split].description} has unlabelled examples: a probe needs "
                      "a label for every example.")
  return out, {"cache_hits": extractor.cache_hits, "cache_misses": extractor.cache_misses}


def _splits(feats, layers) -> dict:
  """{split: Split} with the features of `layers` concatenated."""
  return {split: Split(np.concatenate([f[l] for l in layers], axis=1), y)
          for split, (f, y) in feats.items()}


def probe_model(probed: trained.TrainedModel, name: str, config, sources, mesh, cache_dir,
                log=print) -> dict:
  """Probes every configured layer of `probed`: per-layer results, best layer, concat, low data."""
  t0 = time.time()
  layers = features.resolve_layers(config.layers, probed.model_cfg.num_layers)
  concat = (features.resolve_layers(config.concat_layers, probed.model_cfg.num_layers,
                                    "concat_layers")
            if config.concat_layers else [])
  feats, cache = _extract(probed, config, sources, sorted(set(layers) | set(concat)), mesh,
                          cache_dir)
  _check_low_data(config, feats["train"][1])  # before any layer is probed
  t_features = time.time() - t0
  num_classes = int(max(max(s.num_classes for s in sources.values()),
                        max(y.max() for _, y in feats.values()) + 1))
  fit_kwargs = dict(l2_grid=tuple(float(v) for v in config.l2_grid),
                    max_steps=config.lbfgs_max_steps, tol=config.lbfgs_grad_tol, mesh=mesh)
  per_layer = []
  for layer in layers:
    s = _splits(feats, [layer])
    r = linear_probe.probe(s["train"], s["val"], s["test"], num_classes, **fit_kwargs)
    per_layer.append({"layer": layer, **r})
    log(f"  [{name}] layer {layer:3d}: test {100 * r['test_accuracy']:.2f}%  val "
        f"{100 * r['val_accuracy']:.2f}%  l2 {r['l2']:g}  ({r['time_s']:.1f}s)")
  best = max(per_layer, key=lambda r: (r["val_accuracy"], -r["layer"]))
  result = {"model": probed.description, "identity": probed.identity, "step": probed.step,
            "num_layers": probed.model_cfg.num_layers, "num_classes": num_classes,
            "layers": per_layer,
            "best_layer": {"layer": best["layer"], "chosen_by": "validation accuracy",
                           "test_accuracy": best["test_accuracy"]},
            "feature_cache": cache, "time_features_s": t_features}
  if concat:
    s = _splits(feats, concat)
    result["concat"] = {"layers": concat, **linear_probe.probe(
        s["train"], s["val"], s["test"], num_classes, **fit_kwargs)}
  ks = config_lib.low_data_sizes(config)
  if ks:
    s = _splits(feats, [best["layer"]])
    result["low_data"] = []
    for k in ks:
      r = linear_probe.low_data_probe(s["train"], s["val"], s["test"], num_classes, k,
                                      config.low_data.draws, config.low_data.seed, **fit_kwargs)
      result["low_data"].append({"layer": best["layer"], **r})
      log(f"  [{name}] {k} per class, layer {best['layer']}: test "
          f"{100 * r['test_accuracy_mean']:.2f}% +- {100 * r['test_accuracy_std']:.2f}% "
          f"over {r['draws']} draws")
  result["time_s"] = time.time() - t0
  return result


def _check_low_data(config, train_labels_N: np.ndarray) -> None:
  """Low-data sizes the training split can give, checked before any probe is fitted."""
  counts = np.bincount(train_labels_N[train_labels_N >= 0])
  present = counts[counts > 0]
  for k in config_lib.low_data_sizes(config):
    if present.size and k > present.min():
      smallest = int(np.flatnonzero(counts == present.min())[0])
      raise UserError(f"low_data.examples_per_class has {k}, but class {smallest} has only "
                      f"{present.min()} training examples; use at most {present.min()}.")


def _blocks(pool_grid: int) -> str:
  """The " over 4x4 blocks" that descriptions of grid pooling end with ("" for the mean over
  every position)."""
  grid = int(pool_grid)
  return f" over {grid}x{grid} blocks" if grid > 1 else ""


_FLAGS = {}


def define_flags() -> None:
  """--config (probe settings), the model flags and --out."""
  _FLAGS.update(cli.define_model_command_flags(
      config_lib.PROBE_CONFIG_FILE, "Probe config file (configs/probe.py).", "probe",
      "<workdir>/probe"))


def main(argv) -> None:
  """Probes as the flags say; a mistake is one `error:` line (see igpt.cli)."""
  del argv

  def work():
    results = probe(_FLAGS["config"].value, _FLAGS["model"].source(), _FLAGS["out"].value)
    logging.info("Wrote %s and %s", results["files"]["json"], results["files"]["png"])

  cli.run_main(work, interrupted_hint="rerun the same command; cached features are reused")


def probe(config, source: trained.ModelSource, out_dir: str | None) -> dict:
  """probe.py: probes the model of `source`; results go to `out_dir` (default: the run
  folder's probe/)."""
  config_lib.check_probe_settings(config)
  source.check()
  if not out_dir:
    if source.hf:
      raise UserError("--hf needs --out: where the results and features go.")
    out_dir = run.path(source.workdir, run.PROBE_DIR)
  compile_cache.enable(config.compile_cache_dir)
  with compile_cache.watch() as compiled:
    results = run_probes(config, source.load(), out_dir)
  logging.info("%s", compile_cache.summary(compiled))
  return results


def run_probes(config, probed: trained.TrainedModel, out_dir: str, log=print) -> dict:
  """Probes `probed` (and the random-init control when configured); writes JSON and PNG."""
  t0 = time.time()
  config_lib.check_probe_settings(config)
  features.resolve_layers(config.layers, probed.model_cfg.num_layers)  # fail before any work
  features.check_pool_grid(config.pool_grid, probed.image_side)
  if config.concat_layers:
    features.resolve_layers(config.concat_layers, probed.model_cfg.num_layers, "concat_layers")
  mesh = sharding.make_mesh(config.mesh)
  sources = labelled_sources(config.data, probed.image_side)
  cache_dir = storage.join(out_dir, FEATURES_DIR)
  log(f"Probing {probed.description} on {sources['train'].description} "
      f"({len(sources['train'])} train / {len(sources['val'])} val / {len(sources['test'])} "
      f"test), pooling {config.pooling}{_blocks(config.pool_grid)}")
  results = {"data": config.data.to_dict(), "pooling": config.pooling,
             "pool_grid": int(config.pool_grid),
             "examples": {k: len(v) for k, v in sources.items()},
             "pretrained": probe_model(probed, "pretrained", config, sources, mesh, cache_dir, log)}
  if config.random_init_control:
    control = trained.random_init(probed, config.random_init_seed)
    results["random_init"] = probe_model(control, "random-init", config, sources, mesh,
                                         cache_dir, log)
  results["time_s"] = time.time() - t0
  tag = _tag(config.data)
  results["files"] = {"json": storage.join(out_dir, f"results_{tag}.json"),
                      "png": storage.join(out_dir, f"accuracy_vs_layer_{tag}.png")}
  if jax.process_index() == 0:
    with fileio.atomic_open(results["files"]["json"]) as f:
      json.dump(results, f, indent=2)
    plot(results, results["files"]["png"])
  log(table(results))
  return results


# ----------------------------------------------------------------------------------------
# Reports


def table(results: dict) -> str:
  """The console table: test accuracy per layer, pretrained vs the random-init control."""
  pre, ctl = results["pretrained"], results.get("random_init")
  ctl_by_layer = {r["layer"]: r for r in ctl["layers"]} if ctl else {}
  head = f"{'layer':>5}  {'test acc %':>10}  {'val acc %':>9}  {'l2':>8}"
  head += f"  {'random-init test %':>18}" if ctl else ""
  lines = [head, "-" * len(head)]
  for r in pre["layers"]:
    line = (f"{r['layer']:>5}  {100 * r['test_accuracy']:>10.2f}  "
            f"{100 * r['val_accuracy']:>9.2f}  {r['l2']:>8g}")
    if ctl and r["layer"] in ctl_by_layer:
      line += f"  {100 * ctl_by_layer[r['layer']]['test_accuracy']:>18.2f}"
    lines.append(line)
  b = pre["best_layer"]
  lines.append(f"best layer (by val): {b['layer']}, test {100 * b['test_accuracy']:.2f}%"
               + (f"; random init best: {100 * ctl['best_layer']['test_accuracy']:.2f}%"
                  if ctl else ""))
  if "concat" in pre:
    c = pre["concat"]
    lines.append(f"layers {c['layers']} concatenated: test {100 * c['test_accuracy']:.2f}%")
  for r in pre.get("low_data", []):
    lines.append(f"{r['examples_per_class']} labels/class (layer {r['layer']}): test "
                 f"{100 * r['test_accuracy_mean']:.2f}% +- {100 * r['test_accuracy_std']:.2f}%"
                 f" over {r['draws']} draws")
  ex = results["examples"]
  lines.append(f"examples: {ex['train']} train, {ex['val']} val, {ex['test']} test; "
               f"{results['time_s']:.1f}s")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  """Test accuracy against layer (the paper's Figure 3 view), with the control if run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for key, style, label in (("pretrained", "o-", "pretrained"),
                            ("random_init", "s--", "random init (control)")):
    if key in results:
      rows = results[key]["layers"]
      ax.plot([r["layer"] for r in rows], [100 * r["test_accuracy"] for r in rows], style,
              label=label)
  best = results["pretrained"]["best_layer"]
  ax.axvline(best["layer"], color="grey", lw=0.8, ls=":")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel("layer (block index)")
  ax.set_ylabel("linear probe test accuracy (%)")
  ax.set_title(f"{results['data'].get('name') or results['data']['source']}, "
               f"{results['pooling']} pooling{_blocks(results.get('pool_grid', 1))}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with fileio.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
