"""TensorBoard summaries of a run (scalars and images), written by process 0 only.

Event files go to `<workdir>/tensorboard/` through tensorboardX (protobuf only, no
TensorFlow). A resumed run starts its writer with `purge_step` = the first step it will write,
so TensorBoard drops what a killed run wrote past its last checkpoint: every curve continues
without a step twice. `metrics.jsonl` stays the record that tests and scripts read.

tensorboardX cannot write to an object store, so for a `gs://` or `s3://` logdir the events are
written to a local staging folder and each event file is uploaded whole (at most every
`sync_every_s`, at every checkpoint and at the end); `tensorboard --logdir gs://...` reads them.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

import numpy as np

from igpt import storage


class SummaryWriter:
  """Scalars and images to TensorBoard; a no-op when `enabled` is False."""

  def __init__(self, logdir: str, enabled: bool = True, purge_step: int | None = None,
               sync_every_s: float = 30.0):
    self._writer, self._logdir, self._staging = None, logdir, None
    self.sync_every_s, self._synced_at, self._sizes = sync_every_s, time.time(), {}
    if enabled:
      import tensorboardX  # noqa: PLC0415  (only the writing process needs it)
      local = logdir
      if storage.is_remote(logdir):
        local = self._staging = tempfile.mkdtemp(prefix="igpt-tensorboard-")
      self._writer = tensorboardX.SummaryWriter(local, purge_step=purge_step, flush_secs=60)

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
      self.sync()

  def sync(self, force: bool = False) -> None:
    """Remote logdir: uploads the event files that grew (`force`: however recently)."""
    if self._staging is None or not (force or time.time() - self._synced_at >= self.sync_every_s):
      return
    self._writer.flush()
    for name in sorted(os.listdir(self._staging)):
      local = os.path.join(self._staging, name)
      size = os.path.getsize(local)
      if self._sizes.get(name) != size:
        storage.upload(local, storage.join(self._logdir, name))
        self._sizes[name] = size
    self._synced_at = time.time()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      try:
        self.sync(force=True)
      finally:
        if self._staging is not None:
          shutil.rmtree(self._staging, ignore_errors=True)
        self._writer = None

  def __enter__(self) -> "SummaryWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
