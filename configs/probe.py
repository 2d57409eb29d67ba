"""Linear-probe settings for `probe.py`: which layers, how to pool, the L2 sweep, the data.

  python probe.py --workdir runs/igpt_s                       # CIFAR-10 (tfds), every layer
  python probe.py --workdir runs/tiny --config.data.source=digits --config.data.val_examples=200

The model (and its palette) comes from the command line (--workdir, or --hf and --palette); this
config says what to probe it on. Every field, its default and what it means:
`igpt.config.probe_settings` (or `python probe.py --help`).
"""

from igpt import config as config_lib


def get_config():
  return config_lib.probe_settings()
