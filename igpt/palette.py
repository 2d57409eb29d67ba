"""The 9-bit colour palette: k-means centres of RGB pixels in [-1, 1] (spec, "Colour palette").

A palette is a float32 array of shape (k, 3), k = 512 in the paper, stored as a `.npy` file like
OpenAI's `kmeans_centers.npy`. A pixel's token is the index of its nearest centre (squared
Euclidean distance in the `x / 127.5 - 1` space); a token decodes to `rint(127.5 * (c + 1))`.

- `fit_palette(pixels, k)`: weighted k-means (k-means++ init + Lloyd) on the distinct colours.
- `encode(images, centers)` / `decode(tokens, centers)`: images <-> token sequences, raster order.
- `load_or_fit(vocab_size, given, pixels=...)`: the one entry that gives a model its palette
  (a file, an array, or a fit), checked against the model's tokens.
- `save_palette(path, centers)` / `load_palette(path)`: the `.npy` format, validated on load.

The nearest centre of a pixel depends only on its 24-bit colour, so `encode` keeps a lookup
table per palette (2**24 int16 entries, filled lazily with the colours it has seen): a batch
costs a gather, and a whole CIFAR-10 split is encoded in seconds.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import os
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from igpt import fileio, storage
from igpt.errors import MissingFileError, UserError

MAX_PALETTE_SIZE = 32767  # tokens live in an int16 lookup table
_NUM_COLOURS = 1 << 24
_ASSIGN_CHUNK = 65536  # points per call of the jitted nearest-centre kernel
_SAMPLE_BLOCK = 1024  # k-means++ samples a block of points, then a point inside it


# ---------------------------------------------------------------------------------------------
# Colour helpers


def _pack(rgb: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> int32 [...] colour codes r << 16 | g << 8 | b."""
  # Channel by channel: converting the whole [..., 3] array first is ~15x slower.
  codes = rgb[..., 0].astype(np.int32) << 16
  codes |= rgb[..., 1].astype(np.int32) << 8
  codes |= rgb[..., 2]
  return codes


def _unpack_unit(codes: np.ndarray) -> np.ndarray:
  """int colour codes [n] -> float32 [3, n] in [-1, 1] (channel-major: the kernels want it)."""
  rgb = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255]).astype(np.float32)
  return rgb / np.float32(127.5) - np.float32(1.0)


def check_palette(centers, what: str = "centers") -> np.ndarray:
  """`centers` as float32 (k, 3) in [-1, 1]; a UserError naming `what` otherwise."""
  centers = np.asarray(centers)
  if centers.ndim != 2 or centers.shape[1] != 3 or not 1 <= centers.shape[0] <= MAX_PALETTE_SIZE:
    raise UserError(f"{what} must have shape (k, 3) with 1 <= k <= {MAX_PALETTE_SIZE}; "
                    f"got shape {centers.shape}.")
  if not np.issubdtype(centers.dtype, np.floating):
    raise UserError(f"{what} must be floating point in [-1, 1]; got dtype {centers.dtype}.")
  if not np.all(np.isfinite(centers)):
    raise UserError(f"{what} contains NaN or infinite values.")
  lo, hi = float(centers.min()), float(centers.max())
  if lo < -1 - 1e-5 or hi > 1 + 1e-5:
    raise UserError(f"{what} must lie in [-1, 1] (the x / 127.5 - 1 space); got values in "
                    f"[{lo:.4g}, {hi:.4g}]. Did you pass 0..255 colours?")
  return np.clip(centers, -1, 1).astype(np.float32)


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise UserError(f"images must be uint8 RGB in 0..255; got dtype {images.dtype}.")
  if images.ndim < 3 or images.shape[-1] != 3:
    raise UserError(f"images must have shape [..., H, W, 3]; got {images.shape}.")
  return images


# ---------------------------------------------------------------------------------------------
# Nearest centre


@functools.lru_cache(maxsize=1)
def _cpu():
  """The host CPU device. Palette kernels run there, beside the data pipeline, not on the
  accelerator that trains: this keeps accelerator memory free and fits bit-identical on
  every machine. Local, not global device 0: on process 1 of a multi-host job that one
  belongs to process 0."""
  return jax.local_devices(backend="cpu")[0]


@jax.jit
def _nearest_kernel(points_t, centers):
  """Index of the nearest centre for each column of points_t [3, n] (first index on ties).

  A loop over centres keeping a running (best distance, index) per point: every step is a
  fused, vectorised pass over the points. It is ~30x faster on CPU than building the [n, k]
  distance matrix and reducing it with argmin.
  """
  sq = jnp.sum(centers * centers, axis=1)
  n = points_t.shape[1]

  def body(j, state):
    best, idx = state
    c = centers[j]
    # |x - c|^2 - |x|^2: the |x|^2 term is the same for every centre.
    d = sq[j] - 2 * (c[0] * points_t[0] + c[1] * points_t[1] + c[2] * points_t[2])
    better = d < best
    return jnp.where(better, d, best), jnp.where(better, j, idx)

  init = (jnp.full((n,), jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
  return jax.lax.fori_loop(0, centers.shape[0], body, init, unroll=8)[1]


def _nearest(points_t: np.ndarray, centers: np.ndarray) -> np.ndarray:
  """Nearest-centre index int32 [n] for points_t float32 [3, n], in fixed-size chunks.

  Chunks are padded to a power of two (at most `_ASSIGN_CHUNK`) so the kernel compiles
  for a handful of shapes only.
  """
  n = points_t.shape[1]
  out = np.empty((n,), np.int32)
  centers = jax.device_put(np.asarray(centers, np.float32), _cpu())
  chunk = min(_ASSIGN_CHUNK, 1 << max(8, math.ceil(math.log2(max(n, 1)))))
  pending = []
  for start in range(0, n, chunk):
    part = points_t[:, start:start + chunk]
    if part.shape[1] < chunk:
      part = np.pad(part, ((0, 0), (0, chunk - part.shape[1])))
    part = jax.device_put(part, _cpu())
    pending.append((start, _nearest_kernel(part, centers)))  # async dispatch overlaps chunks
  for start, idx in pending:
    stop = min(start + chunk, n)
    out[start:stop] = np.asarray(idx)[:stop - start]
  return out


class _LookupTables:
  """Per-palette colour -> token tables (int16 [2**24], -1 = not computed yet), LRU of 2.

  Filling an entry is idempotent, so concurrent encoders (e.g. a prefetch thread) may race
  on a table without harm; the lock only guards the dictionary.
  """

  def __init__(self, capacity: int = 2):
    self._tables = collections.OrderedDict()
    self._capacity = capacity
    self._lock = threading.Lock()

  def get(self, centers: np.ndarray) -> np.ndarray:
    key = hashlib.blake2b(centers.tobytes() + str(centers.shape).encode()).hexdigest()
    with self._lock:
      if key in self._tables:
        self._tables.move_to_end(key)
        return self._tables[key]
      table = np.full((_NUM_COLOURS,), -1, np.int16)
      self._tables[key] = table
      while len(self._tables) > self._capacity:
        self._tables.popitem(last=False)
      return table


_TABLES = _LookupTables()


def encode(images, centers) -> np.ndarray:
  """Tokens int32 [..., H*W] of uint8 images [..., H, W, 3]: nearest centre, raster order.

  Images are not resized here: the readers (`igpt.readers`) read them at the model's side.
  """
  images = _check_images(images)
  centers = check_palette(centers)
  codes = _pack(images).reshape(-1)
  table = _TABLES.get(centers)
  tokens = np.take(table, codes)
  missing = tokens < 0
  if missing.any():
    # A presence map finds the new distinct colours in O(pixels), cheaper than np.unique's sort.
    seen = np.zeros((_NUM_COLOURS,), bool)
    seen[codes[missing]] = True
    new = np.flatnonzero(seen).astype(np.int32)
    table[new] = _nearest(_unpack_unit(new), centers)
    tokens = np.take(table, codes)
  height, width = images.shape[-3:-1]
  return tokens.astype(np.int32).reshape(images.shape[:-3] + (height * width,))


def centers_to_rgb(centers) -> np.ndarray:
  """uint8 [k, 3] colours of the centres: rint(127.5 * (c + 1))."""
  centers = check_palette(centers)
  return np.clip(np.rint(127.5 * (centers.astype(np.float64) + 1)), 0, 255).astype(np.uint8)


def decode(tokens, centers, side: int | None = None) -> np.ndarray:
  """uint8 images [..., side, side, 3] of tokens [..., L]; side defaults to sqrt(L)."""
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim < 1:
    raise UserError(f"tokens must be an integer array [..., L]; got {tokens.dtype} "
                    f"{tokens.shape}.")
  colours = centers_to_rgb(centers)
  length = tokens.shape[-1]
  if side is None:
    side = math.isqrt(length)
  if side * side != length:
    raise UserError(f"{length} tokens per image is not side*side for side={side}.")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= len(colours)):
    raise UserError(f"tokens must lie in [0, {len(colours)}) for a palette of "
                    f"{len(colours)} colours; got [{tokens.min()}, {tokens.max()}].")
  return colours[tokens].reshape(tokens.shape[:-1] + (side, side, 3))


def quantize(images, centers) -> np.ndarray:
  """Images with every pixel replaced by its nearest palette colour (= decode(encode(x)))."""
  images = _check_images(images)
  return decode(encode(images, centers), centers, side=None).reshape(images.shape)


# ---------------------------------------------------------------------------------------------
# Fitting


def _sample_index(key, p):
  """One index drawn with probability proportional to p [blocks * _SAMPLE_BLOCK].

  Two-level inverse CDF (a block by its total, then a point in it): a cumsum over a million
  entries is ~20x slower on CPU than the block sums. Zero-probability points are never drawn.
  """
  kb, kp = jax.random.split(key)
  p = p.reshape(-1, _SAMPLE_BLOCK)
  totals = p.sum(axis=1)
  cum = jnp.cumsum(totals)
  b = jnp.minimum(jnp.sum(cum <= jax.random.uniform(kb) * cum[-1]), p.shape[0] - 1)
  b = jnp.where(totals[b] > 0, b, jnp.argmax(totals))  # guards round-off at the top end
  row = jax.lax.dynamic_index_in_dim(p, b, 0, keepdims=False)
  cum = jnp.cumsum(row)
  i = jnp.minimum(jnp.sum(cum <= jax.random.uniform(kp) * cum[-1]), _SAMPLE_BLOCK - 1)
  i = jnp.where(row[i] > 0, i, jnp.argmax(row))
  return b * _SAMPLE_BLOCK + i


@functools.partial(jax.jit, static_argnames="k")
def _kmeans_pp(points_t, weights, key, k: int):
  """k-means++ seeding on weighted points [3, n] (n a multiple of _SAMPLE_BLOCK): indices [k]."""
  keys = jax.random.split(key, k)

  def dist_to(i):
    c = jax.lax.dynamic_index_in_dim(points_t, i, 1, keepdims=False)
    return ((points_t[0] - c[0]) ** 2 + (points_t[1] - c[1]) ** 2 + (points_t[2] - c[2]) ** 2)

  first = _sample_index(keys[0], weights)
  chosen = jnp.zeros((k,), jnp.int32).at[0].set(first)

  def body(j, state):
    min_d2, chosen = state
    i = _sample_index(keys[j], weights * min_d2)
    return jnp.minimum(min_d2, dist_to(i)), chosen.at[j].set(i)

  return jax.lax.fori_loop(1, k, body, (dist_to(first), chosen))[1]


def _distinct_colours(pixels: np.ndarray):
  """Distinct colour codes (sorted) and how often each occurs."""
  counts = np.bincount(_pack(pixels), minlength=_NUM_COLOURS)
  codes = np.flatnonzero(counts).astype(np.int32)
  return codes, counts[codes].astype(np.float64)


def _lloyd(points_t, weights, centers, num_iters: int, tol: float):
  """Weighted Lloyd iterations; an emptied cluster restarts at the worst-served point."""
  k = len(centers)
  for _ in range(num_iters):
    assign = _nearest(points_t, centers)
    mass = np.bincount(assign, weights, minlength=k)
    sums = np.stack([np.bincount(assign, weights * points_t[c], minlength=k) for c in range(3)],
                    axis=1)
    new = centers.astype(np.float64).copy()
    full = mass > 0
    new[full] = sums[full] / mass[full, None]
    empty = np.flatnonzero(~full)
    if len(empty):
      # The points that cost the most (weight * squared distance) become the new centres.
      cost = weights * np.sum((points_t.T - centers[assign]) ** 2, axis=1)
      new[empty] = points_t[:, np.argsort(-cost, kind="stable")[:len(empty)]].T
    new = np.clip(new, -1, 1).astype(np.float32)
    shift = float(np.max(np.abs(new - centers)))
    centers = new
    if shift <= tol:
      break
  return centers


def fit_palette(pixels, k: int = 512, seed: int = 0, num_iters: int = 50,
                tol: float = 1e-5) -> np.ndarray:
  """Fits a k-colour palette to uint8 RGB pixels [N, 3] (any [..., 3] works).

  Weighted k-means on the distinct colours (identical pixels collapse into one weighted point),
  k-means++ seeding, then up to `num_iters` Lloyd steps, stopping early once no centre moves
  more than `tol`. Deterministic for a given seed. Returns float32 centres (k', 3) in [-1, 1]
  with k' = min(k, number of distinct colours): with no more colours than k, the palette is
  exactly those colours (sorted by their 24-bit code).
  """
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim < 1 or pixels.shape[-1] != 3:
    raise UserError(f"pixels must be uint8 RGB [N, 3]; got {pixels.dtype} {pixels.shape}.")
  if not 1 <= k <= MAX_PALETTE_SIZE:
    raise UserError(f"palette size k={k} must be in [1, {MAX_PALETTE_SIZE}].")
  pixels = pixels.reshape(-1, 3)
  if len(pixels) == 0:
    raise UserError("fit_palette got no pixels.")
  codes, weights = _distinct_colours(pixels)
  points_t = _unpack_unit(codes)
  if len(codes) <= k:
    return np.ascontiguousarray(points_t.T)
  # Pad to whole sampling blocks with zero-weight copies of a real point (never drawn).
  pad = -len(codes) % _SAMPLE_BLOCK
  padded_t = np.pad(points_t, ((0, 0), (0, pad)), mode="edge")
  padded_w = np.pad(weights, (0, pad)).astype(np.float32)
  padded_t, padded_w = jax.device_put((padded_t, padded_w), _cpu())
  with jax.default_device(_cpu()):
    key = jax.random.key(seed)
  chosen = np.asarray(_kmeans_pp(padded_t, padded_w, key, k))
  centers = np.ascontiguousarray(points_t[:, chosen].T)
  return _lloyd(points_t, weights, centers, num_iters, tol)


# ---------------------------------------------------------------------------------------------
# Files


def load_or_fit(vocab_size: int, given=None, *, pixels: Callable[[], np.ndarray] | None = None,
                k: int = 512, seed: int = 0, what: str = "the palette") -> np.ndarray:
  """The palette a model of `vocab_size` tokens reads its pixels with: float32 [k', 3].

  `given` is a `.npy` path (a run's palette.npy, OpenAI's kmeans_centers.npy) or an array (a
  transformers folder's `clusters`); without it, a `k`-colour palette is fitted on `pixels()`
  (deterministic in `seed`). Either way it is checked here, the one place that holds a palette
  against a vocabulary: more colours than tokens could never be predicted.
  """
  if isinstance(given, (str, os.PathLike)) and given:
    what = f"the palette {os.fspath(given)}"
    centers = load_palette(given)
  elif given is not None and not isinstance(given, (str, os.PathLike)):
    centers = check_palette(given, what)
  elif pixels is not None:
    centers = fit_palette(pixels(), k, seed)
  else:
    raise MissingFileError(f"{what}: no palette file was given and there are no pixels to fit "
                           "one on.")
  if len(centers) > vocab_size:
    raise UserError(f"{what} has {len(centers)} colours but the model has {vocab_size} tokens "
                    "(model.vocab_size); raise vocab_size or use a smaller palette.")
  return centers


def identity(centers) -> dict:
  """What names a palette in a run's records: its colour count and a hash of its values."""
  centers = check_palette(centers)
  return {"colours": len(centers), "sha256": hashlib.sha256(centers.tobytes()).hexdigest()}


def save_palette(path, centers) -> None:
  """Writes centres (k, 3) in [-1, 1] as a float32 `.npy` file, atomically (temp + rename)."""
  centers = check_palette(centers)
  with fileio.atomic_open(path, "wb") as f:
    np.save(f, centers)


def load_palette(path) -> np.ndarray:
  """Reads a palette `.npy` (k, 3) float in [-1, 1] (e.g. OpenAI's kmeans_centers.npy)."""
  path = os.fspath(path)
  if not storage.isfile(path):
    raise MissingFileError(
        f"Palette file {path!r} does not exist. Fit one with igpt.palette.fit_palette and "
        f"save_palette (training does this when data.palette_path is empty), or point "
        f"data.palette_path at an existing kmeans_centers.npy.")
  try:
    with storage.open_read(path) as f:
      centers = np.load(f, allow_pickle=False)
  except storage.StorageError:
    raise
  except Exception as e:  # np.load raises several types for a non-npy or truncated file
    raise UserError(f"Palette file {path!r} is not a readable .npy array: {e}") from e
  try:
    return check_palette(centers, what=f"Palette file {path!r}")
  except ValueError as e:
    raise UserError(f"{e} A palette is a float .npy of shape (k, 3) in [-1, 1].") from None
