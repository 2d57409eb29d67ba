"""TensorBoard summaries of a run (scalars and images), written by process 0 only.

Event files go to `<workdir>/tensorboard/` through tensorboardX (protobuf only, no
TensorFlow). A resumed run starts its writer with `purge_step` = the first step it will write,
so TensorBoard drops what a killed run wrote past its last checkpoint: every curve continues
without a step twice. `metrics.jsonl` stays the record that tests and scripts read.
"""

from __future__ import annotations

import math

import numpy as np


class SummaryWriter:
  """Scalars and images to TensorBoard; a no-op when `enabled` is False."""

  def __init__(self, logdir: str, enabled: bool = True, purge_step: int | None = None):
    self._writer = None
    if enabled:
      import tensorboardX  # noqa: PLC0415  (only the writing process needs it)
      self._writer = tensorboardX.SummaryWriter(logdir, purge_step=purge_step, flush_secs=60)

  def scalars(self, step: int, values: dict, prefix: str = "") -> None:
    """One scalar per finite number in `values`, tagged `prefix + name`."""
    if self._writer is None:
      return
    for name, value in values.items():
      if isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
        self._writer.add_scalar(prefix + name, float(value), int(step))

  def image(self, step: int, tag: str, image_HxWx3: np.ndarray) -> None:
    """A uint8 RGB image."""
    if self._writer is not None:
      self._writer.add_image(tag, np.asarray(image_HxWx3, np.uint8), int(step),
                             dataformats="HWC")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()

  def __enter__(self) -> "SummaryWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
