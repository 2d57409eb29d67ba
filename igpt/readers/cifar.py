"""The "cifar" source: the official CIFAR-10/100 "python version" pickles in `data.path`.

A folder is read once per split and kept (a small cache keyed by the files' names, sizes and
times); the pickles are unpickled with numpy arrays and plain containers only.
"""

from __future__ import annotations

import functools
import os
import pickle

import numpy as np

from igpt.errors import MissingFileError, UserError
from igpt.readers.base import ArraySource, ImageSource, folder_signature, require_dir


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays and plain containers only: a pickle can run arbitrary code."""

  _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
              ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
              ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
              ("_codecs", "encode"), ("copyreg", "_reconstructor"), ("builtins", "object")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are "
                                   f"expected in a CIFAR file)")
    return super().find_class(module, name)


def _read_cifar_file(path: str, label_key: str):
  """(images uint8 [N, 32, 32, 3], labels int32 [N]) from one CIFAR python pickle."""
  try:
    with open(path, "rb") as f:
      record = _NumpyOnlyUnpickler(f, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          IndexError, KeyError) as e:
    raise UserError(f"CIFAR file {path!r} is truncated or not a CIFAR python pickle: "
                    f"{type(e).__name__}: {e}") from e
  if not isinstance(record, dict):
    raise UserError(f"CIFAR file {path!r} holds a {type(record).__name__}, not a dict.")
  record = {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}
  if "data" not in record or label_key not in record:
    raise UserError(f"CIFAR file {path!r} lacks the 'data' or {label_key!r} entry "
                    f"(has {sorted(record)}).")
  data = np.asarray(record["data"])
  labels = np.asarray(record[label_key]).reshape(-1)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise UserError(f"CIFAR file {path!r}: 'data' must be uint8 [N, 3072]; got {data.dtype} "
                    f"{data.shape}.")
  if len(labels) != len(data):
    raise UserError(f"CIFAR file {path!r}: {len(data)} images but {len(labels)} labels.")
  # Rows are channel-major (1024 R, 1024 G, 1024 B), each channel row-major.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _cifar_layout(path: str):
  """(kind, folder) for a cifar-10-batches-py or cifar-100-python folder (or their parent)."""
  for folder in (path, os.path.join(path, "cifar-10-batches-py"),
                 os.path.join(path, "cifar-100-python")):
    if not os.path.isdir(folder):
      continue
    names = set(os.listdir(folder))
    if "test_batch" in names or any(n.startswith("data_batch_") for n in names):
      return "cifar10", folder
    if "train" in names or "test" in names:
      return "cifar100", folder
  raise MissingFileError(
      f"No CIFAR files in {path!r}: expected the python version's cifar-10-batches-py "
      f"(data_batch_1..5, test_batch) or cifar-100-python (train, test) folder.")


@functools.lru_cache(maxsize=4)
def _load_cifar_cached(path: str, split: str, signature: tuple):
  del signature  # only part of the cache key
  return _load_cifar(path, split)


def _batch_number(name: str) -> int:
  """data_batch_10 sorts after data_batch_9."""
  suffix = name.rsplit("_", 1)[1]
  return int(suffix) if suffix.isdigit() else -1


def _load_cifar(path: str, split: str):
  kind, folder = _cifar_layout(path)
  if kind == "cifar10":
    if split == "train":
      names = sorted((n for n in os.listdir(folder) if n.startswith("data_batch_")),
                     key=_batch_number)
    elif split == "test":
      names = ["test_batch"]
    else:
      raise UserError(f"CIFAR-10 has splits 'train' and 'test'; got {split!r}.")
    label_key, num_classes = "labels", 10
  else:
    if split not in ("train", "test"):
      raise UserError(f"CIFAR-100 has splits 'train' and 'test'; got {split!r}.")
    names, label_key, num_classes = [split], "fine_labels", 100
  if not names:
    raise MissingFileError(f"No data_batch_* files in {folder!r} for the CIFAR-10 train split.")
  files = [os.path.join(folder, n) for n in names]
  for f in files:
    if not os.path.isfile(f):
      raise MissingFileError(f"CIFAR split {split!r} needs {f!r}, which does not exist.")
  parts = [_read_cifar_file(f, label_key) for f in files]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  images.flags.writeable = labels.flags.writeable = False  # shared through the cache
  return images, labels, num_classes, folder


def cifar_source(cfg, split: str, side: int) -> ImageSource:
  path = require_dir(cfg.path, "cifar")
  path = os.path.abspath(path)
  signature = folder_signature(_cifar_layout(path)[1])
  images, labels, num_classes, folder = _load_cifar_cached(path, split, signature)
  return ArraySource(images, labels, side, f"CIFAR {folder} [{split}]", num_classes)
