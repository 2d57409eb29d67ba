"""A small iGPT that trains in minutes on a laptop CPU, on the embedded digits set (8x8).

  python train.py --config configs/tiny.py --workdir runs/tiny
"""

from igpt.config import base_config


def get_config():
  c = base_config(num_layers=4, d_model=128, num_heads=4, image_side=8)
  c.data.source = "digits"
  c.data.name = "digits"
  c.data.val_examples = 200
  c.data.palette_size = 16
  c.data.palette_fit_pixels = 100_000
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.train.batch_size = 64
  c.train.total_steps = 500  # the 1,437 training digits overfit past ~500 steps
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 100
  c.train.eval_batches = 4  # the whole 200-image validation split
  c.train.checkpoint_every_steps = 250
  return c
