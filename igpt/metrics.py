"""Throughput accounting (FLOPs per token, MFU), the console progress line, and metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
from absl import logging

from igpt import fileio, storage
from igpt.errors import UserError
from igpt.model import ModelConfig

# Dense bfloat16 peak FLOP/s per device (vendor datasheets, no sparsity), matched as a
# substring of `jax.devices()[0].device_kind`, first match wins. Float32 compute runs below
# these peaks, so MFU of a float32 run is measured against the bf16 peak (conservative).
PEAK_FLOPS_PER_DEVICE = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("TPU v6 lite", 918e12),  # v6e
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """The peak to compute MFU against: `override` if > 0, else the table, else None (unknown)."""
  if override and override > 0:
    return float(override)
  for name, flops in PEAK_FLOPS_PER_DEVICE:
    if name.lower() in device_kind.lower():
      return flops
  return None


def flops_per_token(cfg: ModelConfig) -> float:
  """Analytic training FLOPs per token (forward + backward), the PaLM/nanoGPT convention.

  6 * N + 12 * L * d * T, where N counts the matmul weights (blocks and the output head
  `wtet`: 12 d^2 L + V d; token/position lookups and norm gains cost no matmul FLOPs), and
  12 L d T is attention's QK^T and AV over the full T x T square (causal masking's savings are
  not subtracted, as in PaLM). Rematerialisation's extra forward pass is not counted, so this
  is model FLOPs (MFU), not hardware FLOPs.
  """
  d, n_layers, seq = cfg.d_model, cfg.num_layers, cfg.seq_len
  matmul_params = 12 * d * d * n_layers + cfg.vocab_size * d
  return 6.0 * matmul_params + 12.0 * n_layers * d * seq


@dataclasses.dataclass(frozen=True)
class Throughput:
  """Turns a measured steps/s into tokens/s, images/s, model TFLOP/s per device, MFU, ETA."""

  tokens_per_step: int
  images_per_step: int
  flops_per_step: float
  num_devices: int
  peak_flops_per_device: float | None  # None: unknown device, no MFU

  @classmethod
  def of(cls, model_cfg: ModelConfig, batch_size: int, num_devices: int,
         peak_override: float = 0.0) -> "Throughput":
    """For training `model_cfg` at `batch_size` images per step on `num_devices` devices
    (`peak_override` > 0 replaces the device's datasheet peak)."""
    tokens = batch_size * model_cfg.seq_len
    return cls(tokens_per_step=tokens, images_per_step=batch_size,
               flops_per_step=flops_per_token(model_cfg) * tokens, num_devices=num_devices,
               peak_flops_per_device=peak_flops_per_device(jax.devices()[0].device_kind,
                                                           peak_override))

  def __call__(self, steps_per_s: float, steps_left: int) -> dict:
    model_flops_per_device = self.flops_per_step * steps_per_s / self.num_devices
    out = {"tokens_per_s": self.tokens_per_step * steps_per_s,
           "images_per_s": self.images_per_step * steps_per_s,
           "model_tflops_per_s_per_device": model_flops_per_device / 1e12,
           "eta_s": steps_left / steps_per_s}
    if self.peak_flops_per_device:
      out["mfu"] = model_flops_per_device / self.peak_flops_per_device
    return out


def log_memory(compiled) -> None:
  """Logs a compiled step's per-device memory use, where the backend reports it."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return
  if mem is not None:
    logging.info("Train step memory per device: args %.1f MiB, temps %.1f MiB, output %.1f MiB.",
        mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20,
        mem.output_size_in_bytes / 2**20)


class MetricsWriter:
  """Appends one JSON object per line to a metrics.jsonl file (process 0 only).

  An object store has no append: there the records are kept in memory and the whole object is
  rewritten at `flush` (at most every `flush_every_s`, and whenever the run saves a checkpoint
  or closes), so every record up to the last checkpoint is in the bucket.
  """

  def __init__(self, path: str, enabled: bool = True, flush_every_s: float = 30.0):
    self.path = path
    self.enabled = enabled
    self.remote = storage.is_remote(path)
    self.flush_every_s = flush_every_s
    self._lines: list[str] | None = None  # remote: every record of the object
    self._dirty, self._flushed_at = False, time.time()

  def _remote_lines(self) -> list[str]:
    if self._lines is None:
      self._lines = ([ln + "\n" for ln in storage.read_text(self.path).splitlines()]
                     if storage.isfile(self.path) else [])
    return self._lines

  def truncate_after(self, step: int) -> None:
    """Drops records newer than `step`: a resumed run rewrites them, so none are duplicated.

    A cut-off last line (a process killed mid-write, a full disk) is dropped with a warning;
    an unreadable line elsewhere is an error naming the file and line.
    """
    if not self.enabled:
      return
    if self.remote:
      lines = [ln for ln in self._remote_lines() if ln.strip()]
    elif os.path.exists(self.path):
      with open(self.path) as f:
        lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
    else:
      return
    kept = []
    for i, line in enumerate(lines):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        if i == len(lines) - 1:
          logging.info("%s: dropped its cut-off last line (%d characters).", self.path, len(line) - 1)
          continue
        raise UserError(f"{self.path} line {i + 1} is not valid JSON ({e}); remove or repair "
                        "that line.") from e
      if record.get("step", 0) <= step:
        kept.append(line)
    if self.remote:
      self._lines, self._dirty = kept, kept != lines
      self.flush(force=True)
    elif kept != lines:
      with fileio.atomic_open(self.path) as f:
        f.writelines(kept)

  def write(self, step: int, **values) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _jsonable(v) for k, v in values.items()})
    if self.remote:
      self._remote_lines().append(json.dumps(record) + "\n")
      self._dirty = True
      self.flush()
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def flush(self, force: bool = False) -> None:
    """Remote: rewrites the object if records were added (`force`: however recently)."""
    if not (self.enabled and self.remote and self._dirty):
      return
    if force or time.time() - self._flushed_at >= self.flush_every_s:
      storage.write_bytes(self.path, "".join(self._lines).encode())
      self._dirty, self._flushed_at = False, time.time()

  def close(self) -> None:
    self.flush(force=True)


def _jsonable(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep it readable.
  return v


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total_steps: int, values: dict) -> str:
  """One console line: step, loss, throughput, ETA (and MFU where known)."""
  parts = [f"step {step}/{total_steps}", f"loss {values['loss']:.4f}"]
  if "tokens_per_s" in values:
    parts.append(f"{values['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{values['images_per_s']:,.1f} img/s")
  if "model_tflops_per_s_per_device" in values:
    parts.append(f"{values['model_tflops_per_s_per_device']:.3g} TFLOP/s/dev")
  if "mfu" in values:
    parts.append(f"MFU {100 * values['mfu']:.1f}%")
  parts.append(f"|g| {values['grad_norm']:.3g}")
  if "eta_s" in values:
    parts.append(f"ETA {format_duration(values['eta_s'])}")
  return " | ".join(parts)


def summary_line(final: dict) -> str:
  """The end-of-run line: step, train loss (as on the last progress line), eval, throughput."""
  parts = [f"step {final['step']}"]
  if "train_loss" in final:
    parts.append(f"train loss {final['train_loss']:.4f} nats/token (mean since the last log)")
  if "eval_loss" in final:
    parts.append(f"eval loss {final['eval_loss']:.4f} nats/token = "
                 f"{final['eval_bits_per_dim']:.4f} bits/dim on {final['eval_examples']} images")
  if "tokens_per_s" in final:
    parts.append(f"{final['tokens_per_s']:,.0f} tok/s")
  return ", ".join(parts)
