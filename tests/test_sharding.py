"""Mesh resolution, the logical-axis rules, and 8-device training == 1-device training."""

from __future__ import annotations

import json
import os
import sys
import types

import flax.linen as nn
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from igpt import model, sharding
from igpt.model import ModelConfig

import train_helpers as th


def _mesh_cfg(**sizes):
  return ml_collections.ConfigDict(sizes)


def test_mesh_shape_resolves_minus_one_and_rejects_bad_meshes():
  assert sharding.mesh_shape(_mesh_cfg(data=1, fsdp=-1, tensor=1), 8) == dict(data=1, fsdp=8, tensor=1)
  assert sharding.mesh_shape(_mesh_cfg(data=2, fsdp=-1, tensor=2), 8) == dict(data=2, fsdp=2, tensor=2)
  assert sharding.mesh_shape(_mesh_cfg(data=-1, fsdp=2, tensor=1), 8)["data"] == 4
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape(_mesh_cfg(data=3, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.mesh_shape(_mesh_cfg(data=2, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.mesh_shape(_mesh_cfg(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape(_mesh_cfg(data=1, fsdp=-1, pipeline=1), 8)
  assert sharding.data_parallel_size(dict(data=2, fsdp=2, tensor=2)) == 4


def test_rules_shard_params_fsdp_and_tensor_and_activations_over_batch():
  cfg = ModelConfig(num_layers=1, d_model=64, num_heads=4, seq_len=16, vocab_size=16)
  specs = nn.logical_to_mesh(model.logical_axes(cfg), sharding.DEFAULT_RULES)
  assert specs["wte"] == P("tensor", "fsdp")
  assert specs["wpe"] == P(None, "fsdp")
  assert specs["h_0"]["attn"]["q"] == P("fsdp", "tensor", None)
  assert specs["h_0"]["attn"]["c_proj"] == P("tensor", None, "fsdp")
  assert specs["h_0"]["mlp"]["c_fc"] == P("fsdp", "tensor")
  assert specs["h_0"]["mlp"]["c_proj"] == P("tensor", "fsdp")
  # Activations: the batch takes data x fsdp, so `embed` stays whole there.
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), sharding.DEFAULT_RULES) == \
      P(("data", "fsdp"), None, None)
  assert nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"), sharding.DEFAULT_RULES) == \
      P(("data", "fsdp"), None, "tensor", None)


def test_rules_are_config_overridable():
  config = ml_collections.ConfigDict({"sharding_rules": (("embed", None), ("mlp", ["fsdp", "tensor"]))})
  rules = dict(sharding.rules_from_config(config))
  assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")
  assert rules["batch"] == ("data", "fsdp")
  with pytest.raises(ValueError, match="not a mesh axis"):
    sharding.rules_from_config(ml_collections.ConfigDict({"sharding_rules": (("embed", "model"),)}))


def test_dimensions_a_mesh_axis_does_not_divide_stay_whole():
  mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 3, "tensor": 2})
  assert sharding._fit_spec(P("tensor", "fsdp"), (16, 64), mesh) == P("tensor", None)
  assert sharding._fit_spec(P(("data", "fsdp"), None), (12, 5), mesh) == P(("data", "fsdp"), None)
  assert sharding._fit_spec(P(("data", "fsdp")), (4,), mesh) == P("data")


@pytest.mark.slow
def test_8_devices_train_like_1_and_restore_across_meshes(tmp_path):
  out = tmp_path / "report.json"
  th.run([sys.executable, os.path.join(th.REPO, "tests", "sharding_check.py"), str(out),
          str(tmp_path / "ckpt")], num_devices=8)
  report = json.loads(out.read_text())
  for name, diffs in report["equality"].items():
    # float32, one device vs data x fsdp (x tensor) meshes, after two Adam steps.
    assert diffs["loss_diff"] < 1e-5, (name, diffs)
    assert diffs["param_diff"] < 1e-5, (name, diffs)
    assert diffs["opt_diff"] < 1e-5, (name, diffs)
  fsdp = report["fsdp"]
  for held in fsdp["param_bytes_per_device"]:
    assert held <= fsdp["total_param_bytes"] / 8 * 1.05, fsdp  # ~1/8 each, norms gains included
  for held in fsdp["opt_bytes_per_device"]:
    assert held <= fsdp["total_opt_bytes"] / 8 * 1.05, fsdp
  for shape, r in report["restore"].items():
    assert r["diff"] == 0.0 and r["layout_ok"], (shape, r)
    assert r["extra"] == {"data": {"next_step": 2}}
