"""A trained model: load_run reads config, palette and params only; save_run round-trips."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from igpt import checkpoint, model, palette, run, spec, train, trained
from igpt import config as config_lib
from igpt.errors import UserError

import train_helpers as th


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "tiny")
  th.run(th.cli_args(workdir, **{"train.total_steps": 8, "train.checkpoint_every_steps": 4}))
  return workdir


@pytest.mark.slow
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


LEGACY = os.path.join(th.REPO, "tests", "fixtures", "run_before_model_json")


@pytest.mark.slow
def test_a_run_folder_from_before_model_json_loads_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(os.path.join(LEGACY, "run"), workdir)
  loaded = trained.load_run(workdir)
  assert loaded.step == 2
  assert loaded.model_cfg == model.ModelConfig(num_layers=1, d_model=16, num_heads=2, seq_len=64,
                                               vocab_size=16)
  expected = np.load(os.path.join(LEGACY, "expected_logits.npz"))
  logits, _ = model.apply(loaded.model_cfg, loaded.params, expected["tokens"])
  np.testing.assert_allclose(np.asarray(logits), expected["logits"], rtol=1e-6, atol=1e-7)
  # Training resumes it (and from then on stores the model's shape with the weights).
  config = config_lib.complete(run.read_config(workdir))
  config.train.total_steps = 3
  assert train.train_and_evaluate(config, workdir)["step"] == 3
  record = json.load(open(run.path(workdir, run.MODEL_FILE)))
  assert model.ModelConfig.from_dict(record["model"]) == loaded.model_cfg
  assert trained.load_run(workdir).step == 3


def test_the_model_shape_and_palette_are_stored_with_the_weights(finished_run, tmp_path):
  loaded = trained.load_run(finished_run)
  record = json.load(open(run.path(finished_run, run.MODEL_FILE)))
  assert model.ModelConfig.from_dict(record["model"]) == loaded.model_cfg
  assert record["palette"] == palette.identity(loaded.palette)
  with run.checkpointer(finished_run) as ckpt:
    extra = ckpt.read_extra(8)
  assert (extra["model"], extra["palette"]) == (record["model"], record["palette"])
  # The checkpoint, not config.json, says what the weights are: a config edited by hand does
  # not change what loads.
  copy = str(tmp_path / "copy")
  shutil.copytree(finished_run, copy)
  edited = json.load(open(run.path(copy, run.CONFIG_FILE)))
  edited["model"]["d_model"] = 64
  json.dump(edited, open(run.path(copy, run.CONFIG_FILE), "w"))
  assert trained.load_run(copy).model_cfg == loaded.model_cfg
  # Another palette in the folder is refused, naming the file (unless one is given).
  palette.save_palette(run.path(copy, run.PALETTE_FILE), loaded.palette[::-1])
  with pytest.raises(UserError, match="is not the palette checkpoint 8 was trained with"):
    trained.load_run(copy)
  given = str(tmp_path / "given.npy")
  palette.save_palette(given, loaded.palette[::-1])
  np.testing.assert_array_equal(trained.load_run(copy, palette=given).palette,
                                loaded.palette[::-1])
