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
