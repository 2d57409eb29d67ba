"""The "openai_npy" source: OpenAI's pre-tokenised release files (numpy only).

`token_source(folder, "cifar10", "train")` reads the release's `{dataset}_trX.npy` / `_trY.npy`
(and `va`, `te`) of github.com/openai/image-gpt as a `TokenSource`, memory-mapped: palette
tokens already (`get_tokens`), so the model's palette must be the release's (NUM_TOKENS
colours). `openai_npy_source` is the loader `make_source` uses for `data.source="openai_npy"`.
"""

from __future__ import annotations

import math
import os

import numpy as np

from igpt.errors import MissingFileError, UserError
from igpt.readers.base import require_dir

SPLIT_TAGS = {"train": "tr", "val": "va", "test": "te"}
NUM_TOKENS = 512
# Below this size a file is checked whole when opened; above it (ImageNet's files are large)
# each batch is checked as it is read.
_EAGER_CHECK_BYTES = 64 << 20


class TokenSource:
  """Random access to pre-tokenised images: tokens int32 [n, side*side], labels int32 [n].

  Built from token ids [N, side*side] (any integer dtype) and one-hot labels [N, classes],
  e.g. memory-mapped `.npy` files (see `token_source`).
  """

  def __init__(self, tokens_NxL, onehot_NxC, description: str, num_tokens: int = NUM_TOKENS):
    self.description = description
    self.num_tokens = num_tokens
    self._tokens, self._onehot = tokens_NxL, onehot_NxC
    self._check_layout()
    self.image_side = math.isqrt(tokens_NxL.shape[1])
    self.num_classes = int(onehot_NxC.shape[1])
    if tokens_NxL.nbytes + onehot_NxC.nbytes <= _EAGER_CHECK_BYTES:
      self._check_values(np.asarray(tokens_NxL), np.asarray(onehot_NxC))

  def _check_layout(self):
    x, y, what = self._tokens, self._onehot, self.description
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
      raise UserError(f"{what}: tokens must be an integer array [N, side*side]; got dtype "
                      f"{x.dtype}, shape {x.shape}.")
    if x.shape[1] == 0 or math.isqrt(x.shape[1]) ** 2 != x.shape[1]:
      side = math.isqrt(max(x.shape[1] - 1, 0))
      hint = (f": one more than {side}x{side}, so drop the first column if it holds a "
              "start-of-sequence token (transformers' input_ids do)"
              if side and side * side == x.shape[1] - 1 else "")
      raise UserError(f"{what}: {x.shape[1]} tokens per image is not a square image "
                      f"(side*side){hint}.")
    if y.ndim != 2 or y.shape[1] == 0 or not (np.issubdtype(y.dtype, np.number)
                                             or y.dtype == np.bool_):
      raise UserError(f"{what}: labels must be one-hot numbers [N, classes]; got dtype "
                      f"{y.dtype}, shape {y.shape}.")
    if len(x) != len(y):
      raise UserError(f"{what}: {len(x)} token rows but {len(y)} label rows.")

  def _check_values(self, x, y, rows=None):
    """A UserError unless tokens are in [0, num_tokens) and labels one-hot; `rows` are the file
    rows of x and y (default: 0, 1, ...), for the message."""
    name = lambda i: int(i if rows is None else rows[i])
    outside = (x < 0) | (x >= self.num_tokens)
    bad = np.flatnonzero(np.any(outside, axis=1))
    if bad.size:
      i = bad[0]
      p = int(np.flatnonzero(outside[i])[0])
      raise UserError(f"{self.description}: image {name(i)} has a token outside "
                      f"[0, {self.num_tokens}) (min {x[i].min()}, max {x[i].max()}; "
                      f"{x[i, p]} at position {p}): the file must hold palette indices "
                      f"0..{self.num_tokens - 1}, one per pixel. Fetch it again with download.py "
                      "of github.com/openai/image-gpt; tokens made elsewhere must drop any "
                      f"start-of-sequence column (transformers' input_ids begin with "
                      f"{self.num_tokens}).")
    ok = np.all((y == 0) | (y == 1), axis=1) & (np.count_nonzero(y, axis=1) == 1)
    if not np.all(ok):
      i = np.flatnonzero(~ok)[0]
      raise UserError(f"{self.description}: label row {name(i)} is not one-hot "
                      f"(values {np.unique(y[i])[:5].tolist()}).")

  def __len__(self) -> int:
    return len(self._tokens)

  def get_tokens(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n, side*side], labels int32 [n]) at the given indices."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise IndexError(f"{self.description}: indices must be in [0, {n}); got "
                       f"[{indices.min()}, {indices.max()}].")
    x, y = np.asarray(self._tokens[indices]), np.asarray(self._onehot[indices])
    self._check_values(x, y, indices)
    return x.astype(np.int32), np.argmax(y, axis=1).astype(np.int32)

  def __repr__(self) -> str:
    return (f"TokenSource({self.description}, {len(self)} images, side {self.image_side}, "
            f"classes {self.num_classes})")


def _open_npy(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise MissingFileError(
        f"{path!r} does not exist. The release's token files are fetched by download.py of "
        "github.com/openai/image-gpt (--dataset cifar10 or imagenet).")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise UserError(f"{path!r} is not a readable .npy array: {e}") from None


def token_source(folder_or_prefix: str, dataset: str | None = None,
                 split: str = "train") -> TokenSource:
  """The release's tokens of `split` ("train", "val" or "test") as a TokenSource.

  `token_source("downloads", "cifar10", "val")` reads downloads/cifar10_vaX.npy and _vaY.npy;
  a prefix works too, as in the release's own code: `token_source("downloads/cifar10",
  split="val")`.
  """
  if split not in SPLIT_TAGS:
    raise UserError(f"split={split!r} is not one of {list(SPLIT_TAGS)}.")
  path = os.fspath(folder_or_prefix)
  if os.path.isdir(path):
    if not dataset:
      raise UserError(f"{path!r} is a folder: name the dataset too (cifar10 or imagenet).")
    prefix = os.path.join(path, dataset)
  else:
    prefix = path
  tag = SPLIT_TAGS[split]
  x_path, y_path = f"{prefix}_{tag}X.npy", f"{prefix}_{tag}Y.npy"
  tokens, onehot = _open_npy(x_path), _open_npy(y_path)
  description = f"{os.path.basename(prefix)} {split} ({x_path})"
  return TokenSource(tokens, onehot, description)


def openai_npy_source(cfg, split: str, side: int):
  folder = require_dir(cfg.path, "openai_npy")
  source = token_source(folder, cfg.name, split)
  if source.image_side != side:
    raise UserError(f"{source.description} holds {source.image_side}x{source.image_side} "
                    f"images but the model reads {side}x{side}.")
  return source
