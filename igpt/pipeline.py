"""The input pipeline: pixels for fitting the palette, tokens, and deterministic batches.

Sources come from `igpt.readers` (images) or hold tokens already (`get_tokens`). Batches are
{'tokens': int32 [b, side*side], 'label': int32 [b]} (label -1 when unlabelled); evaluation
batches add 'mask'. `batch_at(source, centers, step, ...)` is a pure function of (seed, step):
the global batch `step` of a stream of per-epoch permutations, so resuming at a step needs no
iterator state; `augment=True` crops and flips its images first (CIFAR augmentation).
`sharding.global_batch` turns a process's share into global arrays.
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from igpt import palette as palette_lib
from igpt import readers
from igpt.errors import UserError


def sample_pixels(source: readers.ImageSource, num_pixels: int, seed: int) -> np.ndarray:
  """uint8 [num_pixels, 3] pixels drawn at random from `source` (for fitting the palette).

  Reads a random subset of images (about 4x as many pixels as asked for, so pixels come from
  many images), then draws pixels from them without replacement when there are enough.
  """
  if num_pixels < 1:
    raise UserError(f"num_pixels must be positive; got {num_pixels}.")
  if len(source) == 0:
    raise UserError(f"{source.description} has no images to sample pixels from.")
  rng = np.random.default_rng(seed)
  per_image = source.image_side ** 2
  num_images = min(len(source), max(1, -(-4 * num_pixels // per_image)))
  chosen = np.sort(rng.choice(len(source), size=num_images, replace=False))
  pool = np.concatenate([source.get(chosen[i:i + 1024])[0].reshape(-1, 3)
                         for i in range(0, len(chosen), 1024)])
  picks = rng.choice(len(pool), size=num_pixels, replace=num_pixels > len(pool))
  return pool[picks]


@functools.lru_cache(maxsize=8)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  order = np.random.default_rng((seed, epoch)).permutation(n)
  order.flags.writeable = False
  return order


def global_batch_indices(num_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Source indices of global batch `step`: positions step*B .. step*B+B-1 of the stream
  perm(seed, 0) ++ perm(seed, 1) ++ ..., a fresh permutation per epoch (a batch may span two)."""
  if num_examples < 1:
    raise UserError("cannot batch an empty source.")
  positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = _epoch_permutation(num_examples, seed, int(epoch))[offsets[mask]]
  return out


def _local_share(batch_size: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} must be in [0, process_count="
                    f"{process_count}).")
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch_size={batch_size} must be a positive multiple of "
                    f"process_count={process_count}.")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _labels(labels, n: int) -> np.ndarray:
  return np.full((n,), -1, np.int32) if labels is None else np.asarray(labels, np.int32)


def token_batch(source: readers.ImageSource, centers, indices: np.ndarray) -> dict:
  """{'tokens': int32 [n, side*side], 'label': int32 [n] (-1: unlabelled)} for `indices`.

  A source that already holds tokens (it has `get_tokens`, e.g. a pre-tokenised dataset) is
  read as is; image sources are encoded with the palette `centers`.
  """
  if hasattr(source, "get_tokens"):
    tokens, labels = source.get_tokens(indices)
  else:
    images, labels = source.get(indices)
    tokens = palette_lib.encode(images, centers)
  return {"tokens": np.asarray(tokens, np.int32), "label": _labels(labels, len(indices))}


def batch_indices_at(num_examples: int, step: int, batch_size: int, seed: int,
                     process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Source indices of this process's share of global training batch `step`."""
  if step < 0:
    raise UserError(f"step must be >= 0; got {step}.")
  share = _local_share(batch_size, process_index, process_count)
  return global_batch_indices(num_examples, step, batch_size, seed)[share]


def batch_at(source: readers.ImageSource, centers, step: int, batch_size: int, seed: int,
             process_index: int = 0, process_count: int = 1, augment: bool = False) -> dict:
  """This process's share of global training batch `step` (a pure function of seed and step).

  Returns `token_batch` of it: {'tokens': int32 [batch_size / process_count, S*S],
  'label': int32 [...]}; the shares of processes 0..count-1 concatenate to the global batch.
  `augment`: the images go through `augment_images` before they are tokenised, with crops
  and flips drawn from (seed, step, process), so a resumed run repeats them.
  """
  if not augment:
    indices = batch_indices_at(len(source), step, batch_size, seed, process_index,
                               process_count)
    return token_batch(source, centers, indices)
  batch = image_batch_at(source, step, batch_size, seed, process_index, process_count)
  rng = np.random.default_rng((seed, step, process_index))
  images = augment_images(batch["image"], rng)
  return {"tokens": palette_lib.encode(images, centers).astype(np.int32),
          "label": batch["label"]}


def augment_images(images_BxSxSx3: np.ndarray, rng: np.random.Generator,
                   pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: reflection-pad by `pad` pixels, random crop back, random flip."""
  b, s = images_BxSxSx3.shape[:2]
  padded = np.pad(images_BxSxSx3, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  tops, lefts = rng.integers(0, 2 * pad + 1, b), rng.integers(0, 2 * pad + 1, b)
  flips = rng.random(b) < 0.5
  out = np.empty_like(images_BxSxSx3)
  for i in range(b):
    crop = padded[i, tops[i]:tops[i] + s, lefts[i]:lefts[i] + s]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def image_batch_at(source: readers.ImageSource, step: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> dict:
  """The images of `batch_at`'s batch: {'image': uint8 [b, S, S, 3], 'label': int32 [b]}."""
  indices = batch_indices_at(len(source), step, batch_size, seed, process_index, process_count)
  images, labels = source.get(indices)
  return {"image": images, "label": _labels(labels, len(indices))}


def eval_batches(source: readers.ImageSource, centers, batch_size: int,
                 num_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Fixed, unshuffled evaluation batches: batch i holds examples i*B .. i*B+B-1, in order.

  Yields min(num_batches, ceil(len/B)) batches (num_batches None or <= 0: the whole source).
  Every batch has the full shape: the last one is padded by wrapping to the start, and its
  'mask' (float32 [b], 1 = real example, 0 = padding) says which rows count.
  """
  share = _local_share(batch_size, process_index, process_count)
  n = len(source)
  if n == 0:
    raise UserError(f"{source.description} is empty: nothing to evaluate.")
  total = -(-n // batch_size)
  if num_batches is not None and num_batches > 0:
    total = min(total, num_batches)

  def batches():  # a generator inside, so bad arguments raise at the call, not at next()
    for b in range(total):
      positions = b * batch_size + np.arange(batch_size, dtype=np.int64)[share]
      batch = token_batch(source, centers, positions % n)
      batch["mask"] = (positions < n).astype(np.float32)
      yield batch

  return batches()
