"""The config files: every one loads, paper sizes and their dataset variants."""

import glob
import os

import pytest
from absl import flags
from ml_collections import config_flags

from igpt import config as config_lib
from igpt import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(spec: str):
  """Parses `--config spec` the way train.py does."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
  flag_values(["prog", f"--config={spec}"])
  return flag_values.config


# Settings of the probe.py and sample.py entry points; every other file is a run config.
ENTRY_POINT_CONFIGS = {"probe.py", "sample.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_builds_a_model(path):
  config = _load(path)
  if os.path.basename(path) in ENTRY_POINT_CONFIGS:
    assert "model" not in config and "optim" not in config  # the run's own config decides those
    return
  cfg = run.model_config(config)
  assert cfg.seq_len == config.model.image_side ** 2
  assert 0 < config.optim.warmup_steps < config.train.total_steps


@pytest.mark.parametrize("variant, name, val_split", [
    ("", "imagenet_resized/32x32", "validation"), ("cifar10", "cifar10", ""),
    ("cifar100", "cifar100", "")])
def test_paper_config_variants(variant, name, val_split):
  spec = os.path.join(REPO, "configs", "igpt_s.py") + (f":{variant}" if variant else "")
  config = _load(spec)
  assert (config.data.name, config.data.val_split) == (name, val_split)
  assert config.model.num_layers == 24 and config.optim.lr == 3e-3


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="unknown config variant 'cifar'.*cifar10"):
    config_lib.paper_config("s", "cifar")
