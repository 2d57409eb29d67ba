"""Checks that stop a training run before a ruined state is checkpointed."""

from __future__ import annotations

import math


class NonFiniteLossError(FloatingPointError):
  """The loss (or the updated params) became NaN or inf; the run stopped without saving."""


def check_finite(step: int, step_metrics: dict, last_good_checkpoint: int | None) -> None:
  """Raises NonFiniteLossError if step `step`'s loss or new param norm is NaN or inf.

  The loss is computed before the update, so a finite loss can still come with overflowed
  params; checking the new params' norm keeps those out of checkpoints too.
  """
  loss, param_norm = float(step_metrics["loss"]), float(step_metrics["param_norm"])
  if math.isfinite(loss) and math.isfinite(param_norm):
    return
  where = (f"the last good checkpoint (step {last_good_checkpoint}) is intact"
           if last_good_checkpoint is not None else "no checkpoint was written")
  raise NonFiniteLossError(
      f"Non-finite training at step {step}: loss {loss}, param_norm {param_norm}, "
      f"grad_norm {float(step_metrics['grad_norm'])}. Stopping without saving; {where}. "
      "Try a lower optim.lr, optim.clip_grad_norm > 0 or model.dtype='float32'.")


class DivergedError(FloatingPointError):
  """The loss or the param norm ran far past its starting value; the run stopped unsaved."""


class DivergenceGuard:
  """Stops a run whose loss or param norm left the range a healthy run stays in.

  A healthy run's loss starts near ln(vocab) (uniform predictions) and only falls; a diverged
  one climbs far above it, or collapses to a dead model whose params blew up (a huge learning
  rate can leave the loss at ln(vocab) with params 1e8 x their size). Healthy runs without
  weight decay grow their param norm a few times over a long run, so the `guard` section's
  default of 100x the initial norm is far outside normal and well before overflow.

  The references are the first step's loss (of the initial params) and the initial param norm;
  they travel in every checkpoint (`reference`), so a resumed run checks against the same
  values. A ratio <= 0 turns its check off.
  """

  def __init__(self, guard_config, reference: dict | None = None):
    self.max_loss_ratio = float(guard_config.max_loss_ratio)
    self.max_param_norm_ratio = float(guard_config.max_param_norm_ratio)
    self.reference = dict(reference or {})

  def set_initial_param_norm(self, param_norm: float) -> None:
    self.reference.setdefault("param_norm", float(param_norm))

  def check(self, step: int, step_metrics: dict, last_good_checkpoint: int | None) -> None:
    """Raises NonFiniteLossError or DivergedError for step `step`'s metrics."""
    check_finite(step, step_metrics, last_good_checkpoint)
    loss, param_norm = float(step_metrics["loss"]), float(step_metrics["param_norm"])
    self.reference.setdefault("loss", loss)
    loss0, norm0 = self.reference["loss"], self.reference.get("param_norm")
    problem = None
    if self.max_loss_ratio > 0 and loss > self.max_loss_ratio * loss0:
      problem = (f"loss {loss:.4g} is over guard.max_loss_ratio={self.max_loss_ratio:g} x the "
                 f"starting loss {loss0:.4g}")
    elif self.max_param_norm_ratio > 0 and norm0 and param_norm > self.max_param_norm_ratio * norm0:
      problem = (f"param norm {param_norm:.4g} is over guard.max_param_norm_ratio="
                 f"{self.max_param_norm_ratio:g} x the initial {norm0:.4g}")
    if problem:
      raise DivergedError(
          f"Training diverged at step {step}: {problem}. Stopping without saving; "
          f"{_where(last_good_checkpoint)}. Try a lower optim.lr or optim.clip_grad_norm > 0 "
          "(or raise the guard.* ratio if this growth is expected).")


def _where(last_good_checkpoint: int | None) -> str:
  return (f"the last good checkpoint (step {last_good_checkpoint}) is intact"
          if last_good_checkpoint is not None else "no checkpoint was written")
