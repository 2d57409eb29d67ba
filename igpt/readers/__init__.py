"""Image readers: one interface over every image source (no palette, no JAX).

`make_source(config.data, split, image_side)` returns an `ImageSource`: random access to uint8
RGB images at `image_side` x `image_side` (grey -> 3 channels, non-square -> centre crop, then
an area resize) and int32 labels (or None). Sources (`data.source`), one module each:

- "tfds" (`tfds.py`): a TensorFlow Datasets name (cifar10, svhn_cropped, imagenet_resized/32x32,
  ...), read through `tfds.data_source` (array_record, random access, no TensorFlow needed to
  read).
- "cifar" (`cifar.py`): the official CIFAR-10/100 "python version" pickles in `data.path`.
- "idx" (`idx.py`): MNIST-format files (`train-images-idx3-ubyte[.gz]`, `t10k-*`) in
  `data.path`.
- "folder" (`folders.py`): image files (labels from class subfolders) or `.npz` arrays under
  `data.path`.
- "digits" (`digits.py`): scikit-learn's embedded 8x8 digits (1797 images), no network needed.
- "openai_npy" (`openai_npy.py`): OpenAI's pre-tokenised release files
  `{name}_{tr,va,te}{X,Y}.npy` in `data.path` (name = cifar10 or imagenet; splits "train",
  "val", "test"); these sources hold palette tokens already (`get_tokens`), so the model's
  palette must be the release's.

The source classes and the image preparation they share are in `base.py`. This module holds
the dispatch and the validation carve: with `data.val_split` empty, the validation split is
`data.val_examples` images carved out of the training split by a fixed seed; the "train"
source is then the rest (disjoint).

Turning images into palette tokens and batches is `igpt.pipeline`'s job.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from igpt import storage

from igpt.readers.base import (ArraySource, FileSource, ImageSource, SubsetSource, TokenSubset,
                               decoded_image, prepare_images)
from igpt.errors import UserError
from igpt.readers.cifar import cifar_source
from igpt.readers.digits import digits_source
from igpt.readers.folders import IMAGE_EXTENSIONS, folder_source, image_files
from igpt.readers.idx import idx_source
from igpt.readers.openai_npy import TokenSource, openai_npy_source, token_source
from igpt.readers.tfds import TfdsSource, tfds_source

__all__ = ["SPLITS", "SOURCES", "VAL_SEED", "make_source", "subset", "ImageSource",
           "ArraySource", "FileSource", "SubsetSource", "TokenSubset", "TfdsSource",
           "TokenSource", "decoded_image", "prepare_images", "image_files", "token_source",
           "IMAGE_EXTENSIONS"]

SPLITS = ("train", "val", "test")
SOURCES = ("tfds", "cifar", "idx", "folder", "digits", "openai_npy")
VAL_SEED = 20200617  # carving the validation split; fixed so train/val never overlap across runs

_LOADERS = {"tfds": tfds_source, "cifar": cifar_source, "idx": idx_source,
            "folder": folder_source, "digits": digits_source,
            "openai_npy": openai_npy_source}


def _carve(train: ImageSource, val_examples: int, description: str):
  """(train, val) disjoint subsets of `train`: val_examples images chosen by VAL_SEED."""
  n = len(train)
  if not 0 < val_examples < n:
    raise UserError(
        f"data.val_examples={val_examples} must be in (0, {n}) to carve a validation split "
        f"out of {description} ({n} images); lower it or set data.val_split.")
  order = np.random.default_rng(VAL_SEED).permutation(n)
  val_idx, train_idx = np.sort(order[:val_examples]), np.sort(order[val_examples:])
  return (subset(train, train_idx, f"{description} minus {val_examples} val images"),
          subset(train, val_idx, f"{description} val carve ({val_examples} images)"))


def subset(source, indices, description: str):
  """The examples of `source` at `indices`, as a source of the same kind (images or tokens)."""
  kind = TokenSubset if hasattr(source, "get_tokens") else SubsetSource
  return kind(source, indices, description)


def _staged(data_cfg):
  """`data_cfg` with a bucket's `data.path` replaced by a local copy (downloaded once per
  machine into the user cache); tfds reads `gs://` itself (`data.data_dir`)."""
  if data_cfg.source == "tfds" or not storage.is_remote(data_cfg.get("path", "")):
    return data_cfg
  staged = ml_collections.ConfigDict(data_cfg.to_dict())
  staged.path = storage.local_copy(data_cfg.path)
  return staged


def make_source(data_cfg, split: str, image_side: int) -> ImageSource:
  """The `split` ('train' | 'val' | 'test') of the source described by `config.data`."""
  source = data_cfg.source
  if source not in _LOADERS:
    raise UserError(f"Unknown data.source={source!r}: use one of {list(SOURCES)}.")
  if split not in SPLITS:
    raise UserError(f"split={split!r} is not one of {list(SPLITS)}.")
  if not isinstance(image_side, (int, np.integer)) or image_side < 1:
    raise UserError(f"image_side must be a positive int; got {image_side!r}.")
  load = _LOADERS[source]
  data_cfg = _staged(data_cfg)
  if split == "test":
    return load(data_cfg, data_cfg.test_split, int(image_side))
  if split == "val" and data_cfg.val_split:
    return load(data_cfg, data_cfg.val_split, int(image_side))
  train = load(data_cfg, data_cfg.train_split, int(image_side))
  if data_cfg.val_split:
    return train
  train, val = _carve(train, int(data_cfg.val_examples), train.description)
  return train if split == "train" else val
