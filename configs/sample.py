"""Sampling settings for `sample.py` (the model and its data come from the run folder).

  python sample.py --workdir runs/tiny --config.prompt_rows=4 --config.temperature=0.9
  python sample.py --workdir runs/tiny --config.mode=unconditional --config.num_samples=16

Every field, its default and what it means: `igpt.config.sample_settings` (or
`python sample.py --help`). A copy of this file that changes values is a settings file of your
own (`--config my_sample.py`).
"""

from igpt import config as config_lib


def get_config():
  return config_lib.sample_settings()
