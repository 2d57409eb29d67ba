"""Pretraining on real CIFAR-10 images within about 30 CPU-minutes (a 2-core machine), to probe.

  python train.py --config configs/cifar_cpu.py --workdir runs/cifar_cpu \\
      --config.data.path=.../cifar-10-batches-py
  python probe.py --workdir runs/cifar_cpu --config.data.source=cifar \\
      --config.data.path=.../cifar-10-batches-py --config.data.val_examples=500 \\
      --config.pool_grid=4 --config.concat_layers=all

The tiny model's shape (4 layers, width 128) at 16x16, on CIFAR files (`data.source=cifar`).
`bench/bench_learning.py` runs both steps and prints the probe table with the controls; the
docs/probing.md gives the measured numbers.
"""

from igpt.config import base_config


def get_config():
  c = base_config(num_layers=4, d_model=128, num_heads=4, image_side=16)
  c.data.source = "cifar"
  c.data.name = "cifar10"
  c.data.path = ""  # the cifar-10-batches-py folder
  c.data.val_examples = 500
  c.data.palette_size = 128  # measured better than 512 at this budget (44.7% vs 39.6%)
  c.data.palette_fit_pixels = 200_000
  c.data.augment = True  # random crops and flips: more images from a small set
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.batch_size = 32
  c.train.total_steps = 2000
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 500
  c.train.eval_batches = 16  # the whole 500-image validation carve
  c.train.checkpoint_every_steps = 500
  return c
