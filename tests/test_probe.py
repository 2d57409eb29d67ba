"""Probes: pooled features, the L-BFGS logistic regression, L2 choice, low-data draws, the
feature cache, and probe.py end to end on a briefly trained tiny digits model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from igpt import config as config_lib
from igpt import features, linear_probe, model, pipeline, run, sharding, trained
from igpt.commands import probe as probing
from igpt.linear_probe import Split
from igpt.model import ModelConfig
from igpt.readers import TokenSource

import train_helpers as th

CFG = ModelConfig(num_layers=3, d_model=16, num_heads=2, seq_len=16, vocab_size=8)
ONE_DEVICE = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))


# Jitted: eager Flax apply takes seconds per call on a small CPU.
_apply = jax.jit(model.apply, static_argnums=0)


def _init(cfg, seed):
  """Random params of `cfg`'s shapes, drawn with numpy (compiling Flax's init is slow here)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def _mesh():
  return sharding.make_mesh(ONE_DEVICE, jax.devices()[:1])


def _token_source(n, seed=0, classes=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (n, CFG.seq_len))
  onehot = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, n)]
  return TokenSource(tokens, onehot, "made-up tokens")


def _probe_config(**overrides):
  spec = importlib.util.spec_from_file_location("probe_config",
                                                os.path.join(th.REPO, "configs", "probe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.update(source="digits", name="digits", val_examples=200)
  c.mesh.update(ONE_DEVICE)
  c.l2_grid = (1e-3, 1e-2, 1e-1)
  c.batch_size = 128
  for key, value in overrides.items():
    section, _, name = key.replace("__", ".").rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def _separable(n=300, d=20, classes=4, seed=0, noise=1.5):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, d))
  y = rng.integers(0, classes, n).astype(np.int32)
  return Split((centers[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y)


# ------------------------------------------------------------------------------------------
# Features.


def test_resolve_layers():
  assert features.resolve_layers("all", 4) == [0, 1, 2, 3]
  assert features.resolve_layers("2,-1, 0", 4) == [0, 2, 3]
  assert features.resolve_layers([-4, 1, 1], 4) == [0, 1]
  assert features.resolve_layers(3, 4) == [3]
  for bad in ("4", "-5", "x", ""):
    with pytest.raises(ValueError):
      features.resolve_layers(bad, 4)
  # The message names the field the indices came from.
  with pytest.raises(ValueError, match=r"concat_layers='x,y'"):
    features.resolve_layers("x,y", 4, "concat_layers")


@pytest.mark.parametrize("value", [("abc",), (4, "x"), (0,), (2.5,)])
def test_low_data_sizes_must_be_positive_whole_numbers(value):
  with pytest.raises(ValueError, match="low_data.examples_per_class=.*positive whole numbers"):
    config_lib.check_probe_settings(_probe_config(low_data__examples_per_class=value))


def test_a_low_data_size_above_a_class_is_refused_before_probing():
  config = _probe_config(low_data__examples_per_class=(2, 5))
  labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
  with pytest.raises(ValueError, match="has 5, but class 0 has only 3 training examples"):
    probing._check_low_data(config, labels)  # pylint: disable=protected-access
  probing._check_low_data(_probe_config(low_data__examples_per_class=(3,)), labels)  # pylint: disable=protected-access


@pytest.mark.parametrize("pooling", ["norm", "raw"])
def test_features_equal_hand_computation_from_hidden(pooling):
  params = _init(CFG, 1)
  source = _token_source(10)  # 10 rows in batches of 4: the last batch is padded
  extractor = features.FeatureExtractor(CFG, params, None, _mesh(), pooling=pooling,
                                        batch_size=4)
  feats, labels = extractor.compute(source, [0, 2])
  tokens, want_labels = source.get_tokens(np.arange(10))
  _, hidden = _apply(CFG, params, jnp.asarray(tokens))
  for k, layer in enumerate([0, 2]):
    h = np.asarray(hidden[f"h_{layer}"], np.float64)
    if pooling == "norm":
      h = h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(feats[:, k], h.mean(axis=1), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(labels, want_labels)


def test_grid_pooling_is_the_block_means_side_by_side():
  params = _init(CFG, 1)
  source = _token_source(6)
  side = math.isqrt(CFG.seq_len)
  extractor = features.FeatureExtractor(CFG, params, None, _mesh(), pooling="raw",
                                        batch_size=4, pool_grid=2)
  feats, _ = extractor.compute(source, [1])
  assert feats.shape == (6, 1, 4 * CFG.d_model)
  tokens, _ = source.get_tokens(np.arange(6))
  _, hidden = _apply(CFG, params, jnp.asarray(tokens))
  h = np.asarray(hidden["h_1"], np.float64).reshape(6, side, side, CFG.d_model)
  half = side // 2
  want = np.concatenate([h[:, r:r + half, c:c + half].mean(axis=(1, 2))
                         for r in (0, half) for c in (0, half)], axis=1)  # row-major blocks
  np.testing.assert_allclose(feats[:, 0], want, rtol=1e-4, atol=1e-5)
  for bad in (3, 0, 2.5):
    with pytest.raises(ValueError, match=f"pool_grid={bad!r} must be a positive divisor"):
      features.FeatureExtractor(CFG, params, None, _mesh(), pool_grid=bad)


def test_feature_cache_is_hit_on_the_second_call(tmp_path):
  params = _init(CFG, 2)
  source, key = _token_source(6), {"source": "made-up", "split": "train"}

  def extractor():
    return features.FeatureExtractor(CFG, params, None, _mesh(), batch_size=2,
                                     cache_dir=str(tmp_path), identity="test")

  first = extractor()
  feats, labels = first.features(source, key, [0, 1])
  assert (first.cache_hits, first.cache_misses) == (0, 2)
  second = extractor()
  again, labels_again = second.features(source, key, [1, 0, 2])  # layer 2 is new
  assert (second.cache_hits, second.cache_misses) == (2, 1)
  for layer in (0, 1):
    np.testing.assert_array_equal(feats[layer], again[layer])
  np.testing.assert_array_equal(labels, labels_again)
  # Other params (a retrained run in the same folder) must not reuse the cache.
  other = features.FeatureExtractor(CFG, _init(CFG, 3), None,
                                    _mesh(), batch_size=2, cache_dir=str(tmp_path),
                                    identity="test")
  other.features(source, key, [0])
  assert (other.cache_hits, other.cache_misses) == (0, 1)


def _damage_cache_file(path, how, other_path, digest):
  """Spoils one cache file as `how` says (`other_path`: another entry's file)."""
  with np.load(path) as f:
    feats, labels = f["features"], f["labels"]
  size = os.path.getsize(path)
  if how in ("half", "empty"):
    with open(path, "r+b") as f:
      f.truncate(size // 2 if how == "half" else 0)
  elif how == "random-bytes":
    with open(path, "wb") as f:
      f.write(np.random.default_rng(0).bytes(size))
  elif how == "another-entry":
    with open(other_path, "rb") as src, open(path, "wb") as dst:
      dst.write(src.read())
  else:
    arrays = {"wrong-width": dict(features=feats[:, 1:], labels=labels),
              "wrong-rows": dict(features=feats[1:], labels=labels[1:]),
              "no-labels": dict(features=feats)}[how]
    with open(path, "wb") as f:
      np.savez(f, key=np.array(digest), **arrays)


@pytest.mark.parametrize("how", ["half", "empty", "random-bytes", "wrong-width", "wrong-rows",
                                 "no-labels", "another-entry"])
def test_damaged_feature_cache_is_rebuilt_with_a_warning(tmp_path, how, caplog):
  params = _init(CFG, 2)
  source, key = _token_source(6), {"source": "made-up", "split": "train"}

  def extractor():
    return features.FeatureExtractor(CFG, params, None, _mesh(), batch_size=2,
                                     cache_dir=str(tmp_path), identity="test")

  fresh, labels = extractor().features(source, key, [0, 1])
  first = extractor()
  (path, digest), (other, _) = (first._cache_entry(key, layer) for layer in (1, 0))
  _damage_cache_file(path, how, other, digest)
  with caplog.at_level("WARNING"):
    again, labels_again = first.features(source, key, [0, 1])
  warnings = [r.getMessage() for r in caplog.records if "Feature cache" in r.getMessage()]
  assert len(warnings) == 1 and path in warnings[0], warnings
  assert (first.cache_hits, first.cache_misses) == (1, 1)
  for layer in (0, 1):
    np.testing.assert_array_equal(again[layer], fresh[layer])
  np.testing.assert_array_equal(labels_again, labels)
  # Rebuilt in place: the next reader hits both.
  second = extractor()
  second.features(source, key, [0, 1])
  assert (second.cache_hits, second.cache_misses) == (2, 0)


# ------------------------------------------------------------------------------------------
# The probe.


def test_lbfgs_logistic_regression_agrees_with_sklearn():
  data = _separable(n=400)
  train, test = data.take(np.arange(300)), data.take(np.arange(300, 400))
  l2 = 0.01
  clf = linear_probe.fit(train, 4, l2, max_steps=2000, tol=1e-7)
  mean, std = linear_probe.standardiser(train.x)
  x = (train.x - mean) / std
  # sklearn minimises C * sum CE + ||W||^2 / 2 = (mean CE + l2/2 ||W||^2) * C * N.
  sk = LogisticRegression(C=1 / (l2 * len(x)), solver="lbfgs", tol=1e-10, max_iter=10_000)
  sk.fit(x, train.y)
  p = sk.predict_proba(x)
  sk_loss = -np.log(p[np.arange(len(x)), train.y]).mean() + 0.5 * l2 * np.sum(sk.coef_**2)
  assert abs(clf.loss - sk_loss) <= 1e-4 * sk_loss
  assert clf.accuracy(test) == np.mean(sk.predict((test.x - mean) / std) == test.y)


def test_l2_is_chosen_without_the_test_split():
  data = _separable(n=500, seed=1, noise=3.0)
  train, val = data.take(np.arange(300)), data.take(np.arange(300, 400))
  test = data.take(np.arange(400, 500))
  poisoned = Split(np.full_like(test.x, np.nan), (test.y + 1) % 4)
  grid = (1e-3, 1e-1, 10.0)
  clean = linear_probe.probe(train, val, test, 4, grid)
  other = linear_probe.probe(train, val, poisoned, 4, grid)
  # The choice and the fit are the same whatever the test split holds.
  assert clean["l2"] == other["l2"]
  assert clean["val_accuracy_by_l2"] == other["val_accuracy_by_l2"]
  assert clean["loss"] == other["loss"]
  assert clean["val_accuracy"] == max(clean["val_accuracy_by_l2"].values())
  assert (clean["train_examples"], clean["val_examples"]) == (300, 100)


def test_low_data_draws_k_per_class_by_seed():
  labels = np.repeat(np.arange(5), 30)
  a = linear_probe.low_data_indices(labels, 4, seed=7, num_classes=5)
  assert np.array_equal(a, linear_probe.low_data_indices(labels, 4, seed=7, num_classes=5))
  assert not np.array_equal(a, linear_probe.low_data_indices(labels, 4, seed=8, num_classes=5))
  assert np.array_equal(np.bincount(labels[a], minlength=5), [4] * 5)
  assert len(set(a)) == 20
  with pytest.raises(ValueError, match="fewer than the 31 per class"):
    linear_probe.low_data_indices(labels, 31, seed=0, num_classes=5)
  data = _separable(n=400)
  r = linear_probe.low_data_probe(data.take(np.arange(300)), data.take(np.arange(300, 350)),
                                  data.take(np.arange(350, 400)), 4, k=4, draws=3, seed=0,
                                  l2_grid=(0.01, 1.0))
  assert len(r["test_accuracies"]) == 3 and 0 <= r["test_accuracy_std"] <= 1


def test_hf_checkpoint_and_openai_tokens_are_probe_sources(tmp_path):
  from igpt import palette, readers  # noqa: PLC0415
  from igpt.convert import hf as convert_hf  # noqa: PLC0415
  cfg = ModelConfig(num_layers=2, d_model=16, num_heads=2, seq_len=16, vocab_size=512)
  params = _init(cfg, 4)
  convert_hf.save_hf_checkpoint(cfg, params, str(tmp_path / "hf"))
  centers = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
  palette.save_palette(str(tmp_path / "palette.npy"), centers)
  pm = trained.load(hf=str(tmp_path / "hf"), palette=str(tmp_path / "palette.npy"))
  assert pm.model_cfg.num_layers == 2 and pm.image_side == 4
  np.testing.assert_allclose(pm.params["h_1"]["mlp"]["c_fc"], params["h_1"]["mlp"]["c_fc"])
  # OpenAI's pre-tokenised files: train / test, validation carved from train as tokens.
  rng = np.random.default_rng(1)
  for tag, n in (("tr", 30), ("te", 10)):
    np.save(tmp_path / f"cifar10_{tag}X.npy", rng.integers(0, 512, (n, 16)).astype(np.uint16))
    np.save(tmp_path / f"cifar10_{tag}Y.npy", np.eye(10, dtype=np.uint8)[np.arange(n) % 10])
  data = _probe_config(data__source="openai_npy", data__path=str(tmp_path),
                       data__name="cifar10", data__val_examples=10).data
  sources = probing.labelled_sources(data, 4)
  assert [len(sources[k]) for k in ("train", "val", "test")] == [20, 10, 10]
  tokens, labels = sources["val"].get_tokens(np.arange(3))
  assert tokens.shape == (3, 16) and labels.dtype == np.int32
  with pytest.raises(ValueError, match="8x8"):
    readers.make_source(data, "test", 8)


@pytest.mark.slow
def test_sharded_features_and_probe_match_one_device():
  proc = th.run([sys.executable, os.path.join(th.REPO, "tests", "probe_sharding_check.py")],
                num_devices=2)
  assert proc.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_data_is_refused(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), np.uint8)
  unlabelled = tmp_path / "unlabelled.npz"
  np.savez(unlabelled, x_train=images, x_test=images[:5])
  cfg = _probe_config(data__source="folder", data__path=str(unlabelled), data__val_examples=10)
  with pytest.raises(ValueError, match="has no labels"):
    probing.labelled_sources(cfg.data, 8)
  empty = tmp_path / "empty.npz"
  labels = np.arange(40) % 2
  np.savez(empty, x_train=images, y_train=labels, x_test=images[:0], y_test=labels[:0])
  cfg = _probe_config(data__source="folder", data__path=str(empty), data__val_examples=10)
  with pytest.raises(ValueError, match="empty"):
    probing.labelled_sources(cfg.data, 8)
  with pytest.raises(FileNotFoundError, match="not a run folder"):
    trained.load(workdir=str(tmp_path))
  (tmp_path / "run").mkdir()  # a run folder killed before its first checkpoint
  run.write_json(str(tmp_path / "run"), run.CONFIG_FILE, config_lib.to_json(th.tiny_config()))
  np.save(tmp_path / "run" / "palette.npy", np.zeros((16, 3), np.float32))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    trained.load(workdir=str(tmp_path / "run"))
  with pytest.raises(ValueError, match="pooling"):
    config_lib.check_probe_settings(_probe_config(pooling="max"))


# ------------------------------------------------------------------------------------------
# End to end: a briefly trained tiny model, probed through the CLI.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  from igpt.train import train_and_evaluate  # noqa: PLC0415
  workdir = str(tmp_path_factory.mktemp("probe_run"))
  steps = 40
  train_and_evaluate(th.tiny_config(train__total_steps=steps, train__checkpoint_every_steps=steps,
                                    train__eval_every_steps=steps, train__log_every_steps=steps,
                                    data__val_examples=200), workdir)
  return workdir


def _probe_cli(workdir, *flags):
  args = [sys.executable, os.path.join(th.REPO, "probe.py"), "--workdir", workdir,
          "--config.data.source=digits", "--config.data.name=digits",
          "--config.data.val_examples=200", "--config.l2_grid=(0.001,0.01,0.1)",
          "--config.batch_size=128", *flags]
  return subprocess.run(args, env=th.env(1), cwd=th.REPO, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.slow
def test_cli_end_to_end_beats_random_init(tiny_run):
  proc = _probe_cli(tiny_run, "--config.low_data.examples_per_class=(4,)",
                    "--config.low_data.draws=2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  out_dir = os.path.join(tiny_run, "probe")
  with open(os.path.join(out_dir, "results_digits.json")) as f:
    results = json.load(f)
  assert os.path.getsize(os.path.join(out_dir, "accuracy_vs_layer_digits.png")) > 1000
  assert "random-init test" in proc.stdout and "best layer" in proc.stdout
  pre, ctl = results["pretrained"], results["random_init"]
  assert [r["layer"] for r in pre["layers"]] == [0, 1]
  assert results["examples"] == {"train": 1237, "val": 200, "test": 360}
  assert pre["low_data"][0]["examples_per_class"] == 4
  # A real learning signal: 40 steps of pretraining beat the same probe on random init.
  assert pre["best_layer"]["test_accuracy"] > ctl["best_layer"]["test_accuracy"] + 0.05
  # Two layers x three splits, computed once and written to the cache.
  assert pre["feature_cache"]["cache_misses"] == 6


@pytest.mark.slow
def test_cli_rebuilds_a_cut_off_feature_cache(tiny_run):
  cache = os.path.join(tiny_run, "probe", probing.FEATURES_DIR)
  flags = ("--config.random_init_control=False",)
  if not os.path.isdir(cache):  # run on its own: the end-to-end test above made none yet
    assert _probe_cli(tiny_run, *flags).returncode == 0
  files = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith(".npz")]
  for path in files:  # the random-init control's too: the names do not say whose a file is
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  proc = _probe_cli(tiny_run, *flags)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  warned = [line for line in proc.stderr.splitlines() if "Feature cache" in line]
  assert len(warned) == 6 and all("unreadable (BadZipFile" in line for line in warned), warned
  with open(os.path.join(tiny_run, "probe", "results_digits.json")) as f:
    cache_counts = json.load(f)["pretrained"]["feature_cache"]
  assert cache_counts == {"cache_hits": 0, "cache_misses": 6}


@pytest.mark.slow
def test_cli_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path):
  for flags, message in (((), "not a run folder"), (("--config.layers=5",), "out of range"),
                         (("--config.layer=5",), "field 'layer' in --config.layer (did you mean"),
                         (("--layers=5",), "Unknown command line flag 'layers'")):
    workdir = str(tmp_path) if not flags else tiny_run
    proc = _probe_cli(workdir, "--config.random_init_control=False", *flags)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------
# Fine-tuning through the trainer.


def test_augment_pads_crops_and_flips_deterministically():
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), np.uint8)
  a = pipeline.augment_images(images, np.random.default_rng(1))
  assert a.shape == images.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, pipeline.augment_images(images, np.random.default_rng(1)))
  # Without padding the crop is the image itself, flipped or not.
  plain = pipeline.augment_images(images, np.random.default_rng(2), pad=0)
  for got, want in zip(plain, images):
    assert np.array_equal(got, want) or np.array_equal(got, want[:, ::-1])


@pytest.mark.slow
def test_finetune_from_a_run_beats_chance(tiny_run, tmp_path):
  from igpt.train import train_and_evaluate  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("finetune_config",
                                                os.path.join(th.REPO, "configs", "finetune.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("digits")
  c.init_from = tiny_run
  c.mesh.update(ONE_DEVICE)
  c.optim.update(lr=3e-3, warmup_steps=5)
  c.train.update(total_steps=80, eval_every_steps=40, checkpoint_every_steps=80,
                 log_every_steps=40)
  final = train_and_evaluate(c, str(tmp_path / "ft"))
  # The pretrained run's shape and palette were taken over; chance is 10%.
  with open(tmp_path / "ft" / "config.json") as f:
    assert json.load(f)["model"]["d_model"] == th.TINY_OVERRIDES["model.d_model"]
  assert final["test_accuracy"] > 0.25, final  # about 0.43 measured
  assert final["best_eval_accuracy"] == max(final["best_eval_accuracy"], final["eval_accuracy"])
  assert os.path.isfile(tmp_path / "ft" / "best" / "best.json")
  # The fine-tuned run reads back like any run, its classifier head apart.
  tuned = trained.load_run(str(tmp_path / "ft"))
  assert tuned.head["clf"]["w"].shape == (th.TINY_OVERRIDES["model.d_model"], 10)
  assert set(tuned.params) == set(trained.load_run(tiny_run).params)
