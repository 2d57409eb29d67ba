"""The "folder" source: image files (labels from class subfolders) or `.npz` arrays.

`data.path` is <path>/<split>/ (a folder of images, or of class subfolders), <path>/<split>.npz,
a single .npz with split-specific keys (x_train / x_test, as Keras' mnist.npz), or a plain
folder of images (the train split). `image_files(folder)` lists the image files under a
folder in a deterministic order.
"""

from __future__ import annotations

import os

import numpy as np

from igpt.errors import MissingFileError, UserError
from igpt.readers.base import ArraySource, FileSource, ImageSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")

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
    raise UserError(f"{path!r} is not a readable .npz file: {type(e).__name__}: {e}") from e
  if split is None:
    image_keys, label_keys = _NPZ_IMAGE_KEYS, _NPZ_LABEL_KEYS
  else:
    image_keys = [f"{k}_{split}" for k in _NPZ_IMAGE_KEYS]
    label_keys = [f"{k}_{split}" for k in _NPZ_LABEL_KEYS]
    if split == "train" and not any(k in arrays for k in image_keys):
      image_keys, label_keys = _NPZ_IMAGE_KEYS, _NPZ_LABEL_KEYS
  image_key = next((k for k in image_keys if k in arrays), None)
  if image_key is None:
    raise UserError(f"{path!r} has no image array: expected one of {list(image_keys)}, found "
                    f"{sorted(arrays)}.")
  label_key = next((k for k in label_keys if k in arrays), None)
  images = arrays[image_key]
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
      images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
    raise UserError(f"{path!r}: {image_key!r} must be uint8 [N, H, W] or [N, H, W, 1|3|4]; "
                    f"got {images.dtype} {images.shape}.")
  labels = None if label_key is None else arrays[label_key]
  if labels is not None and (labels.ndim != 1 or len(labels) != len(images)
                             or not np.issubdtype(labels.dtype, np.integer)):
    raise UserError(f"{path!r}: {label_key!r} must be integers [{len(images)}]; got "
                    f"{labels.dtype} {labels.shape}.")
  return images, labels


def image_files(folder: str) -> list[str]:
  """The image files under `folder`, subfolders included, in a deterministic order."""
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
      raise MissingFileError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}.")
    return FileSource(top, None, side, f"folder {folder}", None)
  if top:
    raise UserError(f"{folder!r} mixes image files with class subfolders {subdirs[:5]}: put "
                    f"every image in a class subfolder, or none.")
  class_names = class_names or subdirs
  files, labels = [], []
  for name in subdirs:
    found = image_files(os.path.join(folder, name))
    files += found
    labels += [class_names.index(name)] * len(found)
  if not files:
    raise MissingFileError(f"No image files in the class subfolders of {folder!r}.")
  return FileSource(files, np.asarray(labels, np.int32), side, f"folder {folder}",
                    len(class_names))


def folder_source(cfg, split: str, side: int) -> ImageSource:
  """`data.path` as <path>/<split>/ or <path>/<split>.npz, a single .npz, or a plain folder.

  A single .npz serves split-specific keys (x_train / x_test, as Keras' mnist.npz) or, for the
  train split only, generic ones (images / x). A folder without split subfolders is the train
  split; the test split must then be given as another folder or file.
  """
  path = cfg.path
  if not path:
    raise UserError("data.source='folder' needs data.path: a folder of images or a .npz file.")
  if not os.path.exists(path):
    raise MissingFileError(f"data.path {path!r} (data.source='folder') does not exist.")
  path = os.path.abspath(path)
  if os.path.isfile(path):
    if not path.endswith(".npz"):
      raise UserError(f"data.path {path!r} is a file but not .npz; give a folder or an .npz.")
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
  raise MissingFileError(
      f"No {split!r} split under {path!r}: expected a folder {split_dir!r} or a file "
      f"{split_npz!r}.")


def _npz_arrays_source(path: str, key_split: str | None, split: str, side: int) -> ImageSource:
  images, labels = _npz_arrays(path, key_split)
  return ArraySource(images, labels, side, f"npz {path} [{split}]")
