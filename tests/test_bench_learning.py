"""bench/bench_learning.py runs end to end on a few made-up CIFAR images (the numbers it
prints come from real data, in a benchmark run, not from here)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th


def _write_cifar(folder, name, n, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
  record = {b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
            b"labels": [int(i % 10) for i in range(n)], b"batch_label": b"fixture"}
  with open(folder / name, "wb") as f:
    pickle.dump(record, f, protocol=2)


@pytest.mark.slow
def test_the_learning_benchmark_prints_its_table(tmp_path):
  cifar = tmp_path / "cifar-10-batches-py"
  cifar.mkdir()
  _write_cifar(cifar, "data_batch_1", 60, 0)
  _write_cifar(cifar, "test_batch", 20, 1)
  sets = {"train.total_steps": 4, "optim.warmup_steps": 1, "train.batch_size": 8,
          "train.log_every_steps": 2, "train.eval_every_steps": 4, "train.eval_batches": 1,
          "train.checkpoint_every_steps": 4, "data.val_examples": 10, "data.palette_size": 16,
          "data.palette_fit_pixels": 2000, "mesh.fsdp": 1}
  args = [sys.executable, os.path.join(th.REPO, "bench", "bench_learning.py"),
          "--cifar_dir", str(cifar), "--workdir", str(tmp_path / "run"), "--val_examples=10"]
  args += [f"--set={k}={v}" for k, v in sets.items()]
  proc = subprocess.run(args, env=th.env(1), cwd=th.REPO, capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  for row in ("bits/dim (validation, final)", "layer 3", "best layer by val",
              "all layers concatenated", "raw pixels", "CPU-min"):
    assert row in out, (row, out[-3000:])
