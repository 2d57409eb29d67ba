"""The optimiser: Adam with the paper's beta2 = 0.95, linear warm-up then cosine decay (or a
constant rate, for fine-tuning)."""

from __future__ import annotations

import optax


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to 0 at `total_steps` (`schedule`
  "cosine", the default) or constant `lr` (`schedule` "constant", for fine-tuning)."""
  if optim_config.schedule == "constant":
    return optax.warmup_constant_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_config.lr, warmup_steps=optim_config.warmup_steps,
      decay_steps=total_steps, end_value=0.0)


def make_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (AdamW when `weight_decay` > 0) on `schedule`, with optional global-norm clipping."""
  o = optim_config
  if o.weight_decay > 0:
    adam = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  else:
    adam = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps)
  if o.clip_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), adam)
  return adam
