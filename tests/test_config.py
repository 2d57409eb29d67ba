"""The config files: every one loads, paper sizes and their dataset variants."""

import glob
import os

import pytest
from absl import flags
from ml_collections import config_flags

from igpt import config as config_lib
from igpt import spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(spec: str):
  """Parses `--config spec` the way train.py does (a locked config: only its fields can be
  overridden)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
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
  cfg = spec.model_config(config)
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


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES
                                  if os.path.basename(p) not in ENTRY_POINT_CONFIGS],
                         ids=os.path.basename)
def test_every_run_config_has_every_field_of_the_schema(path):
  # The base config holds every field a run reads, so any --config.x override works on any
  # config file and nothing is read with a hidden default.
  config = _load(path)
  assert set(config_lib.flatten(config.to_dict())) == set(config_lib.default_fields())
  config.optim.schedule = "constant"  # what --config.optim.schedule=constant sets
  config.data.augment, config.init_from, config.finetune.num_classes = True, "runs/x", 10


def test_resumable_fields_are_declared_with_the_schema():
  for field in ("train.total_steps", "model.attention", "mesh.fsdp", "guard.max_loss_ratio"):
    assert config_lib.may_change_on_resume(field), field
  for field in ("model.d_model", "seed", "data.palette_size", "optim.lr", "train.batch_size",
                "data.augment", "init_from"):
    assert not config_lib.may_change_on_resume(field), field


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="unknown config variant 'cifar'.*cifar10"):
    config_lib.paper_config("s", "cifar")
