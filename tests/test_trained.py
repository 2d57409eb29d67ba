"""A trained model: load_run reads config, palette and params only; save_run round-trips."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from igpt import checkpoint, model, palette, run, spec, trained

import train_helpers as th


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "tiny")
  th.run(th.cli_args(workdir, **{"train.total_steps": 8, "train.checkpoint_every_steps": 4}))
  return workdir


def test_load_run_returns_the_final_params_without_reading_the_optimiser(finished_run, tmp_path):
  config = run.read_config(finished_run)
  step, state, _ = th.restore_latest(config, finished_run)
  # Remove every optimiser item: load_run must not need (or read) it.
  copy = str(tmp_path / "copy")
  shutil.copytree(finished_run, copy)
  ckpt_dir = run.path(copy, run.CHECKPOINT_DIR)
  for s in os.listdir(ckpt_dir):
    shutil.rmtree(os.path.join(ckpt_dir, s, checkpoint.REST_ITEM))
  loaded = trained.load_run(copy)
  assert loaded.step == step == 8
  assert loaded.model_cfg == spec.model_config(config)
  np.testing.assert_array_equal(loaded.palette, palette.load_palette(run.path(copy, "palette.npy")))
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert trained.load_run(copy, step=4).step == 4


def test_load_run_errors_name_the_folder(tmp_path, finished_run):
  with pytest.raises(FileNotFoundError, match="not a run folder"):
    trained.load_run(str(tmp_path))
  with pytest.raises(ValueError, match="No checkpoint for step 3"):
    trained.load_run(finished_run, step=3)


def test_load_run_skips_a_damaged_newest_checkpoint_and_changes_nothing(finished_run, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(finished_run, copy)
  ckpt_dir = run.path(copy, run.CHECKPOINT_DIR)
  data = os.path.join(ckpt_dir, "8", checkpoint.PARAMS_ITEM, "ocdbt.process_0", "d")
  os.truncate(max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize), 100)
  before = sorted(os.listdir(ckpt_dir))
  assert trained.load_run(copy).step == 4
  assert sorted(os.listdir(ckpt_dir)) == before  # a reader moves nothing aside
  with pytest.raises(ValueError, match=r"checkpoint 8 in .* does not read .*available: \[4\]"):
    trained.load_run(copy, step=8)


def test_save_run_round_trips_a_params_only_run(tmp_path):
  config = th.tiny_config()
  cfg = spec.model_config(config)
  params = model.init_params(cfg, jax.random.key(3))
  centers = np.linspace(-1, 1, 16 * 3, dtype=np.float32).reshape(16, 3)
  trained.save_run(str(tmp_path / "imported"), config, centers, params, step=5)
  loaded = trained.load_run(str(tmp_path / "imported"))
  assert loaded.step == 5 and loaded.model_cfg == cfg
  np.testing.assert_array_equal(loaded.palette, centers)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="params do not match"):
    trained.save_run(str(tmp_path / "bad"), config, centers, {"wte": params["wte"]})
