"""Linear-probe settings for `probe.py`: which layers, how to pool, the L2 sweep, the data.

  python probe.py --workdir runs/igpt_s                       # CIFAR-10 (tfds), every layer
  python probe.py --workdir runs/tiny --config.data.source=digits --config.data.val_examples=200

The model (and its palette) comes from the command line (--workdir, or --hf and --palette); this
config says what to probe it on.
"""

import ml_collections

from igpt import config as config_lib


def get_config():
  c = ml_collections.ConfigDict()
  # Block indices: "all", one index, or a list like "8,12,-1" (negative: from the end).
  c.layers = "all"
  # "norm": mean over positions of the stream normalised without gain (the paper's f^l);
  # "raw": mean of the un-normalised stream (what the original authors' notebook used).
  c.pooling = "norm"
  # Pool over g x g blocks of the image and concatenate the block means (g*g*width features
  # per layer); 1 = the paper's mean over every position. Must divide the image side.
  c.pool_grid = 1
  # Also probe these layers' features concatenated ("" = no); e.g. "-3,-2,-1".
  c.concat_layers = ""
  # Probe a random-init model of the same shape too (the control: what pretraining bought).
  c.random_init_control = True
  c.random_init_seed = 0
  c.batch_size = 64  # images per forward pass (global, over all devices)
  # JAX's persistent compilation cache: "" = the user cache folder (~/.cache/igpt/jax),
  # "off", or a folder.
  c.compile_cache_dir = ""

  # L2 strengths (the l2 of mean CE + l2/2 ||W||^2, on standardised features), chosen by
  # accuracy on the validation carve of the training split.
  c.l2_grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  c.lbfgs_max_steps = 1000
  c.lbfgs_grad_tol = 1e-5  # stop when the gradient norm is below this

  # Low-data probes on the best layer (by validation accuracy): k labelled examples per
  # class, `draws` draws each (seeds seed .. seed+draws-1); () = skip.
  c.low_data = ml_collections.ConfigDict(dict(examples_per_class=(), draws=5, seed=0))

  # The labelled data (the run config's data fields; images are read at the model's side and
  # encoded with the model's palette).
  c.data = config_lib.data_section()
  c.data.max_examples_per_split = 0  # 0 = all; else the first N of each split (quick looks)

  # Devices: the batch is split over data x fsdp; params follow the run's sharding rules.
  c.mesh = config_lib.mesh_section()
  return c
