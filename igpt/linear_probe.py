"""Linear probes: L2-regularised multinomial logistic regression fitted with L-BFGS in JAX.

The objective (per fit, on standardised features x, weights W [D, C], bias b [C]):

    mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2        (the bias is not penalised)

which is scikit-learn's `LogisticRegression(C=1 / (l2 * N))` up to the factor N. The whole
feature matrix sits on the accelerator (rows sharded over a mesh's batch axes when one is
given), and L-BFGS runs full-batch inside one `jax.lax.while_loop`.

    result = probe(train, val, test, num_classes, l2_grid=(1e-3, 1e-2, 0.1))

picks l2 by accuracy on `val` (carved from the training split; the test split is never
looked at), refits on train + val with it and reports test accuracy. `low_data_indices` draws
k labelled examples per class for the low-data probes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from igpt import sharding
from igpt.errors import UserError


@dataclasses.dataclass(frozen=True)
class Split:
  """Features float32 [N, D] and int32 labels [N] of one split."""

  x: np.ndarray
  y: np.ndarray

  def take(self, indices) -> "Split":
    return Split(self.x[indices], self.y[indices])

  @staticmethod
  def concat(*splits: "Split") -> "Split":
    return Split(np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]))


def standardiser(x_NxD: np.ndarray):
  """(mean [D], std [D]) of the training features; constant features get std 1."""
  x_NxD = np.asarray(x_NxD, np.float64)
  mean_D, std_D = x_NxD.mean(axis=0), x_NxD.std(axis=0)
  std_D = np.where(std_D > 1e-8, std_D, 1.0)
  return mean_D.astype(np.float32), std_D.astype(np.float32)


def _loss(params, x_NxD, y_N, w_N, l2):
  logits_NxC = x_NxD @ params["w"] + params["b"]
  ce_N = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, y_N)
  return (ce_N * w_N).sum() / w_N.sum() + 0.5 * l2 * jnp.sum(params["w"] ** 2)


def _fit(x_NxD, y_N, w_N, l2, params, max_steps, tol):
  """L-BFGS from `params` until the gradient norm is below `tol` or `max_steps` is reached."""
  loss_fn = lambda p: _loss(p, x_NxD, y_N, w_N, l2)
  opt = optax.lbfgs(memory_size=20)
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def body(carry):
    p, state, k = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(p, updates), state, k + 1

  def cond(carry):
    _, state, k = carry
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (k == 0) | ((k < max_steps) & (grad_norm >= tol))

  params, state, steps = jax.lax.while_loop(cond, body, (params, opt.init(params), 0))
  return params, optax.tree.get(state, "value"), steps


_fit_jit = jax.jit(_fit)


def _device_rows(x, mesh):
  """`x` [N, ...] on the mesh's batch axes (N a multiple of the data-parallel size)."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.device_put(x, sharding.batch_sharding(mesh))


def _padded_rows(n: int, dp: int) -> int:
  """Rows after padding with zero-weight rows: small sets go up to a power of two (>= 512),
  so the many small fits of a sweep share one compile (compiling costs more than the fit);
  large ones to a multiple of 8192. Always a multiple of the data-parallel size `dp`."""
  rows = max(512, 1 << (n - 1).bit_length()) if n <= 65536 else -(-n // 8192) * 8192
  return -(-rows // dp) * dp


@dataclasses.dataclass
class FittedProbe:
  """A fitted probe: standardisation, weights, and how the fit went."""

  mean_D: np.ndarray
  std_D: np.ndarray
  w_DxC: np.ndarray
  b_C: np.ndarray
  loss: float  # the objective at the end (mean CE + l2 term)
  steps: int

  def logits(self, x_NxD) -> np.ndarray:
    return ((np.asarray(x_NxD) - self.mean_D) / self.std_D) @ self.w_DxC + self.b_C

  def accuracy(self, split: Split) -> float:
    if len(split.y) == 0:
      raise UserError("cannot measure accuracy on an empty split.")
    return float(np.mean(self.logits(split.x).argmax(axis=1) == split.y))


def fit(train: Split, num_classes: int, l2: float, *, max_steps: int = 1000,
        tol: float = 1e-5, mesh=None, init: FittedProbe | None = None) -> FittedProbe:
  """Fits the probe on `train` (standardised with its own statistics) with L2 strength `l2`.

  `init` warm-starts from another fit's weights (the same features, e.g. the previous l2 of a
  sweep). With `mesh`, the rows are sharded over its batch axes (padded with zero-weight rows).
  """
  if len(train.y) == 0:
    raise UserError("cannot fit a probe on an empty training split.")
  mean_D, std_D = standardiser(train.x)
  x_NxD = (train.x - mean_D) / std_D
  y_N, w_N = train.y.astype(np.int32), np.ones(len(train.y), np.float32)
  pad = _padded_rows(len(y_N), 1 if mesh is None else sharding.data_parallel_size(mesh))
  pad -= len(y_N)
  if pad:
    x_NxD = np.concatenate([x_NxD, np.zeros((pad, x_NxD.shape[1]), x_NxD.dtype)])
    y_N, w_N = np.concatenate([y_N, np.zeros(pad, np.int32)]), np.concatenate(
        [w_N, np.zeros(pad, np.float32)])
  d = x_NxD.shape[1]
  params = ({"w": jnp.zeros((d, num_classes), jnp.float32),
             "b": jnp.zeros((num_classes,), jnp.float32)} if init is None else
            {"w": jnp.asarray(init.w_DxC), "b": jnp.asarray(init.b_C)})
  params, loss, steps = _fit_jit(
      _device_rows(x_NxD.astype(np.float32), mesh), _device_rows(y_N, mesh),
      _device_rows(w_N, mesh), jnp.float32(l2), params, jnp.int32(max_steps), jnp.float32(tol))
  params = jax.device_get(params)
  return FittedProbe(mean_D, std_D, np.asarray(params["w"]), np.asarray(params["b"]),
                    float(loss), int(steps))


def choose_l2(train: Split, val: Split, num_classes: int, l2_grid: Sequence[float],
              **fit_kwargs) -> tuple[float, dict]:
  """The l2 of `l2_grid` with the best validation accuracy (ties: the stronger l2), and
  {l2: val accuracy}. Only `train` and `val` are seen."""
  if not l2_grid:
    raise UserError("the l2 grid is empty: give at least one L2 strength.")
  if len(val.y) == 0:
    raise UserError("the validation split is empty: the L2 strength cannot be chosen.")
  scores, clf = {}, None
  for l2 in sorted(l2_grid, reverse=True):  # strong to weak: each fit warm-starts the next
    clf = fit(train, num_classes, l2, init=clf, **fit_kwargs)
    scores[float(l2)] = clf.accuracy(val)
  best = max(scores.items(), key=lambda kv: (kv[1], kv[0]))[0]
  return best, scores


def probe(train: Split, val: Split, test: Split, num_classes: int, l2_grid: Sequence[float],
          **fit_kwargs) -> dict:
  """Chooses l2 on (train, val), refits on train + val, scores test.

  Returns {'l2', 'val_accuracy' (at the chosen l2, fitted on train), 'val_accuracy_by_l2',
  'test_accuracy', 'train_examples', 'val_examples', 'test_examples', 'loss', 'lbfgs_steps',
  'time_s'}.
  """
  t0 = time.time()
  l2, scores = choose_l2(train, val, num_classes, l2_grid, **fit_kwargs)
  clf = fit(Split.concat(train, val), num_classes, l2, **fit_kwargs)
  return {"l2": l2, "val_accuracy": scores[l2], "val_accuracy_by_l2": scores,
          "test_accuracy": clf.accuracy(test), "train_examples": len(train.y),
          "val_examples": len(val.y), "test_examples": len(test.y), "loss": clf.loss,
          "lbfgs_steps": clf.steps, "time_s": time.time() - t0}


def low_data_indices(labels_N: np.ndarray, k: int, seed: int, num_classes: int) -> np.ndarray:
  """Sorted indices of exactly k examples of each class, drawn without replacement by `seed`."""
  rng = np.random.default_rng(seed)
  picks = []
  for c in range(num_classes):
    members = np.flatnonzero(labels_N == c)
    if len(members) < k:
      raise UserError(f"low-data probe: class {c} has {len(members)} training examples, "
                      f"fewer than the {k} per class asked for.")
    picks.append(rng.choice(members, size=k, replace=False))
  return np.sort(np.concatenate(picks))


def low_data_probe(train: Split, val: Split, test: Split, num_classes: int, k: int,
                   draws: int, seed: int, l2_grid: Sequence[float], **fit_kwargs) -> dict:
  """k labelled examples per class from `train`, `draws` times (draw i uses seed + i).

  l2 is chosen per draw on `val` (the carve of the training split), then the probe is fitted
  on the k-per-class set alone. Returns mean and std of test accuracy over the draws.
  """
  accuracies, l2s = [], []
  for i in range(draws):
    subset = train.take(low_data_indices(train.y, k, seed + i, num_classes))
    l2, _ = choose_l2(subset, val, num_classes, l2_grid, **fit_kwargs)
    accuracies.append(fit(subset, num_classes, l2, **fit_kwargs).accuracy(test))
    l2s.append(l2)
  return {"examples_per_class": k, "draws": draws, "seed": seed,
          "test_accuracy_mean": float(np.mean(accuracies)),
          "test_accuracy_std": float(np.std(accuracies)), "test_accuracies": accuracies,
          "l2_per_draw": l2s}
