"""iGPT training: one readable trainer, the same code on one CPU, a GPU or a TPU pod slice.

    from igpt.train import train_and_evaluate
    final = train_and_evaluate(config, workdir)   # what `python train.py` calls

`train_and_evaluate` resolves the config once (`igpt.spec.resolve`), opens the run folder
(`igpt.run.open_for_training`: lock, identity, palette, checkpoints) and runs `train`: the
train state (restored, or born sharded), the compiled step, and a loop of steps plus periodic
actions (`igpt.train_actions`: log, eval, samples, checkpoint, profile).

Pieces the benchmark and tests reuse:
  - `TrainSetup.build(spec, mesh)`: what the steps are built from (model config, objective,
    optimiser, schedule, sharding rules, mesh), made once and passed to everything below.
  - `create_train_state(setup, rng) -> (state, state_shardings)`; the state is the plain
    dict {'params', 'opt', 'step'}, created directly with its final shardings.
  - `abstract_train_state(setup) -> (abstract_state, state_shardings)` for restores.
  - `make_train_step(setup, state_shardings)` -> jitted, state-donating
    `step(state, batch, rng) -> (state, metrics)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from igpt import (compile_cache, distributed, evaluation, guards, metrics, objectives, optim,
                  pipeline, prefetch, preemption, readers, run, sharding, spec as spec_lib,
                  train_actions, train_samples, trained)
from igpt.model import ModelConfig


# ----------------------------------------------------------------------------------------
# The run's objects, built once.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What the train and eval steps are built from, derived once from the run spec."""

  model_cfg: ModelConfig
  objective: objectives.Objective  # configured (mask rate, classes)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  rules: tuple
  grad_accum_steps: int

  @classmethod
  def build(cls, spec: spec_lib.RunSpec, mesh) -> "TrainSetup":
    config = spec.config
    schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
    return cls(model_cfg=spec.model, objective=spec.objective,
               tx=optim.make_optimizer(config.optim, schedule), schedule=schedule, mesh=mesh,
               rules=spec.rules, grad_accum_steps=config.train.grad_accum_steps)


# ----------------------------------------------------------------------------------------
# Train state: {'params', 'opt', 'step'}, born sharded.
# ----------------------------------------------------------------------------------------

def _init_state(setup: TrainSetup, rng) -> dict:
  params = setup.objective.init_params(setup.model_cfg, rng)
  return {"params": params, "opt": setup.tx.init(params), "step": jnp.zeros((), jnp.int32)}


def abstract_train_state(setup: TrainSetup) -> tuple[Any, Any]:
  """Shapes and shardings of the train state, without allocating it.

  Returns (abstract_state: ShapeDtypeStructs with `.sharding`, state_shardings). Params follow
  the logical-axis rules; Adam's moments mirror their param; counters are replicated.
  """
  mesh, tx = setup.mesh, setup.tx
  shapes = jax.eval_shape(lambda: _init_state(setup, jax.random.key(0)))
  param_shardings = sharding.logical_to_shardings(
      setup.objective.param_axes(setup.model_cfg), shapes["params"],
      mesh, setup.rules)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, shapes["opt"], param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  shardings = {"params": param_shardings, "opt": opt_shardings,
               "step": sharding.replicated(mesh)}
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def create_train_state(setup: TrainSetup, rng, shardings=None) -> tuple[dict, Any]:
  """A fresh train state laid out on the setup's mesh: (state, state_shardings).

  Init runs under `jax.jit(out_shardings=...)`, so each device only ever materialises its own
  shard of every param and optimiser moment (no full copy on any one device or host).
  `shardings`: `abstract_train_state`'s, when the caller has them already.
  """
  if shardings is None:
    _, shardings = abstract_train_state(setup)
  init = jax.jit(lambda r: _init_state(setup, r), out_shardings=shardings)
  return init(rng), shardings


# ----------------------------------------------------------------------------------------
# Update and eval steps.
# ----------------------------------------------------------------------------------------

def _batch_loss(setup: TrainSetup):
  """loss(params, batch) -> scalar: the objective's weighted mean per-example loss."""

  def loss(params, batch):
    per_example_B, weight_B = setup.objective.loss(setup.model_cfg, params, batch)
    return objectives.weighted_mean(per_example_B, weight_B)

  return loss


def make_train_step(setup: TrainSetup, state_shardings):
  """The jitted update: `step(state, batch, rng) -> (new_state, metrics)`.

  `batch` holds the objective's keys (int32 'tokens' [global_batch, seq_len], ...) sharded
  over (data, fsdp) (see `sharding.global_batch`); `rng` is this step's key
  (`fold_in(key, step)`), used by the objective (BERT masks). `state` is donated: its buffers
  are reused for the new state. With `train.grad_accum_steps` = k the batch is split into k
  micro-batches of global_batch / k rows (each device keeps its own rows: no data moves)
  whose gradients are averaged. metrics: loss (nats/token, mean over the batch), grad_norm
  (before clipping), param_norm (after the update), lr (used by this update), float32 scalars.
  """
  mesh, tx, accum = setup.mesh, setup.tx, setup.grad_accum_steps
  loss_and_grad = jax.value_and_grad(_batch_loss(setup))
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
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(setup.rules):
      params = state["params"]
      batch = setup.objective.prepare_batch(batch, rng)
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
                    "lr": jnp.asarray(setup.schedule(state["step"]), jnp.float32)}
    return new_state, step_metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=0)


def run_rngs(seed: int):
  """(init, step, eval) keys, all from the run's seed; step s uses `fold_in(step_key, s)`.

  Nothing random lives in the state, so a resumed run draws exactly the keys it would have.
  """
  init_rng, step_rng, eval_rng = jax.random.split(jax.random.key(seed), 3)
  return init_rng, step_rng, eval_rng


# ----------------------------------------------------------------------------------------
# The setup.
# ----------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir` to `train.total_steps`; returns final metrics.

  Returned dict: step, train_loss (nats/token, mean since the last log line), eval_loss
  (nats/token), eval_bits_per_dim (eval_loss / ln 2 / 3), plus the last throughput numbers
  (and a classifying run's accuracies). A finished run is only evaluated, and then also from
  a read-only folder. A bad config fails before the workdir is even created.
  """
  distributed.maybe_initialize(config)  # every process sees the global devices from here
  init_from = config.get("init_from")
  spec = spec_lib.resolve(config, pretrained=trained.pretrained(init_from) if init_from else None)
  with run.open_for_training(spec, workdir) as training_run:
    return train(spec, training_run)


class TrainData:
  """The run's training batches and fixed evaluation batches, as global arrays on the mesh."""

  def __init__(self, spec: spec_lib.RunSpec, training_run: run.TrainingRun, mesh):
    self.spec, self.mesh, self.palette = spec, mesh, training_run.palette
    self.train_source, self.val_source = training_run.data
    self.keys = spec.objective.batch_keys
    self.eval = evaluation.eval_batches(self.val_source, self.palette, mesh,
                                        spec.train.batch_size, spec.train.eval_batches)

  def batch_at(self, step: int) -> dict:
    local = pipeline.batch_at(self.train_source, self.palette, step, self.spec.train.batch_size,
                              self.spec.config.seed, jax.process_index(), jax.process_count(),
                              augment=self.spec.data.augment)
    return sharding.global_batch({k: local[k] for k in self.keys}, self.mesh)


def init_from(state: dict, state_shardings, workdir: str, mesh) -> dict:
  """`state` with the transformer params of the run in `workdir` (a head and the optimiser
  state stay fresh)."""
  pretrained = trained.load_run(workdir, mesh=mesh)
  params = jax.device_put({**state["params"], **pretrained.params}, state_shardings["params"])
  logging.info("Initialised from the run in %s.", workdir)
  return {**state, "params": params}


def train(spec: spec_lib.RunSpec, training_run: run.TrainingRun) -> dict:
  """The run in an open run folder: state, compiled step, then steps plus periodic actions."""
  train_cfg = spec.train
  mesh = sharding.make_mesh(spec.config.mesh)
  setup = TrainSetup.build(spec, mesh)
  logging.info("Mesh %s over %d devices (%s), %d process(es).", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())
  init_rng, step_rng, eval_rng = run_rngs(spec.config.seed)
  abstract_state, state_shardings = abstract_train_state(setup)
  start_step, state, extra = training_run.restore(abstract_state)
  if state is None:
    state, _ = create_train_state(setup, init_rng, state_shardings)
    if spec.config.init_from:
      state = init_from(state, state_shardings, spec.config.init_from, mesh)
  guard = guards.DivergenceGuard(spec.config.guard, extra.get("guard"))
  guard.set_initial_param_norm(float(optax.tree.norm(state["params"])))
  training_run.begin(start_step)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("Model: %s, %s params, objective %s, attention kernel %s.", spec.model,
               f"{n_params:,}", spec.objective.name, spec.attention)

  data = TrainData(spec, training_run, mesh)
  evaluate = evaluation.Evaluation(setup, state_shardings["params"], data.eval, eval_rng)
  if start_step >= train_cfg.total_steps:  # a finished run: report its eval; no compile, no writes
    return {"step": start_step, **evaluate(state["params"])}
  with contextlib.ExitStack() as stack:
    # Batches are made ahead on worker threads; the batch of a step never changes.
    batches = stack.enter_context(prefetch.Prefetcher(
        data.batch_at, start_step, train_cfg.total_steps, spec.data.num_workers,
        spec.data.prefetch_batches or None))
    batch = batches.get(start_step)
    with compile_cache.watch() as compiled:
      train_step = make_train_step(setup, state_shardings).lower(state, batch,
                                                                 step_rng).compile()
    logging.info("Compiled the train step in %s.", compile_cache.describe(compiled))
    metrics.log_memory(train_step)
    batches.take_wait_stats()  # the first batch waited for the compile, not the loop for it

    # The report's writers are closed however the loop ends (a stop, a divergence, an error),
    # so nothing it logged is lost with the process.
    report = stack.enter_context(contextlib.closing(train_actions.Report(training_run,
                                                                         start_step)))
    window = train_actions.MetricsWindow(guard, start_step if extra else None)
    clock = train_actions.Clock(start_step)
    best = training_run.best() if spec.objective.keep_best_by else None
    save = train_actions.SaveCheckpoint(train_cfg.checkpoint_every_steps, training_run,
                                        spec.config.seed, guard, window)
    actions = [
        train_actions.LogProgress(train_cfg.log_every_steps, train_cfg.total_steps, window, clock, report,
                                  metrics.Throughput.of(spec.model, train_cfg.batch_size, mesh.size,
                                                        train_cfg.peak_flops_per_device),
                                  batches, spec.data.num_workers),
        train_actions.Evaluate(train_cfg.eval_every_steps, evaluate, report, best,
                               spec.objective.keep_best_by),
        *([train_actions.DrawSamples(train_cfg.sample_every_steps, train_samples.TrainingSamples(
            spec.model, training_run.palette, data.val_source, train_cfg.sample_num_images,
            spec.config.seed), training_run, report)] if train_cfg.sample_every_steps else []),
        save,
    ]
    profiler = train_actions.Profiler(train_cfg.profile_start_step, train_cfg.profile_num_steps,
                                      training_run.profile_dir)
    stack.enter_context(jax.set_mesh(mesh))
    notice = stack.enter_context(preemption.Notice())
    for step in range(start_step, train_cfg.total_steps):
      profiler.before(step)
      state, step_metrics = train_step(state, batch, jax.random.fold_in(step_rng, step))
      profiler.after(step, state)
      training_run.check_saves()  # a failed background save (a full disk) stops the run here
      done = step + 1  # steps completed == the state's step counter
      window.add(done, step_metrics)
      if done < train_cfg.total_steps:
        batch = batches.get(done)  # made ahead while the device ran the steps before
      train_actions.run_due(actions, window, clock, report, done, train_cfg.total_steps, state)
      if done < train_cfg.total_steps and notice.stop_at(done):  # the same step on every process
        train_actions.stop_for_preemption(save, window, training_run, done, state)
  if best is not None:
    report.final.update(test_accuracy(spec, evaluate, best, abstract_state["params"], data))
  return report.final


def test_accuracy(spec, evaluate: evaluation.Evaluation, best, abstract_params,
                  data: TrainData) -> dict:
  """Test accuracy of the best-validation params (the number to report)."""
  source = readers.make_source(spec.data, "test", spec.model.image_side)
  params = best.restore(abstract_params)
  batches = evaluation.eval_batches(source, data.palette, data.mesh, spec.train.batch_size)
  accuracy = evaluate.accuracy(params, batches)
  logging.info("test accuracy %.4f (%d images) with the params of step %s (best eval accuracy "
               "%.4f)", accuracy, len(source), best.step, best.best)
  return {"test_accuracy": accuracy, "best_eval_accuracy": best.best, "best_step": best.step}
