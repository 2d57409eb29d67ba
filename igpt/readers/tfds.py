"""The "tfds" source: a TensorFlow Datasets split, read through `tfds.data_source`.

Any TFDS name (cifar10, svhn_cropped, imagenet_resized/32x32, ...) is read as array_record:
random access, no TensorFlow needed to read. A dataset not prepared here is downloaded on first
use; with the network unreachable that fails at once (one quick connection) rather than after
TFDS's minutes of retries.
"""

from __future__ import annotations

import difflib
import os
import socket

import numpy as np

from igpt.errors import UserError
from igpt.readers.base import ImageSource


class TfdsSource(ImageSource):
  """A TFDS split through `tfds.data_source`: random access, nothing loaded up front."""

  def __init__(self, data_source, image_key: str, label_key: str | None, image_side: int,
               description: str, num_classes: int | None):
    self.data_source, self.image_key, self.label_key = data_source, image_key, label_key
    self.image_side, self.description, self.num_classes = image_side, description, num_classes
    self._batched_reads = True

  def __len__(self) -> int:
    return len(self.data_source)

  def _records(self, indices):
    keys = [int(i) for i in indices]
    if self._batched_reads:
      try:
        return list(self.data_source.__getitems__(keys))  # one read for the batch when supported
      except Exception:  # pylint: disable=broad-except
        self._batched_reads = False  # e.g. tfds' mock data source; per-record reads re-raise
    return [self.data_source[i] for i in keys]

  def _read(self, indices):
    records = self._records(indices)
    images = [np.asarray(r[self.image_key]) for r in records]
    labels = None
    if self.label_key is not None:
      labels = np.array([int(np.asarray(r[self.label_key])) for r in records], np.int32)
    return images, labels


def _tfds_feature_keys(info, name: str):
  """(image key, label key or None, num_classes) from a TFDS dataset's features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = dict(info.features.items())
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if not images:
    raise UserError(f"TFDS dataset {name!r} has no image feature (features: {sorted(features)}).")
  image_key = "image" if "image" in images else images[0]
  label_key = "label" if "label" in labels else (labels[0] if labels else None)
  num_classes = features[label_key].num_classes if label_key else None
  return image_key, label_key, num_classes


# Where TFDS downloads most datasets from; one quick connection tells whether a download can
# work at all (offline, TFDS retries each file for minutes before it gives up).
_DOWNLOAD_HOST = ("storage.googleapis.com", 443)


def _network_reachable(timeout_s: float = 3.0) -> bool:
  try:
    socket.create_connection(_DOWNLOAD_HOST, timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _check_can_download(builder, name: str, where: str) -> None:
  """Fails fast when a TFDS dataset is not prepared here and the network is unreachable."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Only catalog datasets download; a mocked TFDS (tests) or a local builder does not.
  if not type(builder).__module__.startswith("tensorflow_datasets."):
    return
  for fn in (tfds.data_source, type(builder).download_and_prepare):
    if not getattr(fn, "__module__", "").startswith("tensorflow_datasets.core"):
      return
  try:
    prepared = builder.is_prepared()
  except Exception:  # pylint: disable=broad-except  (an older tfds): let tfds decide
    return
  if not prepared and not _network_reachable():
    raise UserError(
        f"TFDS dataset {name!r} is not prepared in data_dir={where!r} and the network is "
        f"unreachable ({_DOWNLOAD_HOST[0]}), so it cannot be downloaded. Prepare it once on a "
        "machine with network (array_record format) and copy data_dir here, or use "
        "data.source='cifar'|'idx'|'folder'|'digits' for local files.")


def tfds_source(cfg, split: str, side: int) -> ImageSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = cfg.name, cfg.data_dir or None
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    try:  # community datasets would need a network look-up (and TensorFlow): skip them
      known = tfds.list_builders(with_community_datasets=False)
    except Exception:  # pylint: disable=broad-except
      known = []
    close = difflib.get_close_matches(name.split("/")[0], known, n=5)
    raise UserError(
        f"Unknown TFDS dataset data.name={name!r}. Close names: {close or 'none'}. See "
        f"https://www.tensorflow.org/datasets/catalog for names (e.g. cifar10, svhn_cropped, "
        f"imagenet_resized/32x32), or use data.source='cifar'|'idx'|'folder'|'digits' for "
        f"local files.") from e
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"Could not open TFDS dataset {name!r} (data_dir={where!r}): "
                    f"{type(e).__name__}: {e}") from e
  image_key, label_key, num_classes = _tfds_feature_keys(builder.info, name)
  _check_can_download(builder, name, where)
  try:
    # array_record is the random-access format; tfds only picks it by itself without data_dir.
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=True,
                          builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # pylint: disable=broad-except
    known = list(builder.info.splits.keys())
    if "split" in str(e).lower() and known:
      raise UserError(f"TFDS dataset {name!r} has no split {split!r}; it has {known}.") from e
    if "tensorflow" in str(e).lower():
      missing = (" TFDS encodes images with TensorFlow while preparing a dataset: run "
                 "`pip install tensorflow` for the first (download) run; reading the prepared "
                 "array_record files later does not need it.")
    elif isinstance(e, ModuleNotFoundError) and e.name:
      missing = f" Install the missing module: `pip install {e.name}`."
    else:
      missing = ""
    raise UserError(
        f"Could not download/prepare TFDS dataset {name!r} in data_dir={where!r}: "
        f"{type(e).__name__}: {e}.{missing} Check network access and disk space. Preparing some "
        f"datasets needs TensorFlow (`pip install tensorflow`) or other packages named above; "
        f"you can also prepare it once elsewhere (array_record format) and copy data_dir. An "
        f"existing copy in tfrecord format cannot be read at random: convert it with "
        f"`tfds convert_format --out_file_format=array_record`.") from e
  return TfdsSource(ds, image_key, label_key, side, f"tfds {name} [{split}]", num_classes)
