"""Checkpoints as a thin wrapper over Orbax; the only module in igpt that imports it.

Step N lives in `<directory>/N/` and holds up to three items: ``params`` (the model's
params), ``train_state`` (the rest of the trainer's state dict: optimiser moments, step
counter; absent for an imported model) and ``extra`` (a JSON dict: data position, config...).
Array items are written with StandardSave. A reader that needs only the params restores the
``params`` item and never reads the optimiser's bytes.
Orbax writes a step into `<directory>/N.orbax-checkpoint-tmp/` and renames it to `N/` only after
every process has written all of it, and an old step is deleted only after the new one is
renamed. So a process killed at any point leaves only whole checkpoints under plain step names;
`latest_step()` never returns a half-written one. A stray tmp dir is replaced when that step is
saved again. Every process of a multi-host job calls every method; Orbax picks the writers.
"""

from __future__ import annotations

import json
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from igpt import storage, trees
from igpt.errors import UserError


def _leaf_name(path) -> str:
  """'opt.0.mu.wte' for both a target tree and Orbax's metadata tree.

  Orbax stores namedtuples as dicts and tuples as lists, so the two trees only agree on names.
  """
  keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return ".".join(str(k) for k in keys)


def one_line(e: BaseException) -> str:
  """An exception as one short line (Orbax/TensorStore messages run to pages)."""
  text = str(e).split("See full TensorStore details")[0].strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class TreeMismatchError(ValueError):
  """A checkpoint holds other leaves or shapes than asked for (another model, not damage)."""


PARAMS_ITEM = "params"
REST_ITEM = "train_state"  # every other top-level key of the state dict
EXTRA_ITEM = "extra"


def _split(state: dict) -> dict:
  """{'params': ..., 'train_state': {other keys}} without empty items."""
  items = {}
  if PARAMS_ITEM in state:
    items[PARAMS_ITEM] = state[PARAMS_ITEM]
  rest = {k: v for k, v in state.items() if k != PARAMS_ITEM}
  if rest:
    items[REST_ITEM] = rest
  return items


class Checkpointer:
  """Saves and restores `(state, extra)` under one directory, keeping the newest `keep` steps.

  `state` is a dict of pytrees (the trainer's {'params', 'opt', 'step'}, or {'params'} alone).
  """

  def __init__(self, directory: str, keep: int):
    # An absolute local path makes errors name a path that works anywhere; URLs stay as given.
    storage.check_run_store(directory)
    self.directory = storage.absolute(directory)
    self._name_format = ocp.step.standard_name_format()
    # Async saving (Orbax's default): `save` returns once the arrays are copied to host memory.
    # Naming the handlers lets a fresh process read item metadata before any save.
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep),
        item_handlers={PARAMS_ITEM: ocp.StandardCheckpointHandler(),
                       REST_ITEM: ocp.StandardCheckpointHandler(),
                       EXTRA_ITEM: ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    """Finalised steps on disk, oldest first."""
    return sorted(m.step for m in self._name_format.find_all(self.directory))

  def latest_step(self) -> int | None:
    """The newest finalised step, or None. A save still in flight does not count."""
    # Read the directory, not the manager's list: that lists an async save as soon as it starts.
    return max(self.all_steps(), default=None)

  def save(self, step: int, state, extra: dict, *, force: bool = False) -> None:
    """Starts saving `state` (a pytree of arrays) and `extra` (a JSON dict) as `step`.

    Returns once the arrays are copied off the devices, so `state` may be donated right away;
    the write finishes in the background (see `wait`). As in Orbax, a step not newer than the
    latest saved one is skipped unless `force` (which fails if that step already exists).
    """
    json.dumps(extra)  # Fail here, not in the background writer, on a non-JSON value.
    args = {name: ocp.args.StandardSave(tree) for name, tree in _split(state).items()}
    self._manager.save(step, args=ocp.args.Composite(**args, extra=ocp.args.JsonSave(extra)),
                       force=force)

  def restore(self, step: int, abstract_state):
    """Reads `step` as `(state, extra)`, laid out as `abstract_state` says.

    `abstract_state` is a dict of pytrees of jax.ShapeDtypeStruct with `.sharding` set, e.g.
    `jax.eval_shape(init)` plus the trainer's shardings; its mesh may differ from the one the
    checkpoint was saved from. Only the items named by its keys are read (`{"params": ...}`
    reads no optimiser state). Raises UserError for a missing step and TreeMismatchError
    for a tree that does not match.
    """
    self._require(step)
    self._check_tree(step, abstract_state)
    items = _split(abstract_state)
    args = {name: ocp.args.StandardRestore(tree) for name, tree in items.items()}
    out = self._manager.restore(step, args=ocp.args.Composite(
        **args, extra=ocp.args.JsonRestore()))
    state = dict(out[REST_ITEM]) if REST_ITEM in items else {}
    if PARAMS_ITEM in items:
      state[PARAMS_ITEM] = out[PARAMS_ITEM]
    return {k: state[k] for k in abstract_state}, out[EXTRA_ITEM]

  def _require(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise UserError(f"No checkpoint for step {step} in {self.directory}; available steps: "
                      f"{steps or 'none'}.")

  def newest_that_reads(self, abstract_state=None, *, step: int | None = None,
                        damaged: str = "skip", check_extra: Callable | None = None,
                        required_extra: tuple[str, ...] = ()):
    """(step, state, extra) of the newest checkpoint that reads whole, or (None, None, None).

    The one way every reader finds its checkpoint. A checkpoint is damaged when its `extra`
    or its arrays do not read, or its `extra` lacks a key of `required_extra`: training moves
    it aside to `<step>.damaged` (`damaged="move"`) and readers skip it with a warning
    (`"skip"`: nothing in the folder changes); then the next older one is tried. With `step`,
    only that checkpoint is read, and damage raises. `check_extra(step, extra)` sees a
    candidate's `extra` before its arrays are read and may raise (another run's config).
    `abstract_state` is a tree as `restore` takes it, or a function of (step, extra) that
    makes one (the model's shape is stored in `extra`); None reads `extra` alone. A tree of
    other leaves or shapes (another model) raises TreeMismatchError, never counts as damage.
    """
    if damaged not in ("move", "skip"):
      raise ValueError(f"damaged={damaged!r}: 'move' or 'skip'")
    if step is not None:
      self._require(step)
    for candidate in [step] if step is not None else self.all_steps()[::-1]:
      try:
        extra = self.read_extra(candidate)
        missing = [k for k in required_extra if k not in (extra or {})]
        if missing:
          raise KeyError(f"its extra item lacks {missing}")
      except Exception as e:  # noqa: BLE001  (any unreadable extra is damage)
        reason = one_line(e)
      else:
        if check_extra is not None:
          check_extra(candidate, extra)  # raises for another run's config: not damage
        if abstract_state is None:
          return candidate, None, extra
        tree = abstract_state(candidate, extra) if callable(abstract_state) else abstract_state
        try:
          state, extra = self.restore(candidate, tree)
          return candidate, state, extra
        except TreeMismatchError:
          raise  # another model (e.g. a params-only import), not a damaged file
        except Exception as e:  # noqa: BLE001  (whatever a damaged file raises)
          reason = one_line(e)
      if step is not None:
        others = [s for s in self.all_steps() if s != step]
        raise UserError(f"checkpoint {step} in {self.directory} does not read ({reason})"
                        + (f"; pick another with --step (available: {others})." if others
                           else "."))
      if damaged == "move":
        self.move_aside(candidate, reason)
      else:
        logging.warning("Checkpoint %s in %s does not read (%s); trying the next older one.",
                        candidate, self.directory, reason)
    return None, None, None

  def move_aside(self, step: int, reason: str) -> str:
    """Renames the unreadable checkpoint `step` to `<step>.damaged[-n]` (kept for a
    post-mortem); returns the new path."""
    src = storage.join(self.directory, str(step))
    if not storage.isdir(src):  # another process of a multi-host run moved it first
      self.reload()
      return src
    dst, n = f"{src}.damaged", 1
    while storage.exists(dst):
      n += 1
      dst = f"{src}.damaged-{n}"
    storage.move_tree(src, dst)  # a refused write reaches the run folder's error handling
    self.reload()
    logging.info("Checkpoint %s is damaged (%s); moved it to %s and trying the next older one.",
                 src, reason, dst)
    return dst

  def damaged_steps(self) -> list[str]:
    """Names of the checkpoints set aside as damaged."""
    folder = self.directory
    return sorted(n for n in (storage.listdir(folder) if storage.isdir(folder) else [])
                  if ".damaged" in n)

  def read_extra(self, step: int) -> dict:
    """The `extra` dict of `step` alone (no arrays read)."""
    out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return out[EXTRA_ITEM]

  def params_shapes(self, step: int) -> dict:
    """The `params` item of `step` as a tree of jax.ShapeDtypeStruct (no arrays read)."""
    metadata = self._manager.item_metadata(step)[PARAMS_ITEM]
    if metadata is None:
      raise ValueError(f"{self.directory}/{step}/{PARAMS_ITEM} has no readable metadata")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), metadata)

  def reload(self) -> None:
    """Re-reads the steps on disk (after a step folder was moved away by hand)."""
    self._manager.reload()

  def check_for_errors(self) -> None:
    """Raises the error of a background save that failed since the last call, if any."""
    self._manager.check_for_errors()

  def has_train_state(self, step: int) -> bool:
    """Whether `step` holds optimiser state (an imported, params-only run does not)."""
    return storage.isdir(storage.join(self.directory, str(step), REST_ITEM))

  def _check_tree(self, step: int, abstract_state) -> None:
    """Raises TreeMismatchError naming every leaf where the checkpoint and target disagree."""
    metadata = self._manager.item_metadata(step)
    saved = {}
    for name, tree in _split(abstract_state).items():
      item_dir = storage.join(self.directory, str(step), name)
      present = storage.isdir(item_dir)
      on_disk = metadata[name] if present else None
      if on_disk is None and present:
        raise ValueError(f"{item_dir} is there but its metadata does not read")
      if on_disk is not None:
        named = {PARAMS_ITEM: on_disk} if name == PARAMS_ITEM else on_disk
        saved.update({_leaf_name(p): tuple(m.shape) for p, m in jax.tree.leaves_with_path(named)})
    wanted = {_leaf_name(p): tuple(s.shape)
              for p, s in jax.tree.leaves_with_path(abstract_state)}
    problems = trees.leaf_problems(
        wanted, saved, missing="not in the checkpoint",
        unexpected="in the checkpoint but not in abstract_state",
        misshapen="shape {got} in the checkpoint, {expected} in abstract_state")
    if problems:
      raise TreeMismatchError(f"Checkpoint {self.directory}/{step} does not match "
                              "abstract_state:\n  " + "\n  ".join(problems))

  def wait(self) -> None:
    """Blocks until every started save is finalised (and raises its error, if any)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
