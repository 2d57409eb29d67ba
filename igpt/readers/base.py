"""What every image reader shares: the source classes and image preparation (numpy, PIL).

- `prepare_images(images, side)`: uint8 images of any size and channel count -> uint8 RGB
  [n, side, side, 3] (grey -> 3 channels, non-square -> centre crop, then an area resize).
- `ImageSource`: random access to prepared images and int32 labels (or None); `ArraySource`
  holds them in memory, `FileSource` decodes image files on demand (16- and 32-bit grey
  scaled to 8 bits).
- `SubsetSource` / `TokenSubset`: the examples of an image / token source at given indices.
- `require_dir`, `folder_signature`: the checks and cache keys the loaders share.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from igpt.errors import MissingFileError, UserError


# ---------------------------------------------------------------------------------------------
# Image preparation


def _to_rgb(image: np.ndarray, origin: str) -> np.ndarray:
  """[H, W] / [H, W, 1|3|4] -> [H, W, 3] (grey repeated, alpha dropped)."""
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise UserError(f"{origin}: an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; "
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
      raise UserError(f"{origin}: images must be uint8 0..255; got dtype {images.dtype}.")
    if images.ndim == 3:  # [n, H, W] grey
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
      raise UserError(f"{origin}: expected images [n, H, W] or [n, H, W, 1|3|4]; got shape "
                      f"{images.shape}.")
    batch = _channels_to_rgb(_centre_square(images))
    return np.ascontiguousarray(_resize_batch(batch, side))
  # A list of images of possibly different sizes (tfds, image files): one at a time.
  out = []
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise UserError(f"{origin}: images must be uint8 0..255; got dtype {image.dtype}.")
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
      raise UserError(f"{description}: images must be uint8 [N, H, W(, C)]; got "
                      f"{images.dtype} {images.shape}.")
    if labels is not None:
      labels = np.asarray(labels).reshape(-1)
      if len(labels) != len(images):
        raise UserError(f"{description}: {len(images)} images but {len(labels)} labels.")
      if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{description}: labels must be integers; got dtype {labels.dtype}.")
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
          images.append(decoded_image(im))
      except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"Image file {path!r} could not be read (truncated or not an image?): "
                        f"{e}") from e
    labels = None if self.labels is None else self.labels[indices]
    return images, labels


def decoded_image(im) -> np.ndarray:
  """A PIL image as uint8 [H, W, 3], or [H, W] for 16- and 32-bit grey (modes I;16*, I).

  Pillow converts those to RGB by clipping every value to 255 (a 16-bit PNG turns white), so
  they keep their top 8 bits here instead: value >> 8 for 16 bits, as Pillow itself does for
  16-bit RGB. Mode I holds 16-bit PNG and PGM pixels as well as 32-bit ones: it is read as 16
  bits when every value fits, else as 31-bit non-negative values.
  """
  if not im.mode.startswith("I"):
    return np.asarray(im.convert("RGB"))
  values = np.asarray(im).astype(np.int64)
  bits = 16 if values.max(initial=0) <= 0xFFFF else 31
  return (np.clip(values, 0, None) >> (bits - 8)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# What the loaders share


def require_dir(path: str, source: str) -> str:
  if not path:
    raise UserError(f"data.source={source!r} needs data.path: the folder holding the files.")
  if not os.path.isdir(path):
    raise MissingFileError(f"data.path {path!r} (data.source={source!r}) is not a folder.")
  return path


def folder_signature(folder: str) -> tuple:
  """(name, size, mtime) of a folder's files: a cache key that changes when the files do."""
  try:
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries
                 if e.is_file())
  except OSError:
    return ()
