"""The "idx" source: MNIST-format files in `data.path`.

`train-images-idx3-ubyte[.gz]` / `train-labels-idx1-ubyte[.gz]`, and `t10k-*` for the test
split (MNIST's and Fashion-MNIST's names), read once per folder and split and kept (a small
cache keyed by the files' names, sizes and times).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib

import numpy as np

from igpt.errors import MissingFileError, UserError
from igpt.readers.base import ArraySource, ImageSource, folder_signature, require_dir

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(path: str, ndim: int) -> np.ndarray:
  """A uint8 IDX array (gzipped or raw) with `ndim` dimensions, fully validated."""
  kind = "images (magic 0x00000803)" if ndim == 3 else "labels (magic 0x00000801)"
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except (EOFError, OSError, zlib.error) as e:
    raise UserError(f"IDX file {path!r} is truncated or not valid gzip: {e}") from e
  if len(raw) < 4 + 4 * ndim:
    raise UserError(f"IDX file {path!r} is truncated: {len(raw)} bytes, shorter than its header.")
  magic = struct.unpack(">I", raw[:4])[0]
  if magic != 0x800 + ndim:
    raise UserError(f"IDX file {path!r} has magic number 0x{magic:08x}; expected uint8 {kind}.")
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  body = raw[4 + 4 * ndim:]
  expected = int(np.prod(dims))
  if len(body) != expected:
    what = "is truncated" if len(body) < expected else "has trailing bytes"
    raise UserError(f"IDX file {path!r} {what}: header {dims} needs {expected} bytes of data, "
                    f"found {len(body)}.")
  return np.frombuffer(body, np.uint8).reshape(dims)


def _find_idx_file(folder: str, prefix: str, what: str, ndim: int) -> str:
  names = [f"{prefix}-{what}-idx{ndim}-ubyte", f"{prefix}-{what}.idx{ndim}-ubyte"]
  candidates = [n + ext for n in names for ext in ("", ".gz")]
  for name in candidates:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise MissingFileError(f"No IDX {what} file in {folder!r}: looked for {candidates}.")


@functools.lru_cache(maxsize=4)
def _load_idx(folder: str, split: str, signature: tuple):
  del signature  # only part of the cache key
  prefix = _IDX_PREFIX.get(split, split)
  images_path = _find_idx_file(folder, prefix, "images", 3)
  labels_path = _find_idx_file(folder, prefix, "labels", 1)
  images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
  if len(images) != len(labels):
    raise UserError(f"IDX files disagree: {images_path!r} holds {len(images)} images but "
                    f"{labels_path!r} holds {len(labels)} labels.")
  labels = labels.astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False  # shared through the cache
  return images, labels, images_path


def idx_source(cfg, split: str, side: int) -> ImageSource:
  folder = os.path.abspath(require_dir(cfg.path, "idx"))
  images, labels, images_path = _load_idx(folder, split, folder_signature(folder))
  # MNIST-style sets have 10 classes; more only if the labels say so.
  num_classes = max(10, int(labels.max()) + 1) if labels.size else 10
  return ArraySource(images, labels, side, f"IDX {images_path}", num_classes)
