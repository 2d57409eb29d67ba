"""iGPT pretraining: one readable trainer, the same code on one CPU, a GPU or a TPU pod slice.

    from igpt.train import train_and_evaluate
    final = train_and_evaluate(config, workdir)   # what `python train.py` calls

Phases of `train_and_evaluate` (each a commented block below): processes, config checks and
the run's objects (built once), workdir, data and palette, mesh, train state (born sharded),
checkpoint restore, compiled steps, the loop (log / eval / checkpoint).

Pieces the benchmark and tests reuse:
  - `Trainer.build(config, mesh)`: the run's objects (model config, objective, optimiser,
    schedule, sharding rules, mesh), built once and passed to everything below.
  - `create_train_state(trainer, rng) -> (state, state_shardings)`; the state is the plain
    dict {'params', 'opt', 'step'}, created directly with its final shardings.
  - `abstract_train_state(trainer) -> (abstract_state, state_shardings)` for restores.
  - `make_train_step(trainer, state_shardings)` -> jitted, state-donating
    `step(state, batch, rng) -> (state, metrics)`.
  - `make_eval_step(trainer, state_shardings)` -> jitted
    `eval(params, batch, rng) -> (loss_sum, num_examples)`; `evaluate` averages over batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from igpt import (distributed, fileio, finetune, guards, losses, metrics, objectives, optim,
                  palette, pipeline, readers, run, sharding, summaries, train_samples,
                  workdir as workdirs)
from igpt.model import ModelConfig


# ----------------------------------------------------------------------------------------
# Config checks: everything that can be wrong with a config, found before any device work.
# ----------------------------------------------------------------------------------------

def validate_config(config, num_devices: int, process_count: int = 1) -> ModelConfig:
  """Raises ValueError with a clear message for a config that cannot run; returns the model cfg.

  Cheap and device-free (no compile), so a bad run fails in seconds.
  """
  objective = objectives.get(config.objective)
  model_cfg = run.model_config(config)
  if objective.name == "bert" and not 0.0 < config.bert_mask_prob < 1.0:
    raise ValueError(f"bert_mask_prob={config.bert_mask_prob} must be in (0, 1).")
  model_cfg.attention_implementation()  # a forced kernel that cannot run here
  if config.get("augment", False) and config.data.source == "openai_npy":
    raise ValueError("augment=True crops and flips images, but data.source='openai_npy' holds "
                     "palette tokens; set --config.augment=False.")

  sizes = sharding.mesh_shape(config.mesh, num_devices)
  dp = sharding.data_parallel_size(sizes)
  t = config.train
  accum = t.grad_accum_steps
  if accum < 1:
    raise ValueError(f"train.grad_accum_steps={accum} must be >= 1.")
  if t.batch_size % (dp * accum):
    raise ValueError(
        f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
        f"(mesh data x fsdp = {sizes['data']} x {sizes['fsdp']} = {dp}) times "
        f"train.grad_accum_steps={accum}; each device needs a whole micro-batch.")
  if t.batch_size % process_count:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the "
                     f"{process_count} processes.")
  if process_count > 1 and dp % process_count:
    raise ValueError(
        f"the data-parallel size {dp} must be a multiple of the {process_count} processes, "
        "so every process feeds its own rows of the batch.")
  if t.total_steps < 1:
    raise ValueError(f"train.total_steps={t.total_steps} must be >= 1.")
  if not 0 <= config.optim.warmup_steps < t.total_steps:
    raise ValueError(f"optim.warmup_steps={config.optim.warmup_steps} must be in "
                     f"[0, train.total_steps={t.total_steps}).")
  for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
               "keep_checkpoints"):
    if t[name] < 1:
      raise ValueError(f"train.{name}={t[name]} must be >= 1.")
  if t.sample_every_steps < 0 or t.sample_num_images < 1:
    raise ValueError(f"train.sample_every_steps={t.sample_every_steps} must be >= 0 (0: no "
                     f"samples) and train.sample_num_images={t.sample_num_images} >= 1.")
  if t.sample_every_steps and not objective.causal:
    raise ValueError(f"train.sample_every_steps={t.sample_every_steps}: only autoregressive "
                     f"models sample; objective {objective.name!r} does not. Set it to 0.")
  for name in ("profile_start_step", "profile_num_steps"):
    if t[name] < 0:
      raise ValueError(f"train.{name}={t[name]} must be >= 0 (profile_num_steps=0: no trace).")
  if config.data.palette_size > model_cfg.vocab_size:
    raise ValueError(
        f"model.vocab_size={model_cfg.vocab_size} is smaller than data.palette_size="
        f"{config.data.palette_size}: every palette colour needs a token.")
  if config.data.palette_path and not os.path.exists(config.data.palette_path):
    raise ValueError(f"data.palette_path={config.data.palette_path!r} does not exist; "
                     "give an existing .npy palette or '' to fit one from the training data.")
  sharding.rules_from_config(config)  # unknown mesh axes in sharding_rules
  return model_cfg


# ----------------------------------------------------------------------------------------
# The run's objects, built once.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything the step builders need, derived once from the run config."""

  model_cfg: ModelConfig
  objective: objectives.Objective
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  rules: tuple
  grad_accum_steps: int
  config: ml_collections.ConfigDict  # for the objective's own settings (bert_mask_prob)

  @classmethod
  def build(cls, config, mesh) -> "Trainer":
    schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
    return cls(model_cfg=run.model_config(config), objective=objectives.get(config.objective),
               tx=optim.make_optimizer(config.optim, schedule), schedule=schedule, mesh=mesh,
               rules=sharding.rules_from_config(config),
               grad_accum_steps=config.train.grad_accum_steps, config=config)


# ----------------------------------------------------------------------------------------
# Train state: {'params', 'opt', 'step'}, born sharded.
# ----------------------------------------------------------------------------------------

def _init_state(trainer: Trainer, rng) -> dict:
  params = trainer.objective.init_params(trainer.model_cfg, trainer.config, rng)
  return {"params": params, "opt": trainer.tx.init(params), "step": jnp.zeros((), jnp.int32)}


def abstract_train_state(trainer: Trainer) -> tuple[Any, Any]:
  """Shapes and shardings of the train state, without allocating it.

  Returns (abstract_state: ShapeDtypeStructs with `.sharding`, state_shardings). Params follow
  the logical-axis rules; Adam's moments mirror their param; counters are replicated.
  """
  mesh, tx = trainer.mesh, trainer.tx
  shapes = jax.eval_shape(lambda: _init_state(trainer, jax.random.key(0)))
  param_shardings = sharding.logical_to_shardings(
      trainer.objective.param_axes(trainer.model_cfg, trainer.config), shapes["params"],
      mesh, trainer.rules)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, shapes["opt"], param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  shardings = {"params": param_shardings, "opt": opt_shardings,
               "step": sharding.replicated(mesh)}
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def create_train_state(trainer: Trainer, rng) -> tuple[dict, Any]:
  """A fresh train state laid out on the trainer's mesh: (state, state_shardings).

  Init runs under `jax.jit(out_shardings=...)`, so each device only ever materialises its own
  shard of every param and optimiser moment (no full copy on any one device or host).
  """
  _, shardings = abstract_train_state(trainer)
  init = jax.jit(lambda r: _init_state(trainer, r), out_shardings=shardings)
  return init(rng), shardings


# ----------------------------------------------------------------------------------------
# Update and eval steps.
# ----------------------------------------------------------------------------------------

def _batch_loss(trainer: Trainer):
  """loss(params, batch) -> scalar: the objective's weighted mean per-example loss."""

  def loss(params, batch):
    per_example_B, weight_B = trainer.objective.loss(trainer.model_cfg, params, batch)
    return objectives.weighted_mean(per_example_B, weight_B)

  return loss


def make_train_step(trainer: Trainer, state_shardings):
  """The jitted update: `step(state, batch, rng) -> (new_state, metrics)`.

  `batch` holds the objective's keys (int32 'tokens' [global_batch, seq_len], ...) sharded
  over (data, fsdp) (see `sharding.global_batch`); `rng` is this step's key
  (`fold_in(key, step)`), used by the objective (BERT masks). `state` is donated: its buffers
  are reused for the new state. With `train.grad_accum_steps` = k the batch is split into k
  micro-batches of global_batch / k rows (each device keeps its own rows: no data moves)
  whose gradients are averaged. metrics: loss (nats/token, mean over the batch), grad_norm
  (before clipping), param_norm (after the update), lr (used by this update), float32 scalars.
  """
  mesh, tx, accum = trainer.mesh, trainer.tx, trainer.grad_accum_steps
  loss_and_grad = jax.value_and_grad(_batch_loss(trainer))
  micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, sharding.BATCH_AXES))

  def to_micro(x_Bx___):
    # Row r of micro-batch i is row r * accum + i: every device's contiguous block of rows
    # splits into its own share of each micro-batch, so the reshape moves no data.
    b, rest = x_Bx___.shape[0], x_Bx___.shape[1:]
    x_KxBx___ = x_Bx___.reshape(b // accum, accum, *rest).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x_KxBx___, micro_sharding)

  def step(state, batch, rng):
    # Linen's logical constraints need the mesh and the rules while tracing.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(trainer.rules):
      params = state["params"]
      batch = trainer.objective.prepare(batch, rng, trainer.config)
      if accum == 1:
        loss, grads = loss_and_grad(params, batch)
      else:
        def micro_step(carry, micro_batch):
          loss_sum, grad_sum = carry
          loss, grads = loss_and_grad(params, micro_batch)
          return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(
            micro_step, (jnp.zeros((), jnp.float32), zeros), jax.tree.map(to_micro, batch))
        loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
      updates, opt = tx.update(grads, state["opt"], params)
      params = optax.apply_updates(params, updates)
    new_state = {"params": params, "opt": opt, "step": state["step"] + 1}
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "param_norm": optax.tree.norm(params),
                    "lr": jnp.asarray(trainer.schedule(state["step"]), jnp.float32)}
    return new_state, step_metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=0)


def make_eval_step(trainer: Trainer, state_shardings):
  """Jitted `eval(params, batch, rng) -> (loss_sum, num_examples)` on one held-out batch.

  `batch` holds the objective's keys and 'mask' (float32 [B], 0 for the rows that pad the
  last eval batch); loss_sum adds the per-example losses (nats/token) of the rows that count.
  """
  mesh = trainer.mesh

  def eval_fn(params, batch, rng):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(trainer.rules):
      batch = trainer.objective.prepare(batch, rng, trainer.config)
      per_example_B, weight_B = trainer.objective.loss(trainer.model_cfg, params, batch)
      weight_B = weight_B * batch["mask"]
      return (per_example_B * weight_B).sum(), weight_B.sum()

  replicated = sharding.replicated(mesh)
  return jax.jit(eval_fn,
                 in_shardings=(state_shardings["params"], sharding.batch_sharding(mesh),
                               replicated),
                 out_shardings=replicated)


def run_rngs(config):
  """(init, step, eval) keys, all from `config.seed`; step s uses `fold_in(step_key, s)`.

  Nothing random lives in the state, so a resumed run draws exactly the keys it would have.
  """
  init_rng, step_rng, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
  return init_rng, step_rng, eval_rng


def evaluate(eval_step, params, eval_data, eval_rng) -> dict:
  """Mean held-out loss over the examples of `eval_data` (global batches with 'mask'):
  nats/token and bits/dim (= nats / ln 2 / 3, per RGB sub-pixel).

  Batch i uses `fold_in(eval_rng, i)` (BERT masks), so every evaluation sees the same masks.
  """
  sums = [eval_step(params, b, jax.random.fold_in(eval_rng, i)) for i, b in enumerate(eval_data)]
  loss_sum, count = (sum(float(x) for x in xs) for xs in zip(*jax.device_get(sums)))
  loss = loss_sum / max(count, 1.0)
  return {"eval_loss": loss, "eval_bits_per_dim": float(losses.bits_per_dim(loss)),
          "eval_examples": int(count)}


# ----------------------------------------------------------------------------------------
# The run's palette.
# ----------------------------------------------------------------------------------------

def prepare_palette(config, train_source, workdir: str) -> np.ndarray:
  """The run's palette, stored as workdir/palette.npy so a resumed run encodes the same way.

  workdir/palette.npy if present (a resumed run), else `data.palette_path` as is, else fitted
  on `data.palette_fit_pixels` training pixels (deterministic in `config.seed`).
  """
  os.makedirs(workdir, exist_ok=True)
  path = run.path(workdir, run.PALETTE_FILE)
  given = config.data.palette_path
  vocab_size = run.model_config(config).vocab_size
  if os.path.exists(path):
    centers = palette.load_palette(path)
    if given and not np.array_equal(palette.load_palette(given), centers):
      raise ValueError(f"{path} (from an earlier run in this workdir) differs from "
                       f"data.palette_path={given!r}; resume with the same palette or use a "
                       "fresh workdir.")
    metrics.log("Palette: reusing %s (%d colours).", path, len(centers))
  elif given:
    centers = palette.load_palette(given)
    palette.check_fits(centers, vocab_size, f"the palette {given}")  # before the copy
    palette.save_palette(path, centers)  # atomic: a kill never leaves half a file
    metrics.log("Palette: %s (%d colours), copied to %s.", given, len(centers), path)
  else:
    t0 = time.time()
    centers = pipeline.fit_palette(train_source, config.data.palette_size,
                                   config.data.palette_fit_pixels, config.seed)
    palette.save_palette(path, centers)
    metrics.log("Palette: fitted %d colours on %d pixels in %.1fs, saved to %s.",
                len(centers), config.data.palette_fit_pixels, time.time() - t0, path)
  palette.check_fits(centers, vocab_size, f"the palette {path}")
  return np.asarray(centers, np.float32)


# ----------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir` to `train.total_steps`; returns final metrics.

  Returned dict: step, train_loss (nats/token, mean since the last log line), eval_loss
  (nats/token), eval_bits_per_dim (eval_loss / ln 2 / 3), plus the last throughput numbers.
  The workdir is locked for the whole run (a second run on it fails at once); a finished run
  is only evaluated, and then also from a read-only folder. A refused write (disk full,
  read-only, permission) raises workdir.WorkdirError naming the path.
  """
  # --- Processes: join the other hosts first; everything below sees the global devices.
  distributed.maybe_initialize(config)
  # --- Config checks, before any data, device or compile work: a bad config fails before
  # the workdir is even created.
  config = ml_collections.ConfigDict(config)  # private copy; callers' config untouched
  config = finetune.resolve_config(config)  # init_from: the pretrained run's model, palette
  model_cfg = validate_config(config, jax.device_count(), jax.process_count())
  # --- Data: for a new run a missing or unreadable dataset fails before the workdir is
  # created (a resumed run checks its config first: a changed data source is reported as such).
  sources = None if os.path.exists(workdir) else _make_sources(config)
  is_writer = jax.process_index() == 0
  lock = (workdirs.lock(workdir, required=False) if is_writer
          else contextlib.nullcontext(None))
  with lock as cannot_write:
    try:
      return _train_and_evaluate(config, model_cfg, sources, workdir, cannot_write)
    except workdirs.WorkdirError:
      raise
    except Exception as e:
      if workdirs.is_write_failure(e, workdir):
        raise workdirs.write_error(e, workdir) from e
      raise


def _make_sources(config):
  return tuple(readers.make_source(config.data, split, config.model.image_side)
               for split in ("train", "val"))


def _train_and_evaluate(config, model_cfg: ModelConfig, sources, workdir: str,
                        cannot_write: Exception | None) -> dict:
  """The run itself, under the workdir lock, for a checked config; `sources`: its (train,
  val) sources when already made; `cannot_write`: why the folder is read-only."""
  process_index, process_count = jax.process_index(), jax.process_count()
  is_writer = process_index == 0
  t = config.train

  # --- Workdir: a run already in it must have the same model and data (checked before
  # anything is written); then the resolved config is written, so every run documents itself.
  config_json = run.config_to_json(config)  # also stored with every checkpoint
  run.check_stored_config(workdir, config_json, metrics.log)
  train_source, val_source = sources or _make_sources(config)  # readable before any write
  if is_writer:
    run.write_config(workdir, config_json)
  writer = metrics.MetricsWriter(run.path(workdir, run.METRICS_FILE), enabled=is_writer)

  # --- Palette. Batches are a pure function of (seed, step): resuming is exact.
  centers = prepare_palette(config, train_source, workdir) if is_writer else None
  centers = distributed.broadcast_rows_from_process_0(centers, 3)

  # --- Mesh and the run's objects: (data, fsdp, tensor) over every device of every process.
  mesh = sharding.make_mesh(config.mesh)
  trainer = Trainer.build(config, mesh)
  metrics.log("Mesh %s over %d devices (%s), %d process(es).", dict(mesh.shape),
              mesh.size, jax.devices()[0].device_kind, process_count)

  # --- Train state: restored from the newest whole checkpoint, else born sharded.
  # Closing waits for in-flight async saves, so the last good checkpoint is complete even
  # when the loop stops on a NaN (a SIGKILL loses only the save in flight).
  with run.checkpointer(workdir, keep=t.keep_checkpoints) as ckpt:
    init_rng, step_rng, eval_rng = run_rngs(config)
    abstract_state, state_shardings = abstract_train_state(trainer)

    def check_extra(step: int, extra: dict) -> None:
      workdirs.check_identity(extra["config"], config_json, workdir, f"checkpoint {step}")

    # The newest checkpoint that reads whole; damaged ones are moved aside.
    last_saved, state, extra = workdirs.restore_newest(ckpt, abstract_state, check_extra,
                                                       metrics.log)
    guard = guards.DivergenceGuard(config.get("guard"), (extra or {}).get("guard"))
    if last_saved is not None:
      start_step = int(extra["data"]["next_step"])
      if start_step != int(jax.device_get(state["step"])):
        raise ValueError(f"checkpoint {last_saved} is inconsistent: state step "
                         f"{int(jax.device_get(state['step']))}, data position {start_step}.")
      metrics.log("Resumed from checkpoint step %d in %s.", last_saved, ckpt.directory)
    else:
      state, _ = create_train_state(trainer, init_rng)
      if config.get("init_from", ""):
        state = finetune.load_pretrained(state, state_shardings, config, mesh)
        metrics.log("Initialised from the run in %s.", config.init_from)
      start_step = 0
    guard.set_initial_param_norm(float(optax.tree.norm(state["params"])))
    if cannot_write is not None and start_step < t.total_steps:
      raise cannot_write  # only a finished run can be evaluated from a read-only folder
    writer.truncate_after(start_step)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    metrics.log("Model: %s, %s params, objective %s, attention kernel %s.", model_cfg,
                f"{n_params:,}", config.objective, model_cfg.attention_implementation())

    # --- Compiled steps. Compiling ahead of time lets us log the memory use once.
    train_step = make_train_step(trainer, state_shardings)
    eval_step = make_eval_step(trainer, state_shardings)

    def objective_batch(batch: dict) -> dict:
      return {k: batch[k] for k in trainer.objective.batch_keys}

    make_batch = finetune.augmented_batch_at if config.get("augment", False) else pipeline.batch_at

    def batch_for(step: int):
      local = make_batch(train_source, centers, step, t.batch_size, config.seed,
                         process_index=process_index, process_count=process_count)
      return sharding.global_batch(objective_batch(local), mesh)

    eval_data = [sharding.global_batch({**objective_batch(b), "mask": b["mask"]}, mesh)
                 for b in pipeline.eval_batches(val_source, centers, t.batch_size,
                                                t.eval_batches, process_index, process_count)]

    # Classifying objectives also report accuracy and keep their best params.
    accuracy = (finetune.Accuracy(trainer, state_shardings, val_source, centers, t.batch_size,
                                  t.eval_batches) if "label" in trainer.objective.batch_keys
                else None)
    best = finetune.BestKeeper(workdir) if accuracy else None

    def run_eval() -> dict:
      ev = evaluate(eval_step, state["params"], eval_data, eval_rng)
      if accuracy:
        ev["eval_accuracy"] = accuracy(state["params"])
      return ev

    if start_step >= t.total_steps:  # a finished run: report its eval; no compile, no writes
      return {"step": start_step, **run_eval()}
    tensorboard = summaries.SummaryWriter(run.path(workdir, run.TENSORBOARD_DIR),
                                          enabled=is_writer, purge_step=start_step + 1)

    first_batch = batch_for(start_step)
    t0 = time.time()
    compiled_step = train_step.lower(state, first_batch, step_rng).compile()
    metrics.log("Compiled the train step in %.1fs.", time.time() - t0)
    metrics.log_memory(compiled_step)

    # --- Throughput bookkeeping, named with units.
    throughput = metrics.Throughput(
        tokens_per_step=t.batch_size * model_cfg.seq_len, images_per_step=t.batch_size,
        flops_per_step=metrics.flops_per_token(model_cfg) * t.batch_size * model_cfg.seq_len,
        num_devices=mesh.size,
        peak_flops_per_device=metrics.peak_flops_per_device(jax.devices()[0].device_kind,
                                                            t.peak_flops_per_device))

    samples = (train_samples.TrainingSamples(model_cfg, centers, val_source,
                                             t.sample_num_images, config.seed)
               if t.sample_every_steps else None)

    def draw_samples(step: int) -> None:
      t0 = time.time()
      picture = samples.picture(state["params"])
      seconds = time.time() - t0
      if is_writer:
        path = os.path.join(run.path(workdir, run.SAMPLES_DIR), f"step_{step:07d}.png")
        with fileio.atomic_open(path, "wb") as f:
          Image.fromarray(picture).save(f, format="png")
        tensorboard.image(step, "samples", picture)
        tensorboard.flush()
        writer.write(step, sample_seconds=seconds)
        metrics.log("samples @ step %d: %s (%.1fs, not counted in tok/s)", step, path, seconds)

    def save(step: int) -> None:
      extra = {"data": {"next_step": step, "seed": config.seed}, "config": config_json,
               "guard": guard.reference}
      try:
        ckpt.check_for_errors()  # a failed background save stops the run here, not at the end
        ckpt.save(step, state, extra)
      except Exception as e:
        if workdirs.is_write_failure(e):
          raise workdirs.write_error(e, ckpt.directory) from e
        raise

    # --- The loop. Metrics stay on device until a log/eval/checkpoint step, so dispatch runs
    # ahead; every queued step is checked for NaN/inf before anything is saved.
    final: dict = {"step": start_step}
    pending: list = []  # (step, device metrics) not yet fetched
    window_losses: list = []  # fetched train losses since the last log line
    last_good = last_saved
    window_start_s, window_step = time.time(), start_step
    batch = first_batch
    profile_steps = range(t.profile_start_step, t.profile_start_step + t.profile_num_steps)
    profiling = False
    with jax.set_mesh(mesh):
      for step in range(start_step, t.total_steps):
        if step in profile_steps and not profiling:
          jax.profiler.start_trace(run.path(workdir, run.PROFILE_DIR), create_perfetto_trace=True)
          profiling, profile_first = True, step
        state, step_metrics = compiled_step(state, batch, jax.random.fold_in(step_rng, step))
        if profiling and step == profile_steps[-1]:
          jax.block_until_ready(state)  # the trace must hold the whole last step
          jax.profiler.stop_trace()
          profiling = False
          metrics.log("Profiled steps %d-%d into %s.", profile_first, step,
                      run.path(workdir, run.PROFILE_DIR))
        done = step + 1  # steps completed == the state's step counter
        pending.append((done, step_metrics))
        if done < t.total_steps:
          batch = batch_for(done)  # host work overlaps the device step just dispatched

        is_last = done == t.total_steps
        do_log = done % t.log_every_steps == 0 or is_last
        do_eval = done % t.eval_every_steps == 0 or is_last
        do_save = done % t.checkpoint_every_steps == 0 or is_last
        do_sample = bool(t.sample_every_steps) and (done % t.sample_every_steps == 0 or is_last)
        if not (do_log or do_eval or do_save or do_sample):
          continue
        fetched = jax.device_get(pending)
        pending = []
        for fetched_step, fetched_metrics in fetched:
          guard.check(fetched_step, fetched_metrics, last_good)
        window_losses += [float(m["loss"]) for _, m in fetched]
        final.update(step=done, train_loss=float(fetched[-1][1]["loss"]))

        if do_log:
          # loss: mean over the steps since the last log line; norms and lr: this step's.
          record = {k: float(v) for k, v in fetched[-1][1].items()}
          record["loss"] = sum(window_losses) / len(window_losses)
          record["train_bits_per_dim"] = float(losses.bits_per_dim(record["loss"]))
          elapsed_s = time.time() - window_start_s
          if done > window_step and elapsed_s > 0:
            record.update(throughput((done - window_step) / elapsed_s, t.total_steps - done))
          metrics.log("%s", metrics.progress_line(done, t.total_steps, record))
          writer.write(done, **record)
          tensorboard.scalars(done, record, prefix="train/")
          tensorboard.flush()
          final.update({k: v for k, v in record.items() if k != "loss"},
                       train_loss=record["loss"])  # the number the progress line shows
          window_losses = []
          window_start_s, window_step = time.time(), done

        if do_eval:
          ev = run_eval()
          metrics.log("eval @ step %d: loss %.4f nats/token, %.4f bits/dim (CE / ln 2 / 3), "
                      "%d examples", done, ev["eval_loss"], ev["eval_bits_per_dim"],
                      ev["eval_examples"])
          writer.write(done, **ev)
          tensorboard.scalars(done, ev, prefix="eval/")
          tensorboard.flush()
          final.update(ev)
          if best and best.update(done, ev["eval_accuracy"], state["params"]):
            metrics.log("eval accuracy %.4f: the best so far, saved to %s", ev["eval_accuracy"],
                        best.directory)

        if do_sample:
          draw_samples(done)

        if do_save:
          save(done)
          last_good = done
        if do_eval or do_save or do_sample:  # keep them out of the measured rate
          window_start_s, window_step = time.time(), done
    tensorboard.close()
    if best:
      final.update(finetune.test_accuracy(config, trainer, state_shardings,
                                          abstract_state["params"], centers, best))
  return final
