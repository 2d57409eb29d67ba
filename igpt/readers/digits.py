"""The "digits" source: scikit-learn's embedded 8x8 digits (1797 images), no network needed.

The train/test split is fixed by DIGITS_SEED: DIGITS_TEST_EXAMPLES images are the test split.
"""

from __future__ import annotations

import functools

import numpy as np

from igpt.errors import UserError
from igpt.readers.base import ArraySource, ImageSource

DIGITS_SEED = 1797  # the digits train/test split
DIGITS_TEST_EXAMPLES = 360  # 20% of 1797


@functools.lru_cache(maxsize=1)
def _load_digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  # Values are 0..16 (4x4 block counts of the original 32x32 bitmaps); spread over 0..255.
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images, digits.target.astype(np.int32)


def digits_source(cfg, split: str, side: int) -> ImageSource:
  del cfg
  images, labels = _load_digits()
  order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
  if split == "test":
    chosen = np.sort(order[:DIGITS_TEST_EXAMPLES])
  elif split == "train":
    chosen = np.sort(order[DIGITS_TEST_EXAMPLES:])
  else:
    raise UserError(f"The digits source has splits 'train' and 'test'; got {split!r}.")
  return ArraySource(images[chosen], labels[chosen], side, f"sklearn digits [{split}]", 10)
