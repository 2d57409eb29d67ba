"""The run spec: a run config resolved and checked once, before any data, device or folder work.

    spec = resolve(config)          # raises one clear UserError for a config that cannot run
    spec.model, spec.objective, spec.mesh_shape, spec.rules, spec.config.train.batch_size

`resolve` is pure: each config section checks itself (`igpt.config`, `ModelConfig`,
`Objective.configure`, `sharding.mesh_shape`), and `resolve` adds only what two of them must
agree on; it reads no file (the palette and `init_from`'s run are read by the code that opens
them). It is the only place a run's derived objects (the model's shape, the configured
objective, the mesh sizes, the sharding rules, the attention kernel) are made; everything
downstream takes the spec.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import ml_collections

from igpt import config as config_lib
from igpt import objectives, sharding
from igpt.errors import UserError
from igpt.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A checked run: its frozen config and what is derived from it."""

  config: ml_collections.FrozenConfigDict  # every field set (the schema's defaults filled in)
  model: ModelConfig
  objective: objectives.Objective  # configured (mask rate, classes)
  mesh_shape: dict  # {'data', 'fsdp', 'tensor'} sizes over every device
  rules: tuple  # logical axis -> mesh axes
  attention: str  # the attention kernel `model.attention` resolves to here
  process_count: int

  @property
  def train(self):
    return self.config.train

  @property
  def data(self):
    return self.config.data

  def to_json(self) -> dict:
    """The config as stored in config.json and every checkpoint (the run's identity)."""
    return config_lib.to_json(self.config)


class Pretrained(NamedTuple):
  """What a run started from `init_from` takes of that run: its model's shape and palette."""

  model: ModelConfig
  palette_path: str
  palette_size: int


def model_config(config) -> ModelConfig:
  """The model of a run config (see `Objective.model_config`)."""
  return objectives.get(config.objective).model_config(config)


def resolve(config, num_devices: int | None = None, process_count: int | None = None,
            pretrained: Pretrained | None = None) -> RunSpec:
  """The checked spec of a run config on `num_devices` devices over `process_count` processes
  (default: what JAX sees). `pretrained`: the model of `init_from`'s run (read by the caller),
  whose shape this run takes. Raises UserError naming the field and the fix; reads no file,
  so a bad run fails in seconds."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  config = config_lib.complete(config)  # a private copy; the caller's config is untouched
  if pretrained is not None:
    shape = pretrained.model
    config.model.update(num_layers=shape.num_layers, d_model=shape.d_model,
                        num_heads=shape.num_heads, image_side=shape.image_side,
                        vocab_size=shape.vocab_size)
    config.data.update(palette_path=pretrained.palette_path,
                       palette_size=pretrained.palette_size)
  config_lib.check_run_config(config)
  objective = objectives.get(config.objective).configure(config)
  model_cfg = objective.model_config(config)
  attention = model_cfg.attention_implementation()  # a forced kernel that cannot run here
  sizes = sharding.mesh_shape(config.mesh, num_devices)
  sharding.check_batch_layout(config.train.batch_size, config.train.grad_accum_steps, sizes,
                              process_count)
  if config.train.sample_every_steps and not objective.causal:
    raise UserError(f"train.sample_every_steps={config.train.sample_every_steps}: only "
                    f"autoregressive models sample; objective {objective.name!r} does not. "
                    "Set it to 0.")
  if config.data.palette_size > model_cfg.vocab_size:
    raise UserError(
        f"model.vocab_size={model_cfg.vocab_size} is smaller than data.palette_size="
        f"{config.data.palette_size}: every palette colour needs a token.")
  rules = sharding.rules_from_config(config)  # unknown mesh axes in sharding_rules
  return RunSpec(config=ml_collections.FrozenConfigDict(config), model=model_cfg,
                 objective=objective, mesh_shape=sizes, rules=rules, attention=attention,
                 process_count=process_count)
