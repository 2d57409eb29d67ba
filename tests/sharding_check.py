"""Run with 8 fake CPU devices (tests/test_sharding.py does): sharded training == one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py OUT.json CKPT_DIR

Trains two steps of the tiny model from the same init on the same batch on several meshes and
writes, per mesh, the loss and the largest param difference from a single-device run; the
bytes each device holds under pure FSDP; and the differences after saving on one mesh and
restoring on others.
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_helpers as th  # noqa: E402

from igpt import sharding, train  # noqa: E402
from igpt.checkpoint import Checkpointer  # noqa: E402


def mesh_of(data, fsdp, tensor):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                            jax.devices()[:data * fsdp * tensor])


def two_steps(config, mesh, tokens):
  state, shardings = train.create_train_state(train.TrainSetup.build(th.spec_for(config, mesh), mesh), jax.random.key(0))
  step = train.make_train_step(train.TrainSetup.build(th.spec_for(config, mesh), mesh), shardings)
  batch = sharding.global_batch({"tokens": tokens}, mesh)
  with jax.set_mesh(mesh):
    for i in range(2):  # step 0 has lr 0 (warm-up): the 2nd step moves the params
      state, m = step(state, batch, jax.random.fold_in(jax.random.key(1), i))
  return state, {k: float(v) for k, v in jax.device_get(m).items()}


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


def main(out_path, ckpt_dir):
  assert jax.device_count() == 8, jax.devices()
  report = {"equality": {}}
  config = th.tiny_config(model__d_model=64, model__num_heads=4, optim__clip_grad_norm=1.0)
  tokens = np.random.default_rng(0).integers(0, 16, (16, 64)).astype(np.int32)
  ref_state, ref_m = two_steps(config, mesh_of(1, 1, 1), tokens)

  def compare(name, state, m):
    report["equality"][name] = {"loss_diff": abs(m["loss"] - ref_m["loss"]),
                                "param_diff": max_diff(state["params"], ref_state["params"]),
                                "opt_diff": max_diff(state["opt"], ref_state["opt"])}

  # (AR only: BERT's masks come from a partitionable threefry, the same on every mesh.)
  saved, m = two_steps(config, mesh_of(2, 4, 1), tokens)  # also saved/restored below
  compare("data x fsdp (2, 4, 1)", saved, m)
  compare("data x fsdp x tensor (2, 2, 2)", *two_steps(config, mesh_of(2, 2, 2), tokens))
  # Gradient accumulation on a sharded mesh (1 row per device per micro-batch).
  config.train.grad_accum_steps = 2
  compare("accum 2, (2, 4, 1)", *two_steps(config, mesh_of(2, 4, 1), tokens))
  config.train.grad_accum_steps = 1

  # Pure FSDP: every device should hold ~1/8 of the params (and of Adam's moments).
  fsdp_state, _ = train.create_train_state(train.TrainSetup.build(th.spec_for(config, mesh_of(1, 8, 1)), mesh_of(1, 8, 1)), jax.random.key(0))
  total = sum(x.nbytes for x in jax.tree.leaves(fsdp_state["params"]))
  held = sharding.bytes_per_device(fsdp_state["params"])
  held_opt = sharding.bytes_per_device(fsdp_state["opt"])
  report["fsdp"] = {"total_param_bytes": total, "param_bytes_per_device": list(held.values()),
                    "opt_bytes_per_device": list(held_opt.values()),
                    "total_opt_bytes": sum(x.nbytes for x in jax.tree.leaves(fsdp_state["opt"]))}

  # Save on a data x fsdp mesh, restore on pure FSDP, on one device and with tensor parallelism.
  saved_host = jax.device_get(saved)
  with Checkpointer(ckpt_dir, keep=2) as ckpt:
    ckpt.save(2, saved, {"data": {"next_step": 2}})
  report["restore"] = {}
  for shape in [(1, 8, 1), (1, 1, 1), (2, 2, 2)]:
    mesh = mesh_of(*shape)
    abstract, shardings = train.abstract_train_state(train.TrainSetup.build(th.spec_for(config, mesh), mesh))
    with Checkpointer(ckpt_dir, keep=2) as ckpt:
      restored, extra = ckpt.restore(2, abstract)
    ok_layout = all(x.sharding == s for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)))
    report["restore"][str(shape)] = {"diff": max_diff(restored, saved_host), "layout_ok": ok_layout,
                                     "extra": extra}
  with open(out_path, "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])
