"""Shared bits of the trainer tests: a very small run config and subprocess launchers."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest model that still learns the digits in a few dozen steps on 2 CPU cores.
TINY_OVERRIDES = {
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
    "train.batch_size": 16, "train.total_steps": 12, "train.log_every_steps": 4,
    "train.eval_every_steps": 6, "train.eval_batches": 1, "train.checkpoint_every_steps": 4,
    "optim.lr": 3e-3, "optim.warmup_steps": 2, "data.palette_fit_pixels": 20_000,
    "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
}


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py (digits, 8x8, 16 colours) shrunk further; `a__b=v` overrides `a.b`."""
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  c = tiny.get_config()
  for key, value in {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def cli_args(workdir: str, **overrides) -> list[str]:
  """`python train.py` argv for configs/tiny.py with the TINY_OVERRIDES (+ `overrides`)."""
  merged = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return ([sys.executable, os.path.join(REPO, "train.py"),
           "--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", workdir]
          + [f"--config.{k}={v}" for k, v in merged.items()])


def env(num_devices: int = 1, **extra) -> dict:
  """A subprocess environment with `num_devices` fake CPU devices."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  e.update({k: str(v) for k, v in extra.items()})
  return e


def run(args, num_devices: int = 1, timeout: float = 300, **extra_env) -> subprocess.CompletedProcess:
  proc = subprocess.run(args, env=env(num_devices, **extra_env), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode:
    raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  return proc


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def spec_for(config, mesh):
  """The run spec of `config` on `mesh`'s devices (its mesh section set to `mesh`'s shape)."""
  from igpt import spec  # noqa: PLC0415

  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh = ml_collections.ConfigDict(dict(mesh.shape))
  return spec.resolve(config, num_devices=mesh.size, process_count=1)


def restore_latest(config, workdir: str, mesh=None):
  """(step, state, extra) of the newest checkpoint in `workdir`, on `mesh` (default: 1 device)."""
  import jax  # noqa: PLC0415

  from igpt import run, sharding, train  # noqa: PLC0415
  from igpt.checkpoint import Checkpointer  # noqa: PLC0415

  if mesh is None:
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                              jax.devices()[:1])
  abstract, _ = train.abstract_train_state(train.TrainSetup.build(spec_for(config, mesh), mesh))
  ckpt = Checkpointer(run.path(workdir, run.CHECKPOINT_DIR), keep=100)
  try:
    step = ckpt.latest_step()
    state, extra = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return step, state, extra


def read_tensorboard_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} as TensorBoard itself reads workdir/tensorboard (purges
  applied), not as the writer meant it."""
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415

  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                           size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_tensorboard_images(workdir: str) -> dict[str, list[tuple[int, bytes]]]:
  """{tag: [(step, encoded image), ...]} as TensorBoard reads workdir/tensorboard."""
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415

  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                           size_guidance={"images": 0})
  acc.Reload()
  return {tag: [(e.step, e.encoded_image_string) for e in acc.Images(tag)]
          for tag in acc.Tags()["images"]}
