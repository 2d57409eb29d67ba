"""Image readers: one interface over every image source (no palette, no JAX).

`make_source(config.data, split, image_side)` returns an `ImageSource`: random access to uint8
RGB images at `image_side` x `image_side` (grey -> 3 channels, non-square -> centre crop, then
an area resize) and int32 labels (or None). Sources (`data.source`):

- "tfds": a TensorFlow Datasets name (cifar10, svhn_cropped, imagenet_resized/32x32, ...),
  read through `tfds.data_source` (array_record, random access, no TensorFlow needed to read).
- "cifar": the official CIFAR-10/100 "python version" pickles in `data.path`.
- "idx": MNIST-format files (`train-images-idx3-ubyte[.gz]`, `t10k-*`) in `data.path`.
- "folder": image files (labels from class subfolders) or `.npz` arrays under `data.path`.
- "digits": scikit-learn's embedded 8x8 digits (1797 images), no network needed.
- "openai_npy": OpenAI's pre-tokenised release files `{name}_{tr,va,te}{X,Y}.npy` in
  `data.path` (name = cifar10 or imagenet; splits "train", "val", "test"); these sources hold
  palette tokens already (`get_tokens`), so the model's palette must be the release's.

With `data.val_split` empty, the validation split is `data.val_examples` images carved out of
the training split by a fixed seed; the "train" source is then the rest (disjoint).

Turning images into palette tokens and batches is `igpt.pipeline`'s job.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import os
import pickle
import socket
import struct
import zlib
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")
SOURCES = ("tfds", "cifar", "idx", "folder", "digits", "openai_npy")
VAL_SEED = 20200617  # carving the validation split; fixed so train/val never overlap across runs
DIGITS_SEED = 1797  # the digits train/test split
DIGITS_TEST_EXAMPLES = 360  # 20% of 1797
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")


# ---------------------------------------------------------------------------------------------
# Image preparation


def _to_rgb(image: np.ndarray, origin: str) -> np.ndarray:
  """[H, W] / [H, W, 1|3|4] -> [H, W, 3] (grey repeated, alpha dropped)."""
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{origin}: an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; "
                     f"got shape {image.shape}.")
  return _channels_to_rgb(image)


def _channels_to_rgb(images: np.ndarray) -> np.ndarray:
  """[..., 1|3|4] -> [..., 3]: grey repeated, alpha dropped."""
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]


def _centre_square(images: np.ndarray) -> np.ndarray:
  """Centre crop [..., H, W, C] to the shorter side."""
  h, w = images.shape[-3:-1]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return images[..., top:top + s, left:left + s, :]


def _resize_batch(images: np.ndarray, side: int) -> np.ndarray:
  """Square uint8 images [n, s, s, 3] -> [n, side, side, 3]."""
  s = images.shape[1]
  if s == side:
    return images
  if s % side == 0:
    # Exact area average over f x f blocks, vectorised (e.g. CIFAR 32 -> 16, STL 96 -> 32).
    f = s // side
    blocks = images.reshape(len(images), side, f, side, f, 3).astype(np.float32)
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # BOX is the area average when shrinking; BILINEAR interpolates when enlarging.
  method = Image.Resampling.BOX if s > side else Image.Resampling.BILINEAR
  return np.stack([np.asarray(Image.fromarray(im).resize((side, side), method))
                   for im in images])


def prepare_images(images, side: int, origin: str = "images") -> np.ndarray:
  """uint8 [n, side, side, 3] from a uint8 array [n, H, W(, C)] or a list of [H, W(, C)].

  Grey -> RGB, alpha dropped, non-square images centre-cropped to a square, then resized.
  `origin` names where the images came from in error messages.
  """
  if isinstance(images, np.ndarray):
    if images.dtype != np.uint8:
      raise ValueError(f"{origin}: images must be uint8 0..255; got dtype {images.dtype}.")
    if images.ndim == 3:  # [n, H, W] grey
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
      raise ValueError(f"{origin}: expected images [n, H, W] or [n, H, W, 1|3|4]; got shape "
                       f"{images.shape}.")
    batch = _channels_to_rgb(_centre_square(images))
    return np.ascontiguousarray(_resize_batch(batch, side))
  # A list of images of possibly different sizes (tfds, image files): one at a time.
  out = []
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"{origin}: images must be uint8 0..255; got dtype {image.dtype}.")
    out.append(_resize_batch(_centre_square(_to_rgb(image, origin))[None], side)[0])
  if not out:
    return np.zeros((0, side, side, 3), np.uint8)
  return np.stack(out)


# ---------------------------------------------------------------------------------------------
# Sources


class ImageSource:
  """Random access to uint8 RGB images at `image_side` and their int32 labels (or None).

  Subclasses implement `__len__` and `_read(indices)` (raw images + labels); `get` checks the
  indices and prepares the images.
  """

  num_classes: int | None = None
  image_side: int = 0
  description: str = "images"

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, indices: np.ndarray):
    raise NotImplementedError

  def get(self, indices) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 [n, S, S, 3], labels int32 [n] or None) at the given indices."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise IndexError(f"{self.description}: indices must be in [0, {n}); got "
                       f"[{indices.min()}, {indices.max()}].")
    images, labels = self._read(indices)
    images = prepare_images(images, self.image_side, origin=self.description)
    if labels is not None:
      labels = np.asarray(labels, dtype=np.int32).reshape(-1)
    return images, labels

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.description}, {len(self)} images, side "
            f"{self.image_side}, classes {self.num_classes})")


class ArraySource(ImageSource):
  """Images held in memory: uint8 [N, H, W(, C)], labels int [N] or None."""

  def __init__(self, images: np.ndarray, labels, image_side: int, description: str,
               num_classes: int | None = None):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(f"{description}: images must be uint8 [N, H, W(, C)]; got "
                       f"{images.dtype} {images.shape}.")
    if labels is not None:
      labels = np.asarray(labels).reshape(-1)
      if len(labels) != len(images):
        raise ValueError(f"{description}: {len(images)} images but {len(labels)} labels.")
      if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{description}: labels must be integers; got dtype {labels.dtype}.")
      if num_classes is None and labels.size:
        num_classes = int(labels.max()) + 1
    self.images, self.labels = images, labels
    self.image_side, self.description, self.num_classes = image_side, description, num_classes

  def __len__(self) -> int:
    return len(self.images)

  def _read(self, indices):
    labels = None if self.labels is None else self.labels[indices]
    return self.images[indices], labels


class _Subset:
  """The examples of `base` at `indices`; subclasses read them the way `base` is read."""

  def __init__(self, base, indices: np.ndarray, description: str):
    self.base, self.indices = base, np.asarray(indices, np.int64)
    self.image_side, self.num_classes = base.image_side, base.num_classes
    self.description = description

  def __len__(self) -> int:
    return len(self.indices)


class SubsetSource(_Subset, ImageSource):
  """The examples of an image source at `indices` (used to carve validation out of training)."""

  def _read(self, indices):
    return self.base._read(self.indices[indices])  # pylint: disable=protected-access


class TokenSubset(_Subset):
  """The examples of a token source (one with `get_tokens`) at `indices`."""

  def get_tokens(self, indices):
    return self.base.get_tokens(self.indices[np.asarray(indices, np.int64).reshape(-1)])


class FileSource(ImageSource):
  """Image files decoded on demand with Pillow; labels from class subfolders (or None)."""

  def __init__(self, files: Sequence[str], labels, image_side: int, description: str,
               num_classes: int | None):
    self.files, self.labels = list(files), labels
    self.image_side, self.description, self.num_classes = image_side, description, num_classes

  def __len__(self) -> int:
    return len(self.files)

  def _read(self, indices):
    from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
    images = []
    for i in indices:
      path = self.files[i]
      try:
        with Image.open(path) as im:
          images.append(np.asarray(im.convert("RGB")))
      except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"Image file {path!r} could not be read (truncated or not an image?): "
                         f"{e}") from e
    labels = None if self.labels is None else self.labels[indices]
    return images, labels


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


# ---------------------------------------------------------------------------------------------
# Loaders: one per `data.source`. Each returns an ImageSource for a named split.


def _require_dir(path: str, source: str) -> str:
  if not path:
    raise ValueError(f"data.source={source!r} needs data.path: the folder holding the files.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"data.path {path!r} (data.source={source!r}) is not a folder.")
  return path


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
    raise ValueError(f"CIFAR file {path!r} is truncated or not a CIFAR python pickle: "
                     f"{type(e).__name__}: {e}") from e
  if not isinstance(record, dict):
    raise ValueError(f"CIFAR file {path!r} holds a {type(record).__name__}, not a dict.")
  record = {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}
  if "data" not in record or label_key not in record:
    raise ValueError(f"CIFAR file {path!r} lacks the 'data' or {label_key!r} entry "
                     f"(has {sorted(record)}).")
  data = np.asarray(record["data"])
  labels = np.asarray(record[label_key]).reshape(-1)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"CIFAR file {path!r}: 'data' must be uint8 [N, 3072]; got {data.dtype} "
                     f"{data.shape}.")
  if len(labels) != len(data):
    raise ValueError(f"CIFAR file {path!r}: {len(data)} images but {len(labels)} labels.")
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
  raise FileNotFoundError(
      f"No CIFAR files in {path!r}: expected the python version's cifar-10-batches-py "
      f"(data_batch_1..5, test_batch) or cifar-100-python (train, test) folder.")


def _folder_signature(folder: str) -> tuple:
  """(name, size, mtime) of a folder's files: a cache key that changes when the files do."""
  try:
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries
                 if e.is_file())
  except OSError:
    return ()


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
      raise ValueError(f"CIFAR-10 has splits 'train' and 'test'; got {split!r}.")
    label_key, num_classes = "labels", 10
  else:
    if split not in ("train", "test"):
      raise ValueError(f"CIFAR-100 has splits 'train' and 'test'; got {split!r}.")
    names, label_key, num_classes = [split], "fine_labels", 100
  if not names:
    raise FileNotFoundError(f"No data_batch_* files in {folder!r} for the CIFAR-10 train split.")
  files = [os.path.join(folder, n) for n in names]
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(f"CIFAR split {split!r} needs {f!r}, which does not exist.")
  parts = [_read_cifar_file(f, label_key) for f in files]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  images.flags.writeable = labels.flags.writeable = False  # shared through the cache
  return images, labels, num_classes, folder


def _cifar_source(cfg, split: str, side: int) -> ImageSource:
  path = _require_dir(cfg.path, "cifar")
  path = os.path.abspath(path)
  signature = _folder_signature(_cifar_layout(path)[1])
  images, labels, num_classes, folder = _load_cifar_cached(path, split, signature)
  return ArraySource(images, labels, side, f"CIFAR {folder} [{split}]", num_classes)


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
    raise ValueError(f"IDX file {path!r} is truncated or not valid gzip: {e}") from e
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"IDX file {path!r} is truncated: {len(raw)} bytes, shorter than its header.")
  magic = struct.unpack(">I", raw[:4])[0]
  if magic != 0x800 + ndim:
    raise ValueError(f"IDX file {path!r} has magic number 0x{magic:08x}; expected uint8 {kind}.")
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  body = raw[4 + 4 * ndim:]
  expected = int(np.prod(dims))
  if len(body) != expected:
    what = "is truncated" if len(body) < expected else "has trailing bytes"
    raise ValueError(f"IDX file {path!r} {what}: header {dims} needs {expected} bytes of data, "
                     f"found {len(body)}.")
  return np.frombuffer(body, np.uint8).reshape(dims)


def _find_idx_file(folder: str, prefix: str, what: str, ndim: int) -> str:
  names = [f"{prefix}-{what}-idx{ndim}-ubyte", f"{prefix}-{what}.idx{ndim}-ubyte"]
  candidates = [n + ext for n in names for ext in ("", ".gz")]
  for name in candidates:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise FileNotFoundError(f"No IDX {what} file in {folder!r}: looked for {candidates}.")


@functools.lru_cache(maxsize=4)
def _load_idx(folder: str, split: str, signature: tuple):
  del signature  # only part of the cache key
  prefix = _IDX_PREFIX.get(split, split)
  images_path = _find_idx_file(folder, prefix, "images", 3)
  labels_path = _find_idx_file(folder, prefix, "labels", 1)
  images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
  if len(images) != len(labels):
    raise ValueError(f"IDX files disagree: {images_path!r} holds {len(images)} images but "
                     f"{labels_path!r} holds {len(labels)} labels.")
  labels = labels.astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False  # shared through the cache
  return images, labels, images_path


def _idx_source(cfg, split: str, side: int) -> ImageSource:
  folder = os.path.abspath(_require_dir(cfg.path, "idx"))
  images, labels, images_path = _load_idx(folder, split, _folder_signature(folder))
  # MNIST-style sets have 10 classes; more only if the labels say so.
  num_classes = max(10, int(labels.max()) + 1) if labels.size else 10
  return ArraySource(images, labels, side, f"IDX {images_path}", num_classes)


@functools.lru_cache(maxsize=1)
def _load_digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  # Values are 0..16 (4x4 block counts of the original 32x32 bitmaps); spread over 0..255.
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images, digits.target.astype(np.int32)


def _digits_source(cfg, split: str, side: int) -> ImageSource:
  del cfg
  images, labels = _load_digits()
  order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
  if split == "test":
    chosen = np.sort(order[:DIGITS_TEST_EXAMPLES])
  elif split == "train":
    chosen = np.sort(order[DIGITS_TEST_EXAMPLES:])
  else:
    raise ValueError(f"The digits source has splits 'train' and 'test'; got {split!r}.")
  return ArraySource(images[chosen], labels[chosen], side, f"sklearn digits [{split}]", 10)


_NPZ_IMAGE_KEYS = ("images", "x", "image", "data", "inputs")
_NPZ_LABEL_KEYS = ("labels", "y", "label", "targets")


def _npz_arrays(path: str, split: str | None):
  """(images, labels or None) from an .npz.

  With `split`, keys like x_<split> / images_<split> (and, for 'train' only, the generic keys
  as a fallback); without, the generic keys images / x (labels / y).
  """
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a readable .npz file: {type(e).__name__}: {e}") from e
  if split is None:
    image_keys, label_keys = _NPZ_IMAGE_KEYS, _NPZ_LABEL_KEYS
  else:
    image_keys = [f"{k}_{split}" for k in _NPZ_IMAGE_KEYS]
    label_keys = [f"{k}_{split}" for k in _NPZ_LABEL_KEYS]
    if split == "train" and not any(k in arrays for k in image_keys):
      image_keys, label_keys = _NPZ_IMAGE_KEYS, _NPZ_LABEL_KEYS
  image_key = next((k for k in image_keys if k in arrays), None)
  if image_key is None:
    raise ValueError(f"{path!r} has no image array: expected one of {list(image_keys)}, found "
                     f"{sorted(arrays)}.")
  label_key = next((k for k in label_keys if k in arrays), None)
  images = arrays[image_key]
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
      images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
    raise ValueError(f"{path!r}: {image_key!r} must be uint8 [N, H, W] or [N, H, W, 1|3|4]; "
                     f"got {images.dtype} {images.shape}.")
  labels = None if label_key is None else arrays[label_key]
  if labels is not None and (labels.ndim != 1 or len(labels) != len(images)
                             or not np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f"{path!r}: {label_key!r} must be integers [{len(images)}]; got "
                     f"{labels.dtype} {labels.shape}.")
  return images, labels


def _image_files(folder: str) -> list[str]:
  files = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()  # a deterministic walk
    files += [os.path.join(root, n) for n in sorted(names)
              if n.lower().endswith(IMAGE_EXTENSIONS)]
  return files


def _class_dirs(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
                and not d.startswith("."))


def _folder_images(folder: str, side: int, class_names: list[str] | None) -> ImageSource:
  """Images directly in `folder` (unlabelled) or in its class subfolders (labelled)."""
  subdirs = _class_dirs(folder)
  top = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
         if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]
  if not subdirs:
    if not top:
      raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}.")
    return FileSource(top, None, side, f"folder {folder}", None)
  if top:
    raise ValueError(f"{folder!r} mixes image files with class subfolders {subdirs[:5]}: put "
                     f"every image in a class subfolder, or none.")
  class_names = class_names or subdirs
  files, labels = [], []
  for name in subdirs:
    found = _image_files(os.path.join(folder, name))
    files += found
    labels += [class_names.index(name)] * len(found)
  if not files:
    raise FileNotFoundError(f"No image files in the class subfolders of {folder!r}.")
  return FileSource(files, np.asarray(labels, np.int32), side, f"folder {folder}",
                    len(class_names))


def _folder_source(cfg, split: str, side: int) -> ImageSource:
  """`data.path` as <path>/<split>/ or <path>/<split>.npz, a single .npz, or a plain folder.

  A single .npz serves split-specific keys (x_train / x_test, as Keras' mnist.npz) or, for the
  train split only, generic ones (images / x). A folder without split subfolders is the train
  split; the test split must then be given as another folder or file.
  """
  path = cfg.path
  if not path:
    raise ValueError("data.source='folder' needs data.path: a folder of images or a .npz file.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path {path!r} (data.source='folder') does not exist.")
  path = os.path.abspath(path)
  if os.path.isfile(path):
    if not path.endswith(".npz"):
      raise ValueError(f"data.path {path!r} is a file but not .npz; give a folder or an .npz.")
    return _npz_arrays_source(path, split, split, side)
  split_dir, split_npz = os.path.join(path, split), os.path.join(path, split + ".npz")
  if os.path.isdir(split_dir):
    # Class names are the union over all split folders, so labels agree between splits.
    splits = [d for d in _class_dirs(path) if d in (split, "train", "val", "validation", "test")]
    names = sorted({c for s in splits for c in _class_dirs(os.path.join(path, s))})
    return _folder_images(split_dir, side, names or None)
  if os.path.isfile(split_npz):
    return _npz_arrays_source(split_npz, None, split, side)
  npz_files = sorted(n for n in os.listdir(path) if n.endswith(".npz"))
  if split == "train" and not npz_files:
    return _folder_images(path, side, None)
  if split == "train" and len(npz_files) == 1:
    return _npz_arrays_source(os.path.join(path, npz_files[0]), None, split, side)
  raise FileNotFoundError(
      f"No {split!r} split under {path!r}: expected a folder {split_dir!r} or a file "
      f"{split_npz!r}.")


def _npz_arrays_source(path: str, key_split: str | None, split: str, side: int) -> ImageSource:
  images, labels = _npz_arrays(path, key_split)
  return ArraySource(images, labels, side, f"npz {path} [{split}]")


def _tfds_feature_keys(info, name: str):
  """(image key, label key or None, num_classes) from a TFDS dataset's features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = dict(info.features.items())
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if not images:
    raise ValueError(f"TFDS dataset {name!r} has no image feature (features: {sorted(features)}).")
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
    raise ValueError(
        f"TFDS dataset {name!r} is not prepared in data_dir={where!r} and the network is "
        f"unreachable ({_DOWNLOAD_HOST[0]}), so it cannot be downloaded. Prepare it once on a "
        "machine with network (array_record format) and copy data_dir here, or use "
        "data.source='cifar'|'idx'|'folder'|'digits' for local files.")


def _tfds_source(cfg, split: str, side: int) -> ImageSource:
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
    raise ValueError(
        f"Unknown TFDS dataset data.name={name!r}. Close names: {close or 'none'}. See "
        f"https://www.tensorflow.org/datasets/catalog for names (e.g. cifar10, svhn_cropped, "
        f"imagenet_resized/32x32), or use data.source='cifar'|'idx'|'folder'|'digits' for "
        f"local files.") from e
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"Could not open TFDS dataset {name!r} (data_dir={where!r}): "
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
      raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {known}.") from e
    if "tensorflow" in str(e).lower():
      missing = (" TFDS encodes images with TensorFlow while preparing a dataset: run "
                 "`pip install tensorflow` for the first (download) run; reading the prepared "
                 "array_record files later does not need it.")
    elif isinstance(e, ModuleNotFoundError) and e.name:
      missing = f" Install the missing module: `pip install {e.name}`."
    else:
      missing = ""
    raise RuntimeError(
        f"Could not download/prepare TFDS dataset {name!r} in data_dir={where!r}: "
        f"{type(e).__name__}: {e}.{missing} Check network access and disk space. Preparing some "
        f"datasets needs TensorFlow (`pip install tensorflow`) or other packages named above; "
        f"you can also prepare it once elsewhere (array_record format) and copy data_dir. An "
        f"existing copy in tfrecord format cannot be read at random: convert it with "
        f"`tfds convert_format --out_file_format=array_record`.") from e
  return TfdsSource(ds, image_key, label_key, side, f"tfds {name} [{split}]", num_classes)


def _openai_npy_source(cfg, split: str, side: int):
  # Imported here: the release module also reads TensorFlow checkpoints (and imports the model).
  from igpt import openai_release  # pylint: disable=g-import-not-at-top
  folder = _require_dir(cfg.path, "openai_npy")
  source = openai_release.token_source(folder, cfg.name, split)
  if source.image_side != side:
    raise ValueError(f"{source.description} holds {source.image_side}x{source.image_side} "
                     f"images but the model reads {side}x{side}.")
  return source


_LOADERS = {"tfds": _tfds_source, "cifar": _cifar_source, "idx": _idx_source,
            "folder": _folder_source, "digits": _digits_source,
            "openai_npy": _openai_npy_source}


def _carve(train: ImageSource, val_examples: int, description: str):
  """(train, val) disjoint subsets of `train`: val_examples images chosen by VAL_SEED."""
  n = len(train)
  if not 0 < val_examples < n:
    raise ValueError(
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


def make_source(data_cfg, split: str, image_side: int) -> ImageSource:
  """The `split` ('train' | 'val' | 'test') of the source described by `config.data`."""
  source = data_cfg.source
  if source not in _LOADERS:
    raise ValueError(f"Unknown data.source={source!r}: use one of {list(SOURCES)}.")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {list(SPLITS)}.")
  if not isinstance(image_side, (int, np.integer)) or image_side < 1:
    raise ValueError(f"image_side must be a positive int; got {image_side!r}.")
  load = _LOADERS[source]
  if split == "test":
    return load(data_cfg, data_cfg.test_split, int(image_side))
  if split == "val" and data_cfg.val_split:
    return load(data_cfg, data_cfg.val_split, int(image_side))
  train = load(data_cfg, data_cfg.train_split, int(image_side))
  if data_cfg.val_split:
    return train
  train, val = _carve(train, int(data_cfg.val_examples), train.description)
  return train if split == "train" else val
