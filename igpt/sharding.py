"""Device mesh and the one table that maps logical axis names to mesh axes.

The model names every param and activation dimension (`batch`, `length`, `embed`, `heads`,
`kv`, `mlp`, `vocab`, `layers`); this module decides where each goes on a 3-axis mesh:

- ``data``:   pure data parallelism; params replicated across it.
- ``fsdp``:   data parallelism whose params and optimiser state are sharded across it
              (ZeRO-3 style: each device keeps 1/fsdp of every weight, gathered per use).
- ``tensor``: Megatron-style model parallelism over attention heads, MLP hidden units
              and the vocabulary.

The mesh sizes come from `config.mesh` (`-1` = all remaining devices); the rules table can be
overridden per entry with `config.sharding_rules` (a sequence of `(logical, mesh_axes)`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from igpt.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Flax resolves rules in order, giving each mesh axis to the first logical dimension of an
# array that claims it. So in an activation [batch, length, embed] the batch takes
# (data, fsdp) and `embed` stays whole, while a weight [embed, mlp] (no batch) gets its
# `embed` dimension sharded over fsdp: FSDP for params, data parallelism for activations.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
)

# The batch dimension of inputs (tokens, labels) and of every activation.
BATCH_AXES = ("data", "fsdp")


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """The default rules with any `config.sharding_rules` entries replacing theirs by name."""
  overrides = {}
  for entry in config.sharding_rules or ():
    logical, mesh_axes = entry
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise UserError(f"sharding_rules: {logical!r} -> {axis!r} is not a mesh axis "
                        f"(one of {MESH_AXES}).")
    overrides[logical] = mesh_axes
  rules = [(name, overrides.pop(name, axes)) for name, axes in DEFAULT_RULES]
  return tuple(rules) + tuple(overrides.items())


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` (sizes, at most one -1) against `num_devices`.

  Pure and cheap, so a bad mesh fails before any device work or compile.
  """
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise UserError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise UserError(f"config.mesh={sizes}: at most one axis may be -1 (all remaining devices).")
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise UserError(f"config.mesh={sizes}: sizes must be positive or -1.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise UserError(
          f"config.mesh={sizes}: the fixed axes multiply to {fixed}, which does not divide the "
          f"{num_devices} devices available.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(
        f"config.mesh={sizes} needs {fixed} devices but {num_devices} are available; "
        "make the sizes multiply to the device count or set one axis to -1.")
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  Axis types are Auto so Linen's logical sharding constraints apply inside `jax.jit`.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def check_batch_layout(batch_size: int, grad_accum_steps: int, sizes: dict,
                       process_count: int) -> None:
  """A UserError unless every device gets whole micro-batches of the global batch and every
  process its own rows of it."""
  dp = data_parallel_size(sizes)
  if batch_size % (dp * grad_accum_steps):
    raise UserError(
        f"train.batch_size={batch_size} is not divisible by the data-parallel size "
        f"(mesh data x fsdp = {sizes['data']} x {sizes['fsdp']} = {dp}) times "
        f"train.grad_accum_steps={grad_accum_steps}; each device needs a whole micro-batch.")
  if batch_size % process_count:
    raise UserError(f"train.batch_size={batch_size} is not divisible by the {process_count} "
                    "processes.")
  if process_count > 1 and dp % process_count:
    raise UserError(
        f"the data-parallel size {dp} must be a multiple of the {process_count} processes, "
        "so every process feeds its own rows of the batch.")


def data_parallel_size(mesh_or_sizes) -> int:
  """How many ways the batch is split (data x fsdp)."""
  sizes = mesh_or_sizes.shape if isinstance(mesh_or_sizes, Mesh) else mesh_or_sizes
  return math.prod(sizes[axis] for axis in BATCH_AXES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a 16-way vocab on 3 devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = axes if isinstance(axes, tuple) else (axes,) if axes is not None else ()
    kept, ways = [], 1
    for name in names:
      if dim % (ways * mesh.shape[name]) == 0:
        kept.append(name)
        ways *= mesh.shape[name]
    fitted.append(tuple(kept) if len(kept) > 1 else kept[0] if kept else None)
  return P(*fitted)


def logical_to_shardings(logical_tree, shapes_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs (e.g. `model.logical_axes`).

  `shapes_tree` (arrays or ShapeDtypeStructs, same structure) lets dimensions that a mesh axis
  does not divide fall back to replication instead of failing at compile time.
  """
  mesh_specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
      mesh_specs, shapes_tree, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Inputs [batch, ...]: split over data x fsdp, replicated over tensor."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def bytes_per_device(tree) -> dict[int, int]:
  """Bytes of `tree`'s arrays held on each device (to check FSDP really shards)."""
  held: dict[int, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return held
