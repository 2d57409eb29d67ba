"""Probe features: the mean-pooled residual stream of chosen layers, cached on disk.

Layer l is the stream after block l (`hidden["h_{l}"]` of `model.apply`, 0-based; negative
indices count from the end). Its feature, as in the paper, is

    f^l = mean over positions of norm(h_l),   norm(x) = x * rsqrt(mean(x^2) + 1e-5)

(iGPT's RMS norm without a gain); pooling "raw" averages h_l itself instead. With
`pool_grid=g` > 1 the image is cut into g x g blocks of positions and the feature is the
block means side by side ([g*g*D], row-major blocks): some of where things are survives.

    extractor = FeatureExtractor(model_cfg, params, centers, mesh, pooling="norm", ...)
    feats, labels = extractor.features(source, data_key, layers=[4, 8])  # {l: [N, D]}, [N]

One jitted forward per batch gives every requested layer (the blocks after the deepest one
are dead code XLA drops); batches are sharded over the mesh's batch axes. With a cache folder
each (model, data, split, layer, pooling) lands in its own `.npz`, so a later probe of other
layers only computes the missing ones. A cache file is trusted only if it opens and holds this
entry's key and arrays of the expected shapes; any other file (cut off, overwritten, from an
older version) is recomputed with a warning naming it and the reason.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
import zipfile
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from igpt import config as config_lib
from igpt import fileio, model, pipeline, sharding, storage, trained
from igpt.errors import UserError
from igpt.model import ModelConfig

POOLINGS = config_lib.PROBE_POOLINGS
# What np.load raises on a damaged file: a cut-off or empty one, random bytes, a bad zip member.
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def resolve_layers(spec, num_layers: int, field: str = "layers") -> list[int]:
  """Sorted distinct block indices from "all", "3", "0,4,-1" or a sequence of ints.

  Negative indices count from the end (-1 = the last block); out of range is a UserError
  naming the config `field` the indices came from.
  """
  if isinstance(spec, str):
    text = spec.strip().lower()
    if text == "all":
      return list(range(num_layers))
    parts = [p for p in re.split(r"[,\s]+", text.strip("()[]")) if p]
    try:
      spec = [int(p) for p in parts]
    except ValueError:
      raise UserError(f"{field}={spec!r}: use 'all' or block indices like '0,4,-1'.") from None
  elif isinstance(spec, int):
    spec = [spec]
  layers = set()
  for i in spec:
    if not -num_layers <= int(i) < num_layers:
      raise UserError(f"{field}: layer {i} is out of range: the model has {num_layers} blocks "
                      f"(indices 0..{num_layers - 1}, or -{num_layers}..-1 from the end).")
    layers.add(int(i) % num_layers)
  if not layers:
    raise UserError(f"{field}: no layers given: use 'all' or block indices like '0,4,-1'.")
  return sorted(layers)


def check_pool_grid(pool_grid: int, image_side: int) -> int:
  """`pool_grid` as an int, if it cuts the image into equal blocks."""
  if isinstance(pool_grid, bool) or int(pool_grid) != pool_grid or pool_grid < 1 or (
      image_side % int(pool_grid)):
    raise UserError(f"pool_grid={pool_grid!r} must be a positive divisor of the image side "
                    f"{image_side} (1 = the mean over every position).")
  return int(pool_grid)


def pool(h_BxLxD, pooling: str, pool_grid: int = 1):
  """Mean over positions of the normalised (`norm`) or raw (`raw`) stream: float32 [B, D];
  with `pool_grid` g > 1, the means of g x g image blocks: float32 [B, g*g*D]."""
  h_BxLxD = h_BxLxD.astype(jnp.float32)
  if pooling == "norm":
    h_BxLxD = h_BxLxD * jax.lax.rsqrt(jnp.mean(h_BxLxD**2, axis=-1, keepdims=True)
                                      + model.NORM_EPS)
  elif pooling != "raw":
    raise UserError(f"pooling={pooling!r}: use one of {list(POOLINGS)}.")
  if pool_grid == 1:
    return h_BxLxD.mean(axis=1)
  batch, length, width = h_BxLxD.shape
  side = math.isqrt(length)
  cell = side // pool_grid
  blocks = h_BxLxD.reshape(batch, pool_grid, cell, pool_grid, cell, width).mean(axis=(2, 4))
  return blocks.reshape(batch, pool_grid * pool_grid * width)


@functools.lru_cache(maxsize=16)
def make_feature_fn(model_cfg: ModelConfig, layers: tuple[int, ...], pooling: str, mesh, rules,
                    pool_grid: int = 1):
  """Jitted `fn(params, tokens_BxL) -> float32 [B, len(layers), F]` (F = pool_grid² D),
  batch-sharded.

  Cached, so the splits of a dataset and a same-shape control model share one compile.
  """
  names = [f"h_{l}" for l in layers]

  def fn(params, tokens_BxL):
    # Linen's logical constraints need the mesh and the rules while tracing.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      _, hidden = model.apply(model_cfg, params, tokens_BxL)
      return jnp.stack([pool(hidden[n], pooling, pool_grid) for n in names], axis=1)

  batch = sharding.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(_param_shardings(model_cfg, mesh, rules), batch),
                 out_shardings=batch)


def _param_shardings(model_cfg: ModelConfig, mesh, rules):
  return jax.tree.map(lambda s: s.sharding, trained.abstract_params(model_cfg, mesh, rules))


def place_params(model_cfg: ModelConfig, params, mesh, rules):
  """`params` laid out on `mesh` by the logical-axis `rules`: (params, their shardings)."""
  shardings = _param_shardings(model_cfg, mesh, rules)
  return jax.device_put(params, shardings), shardings


@jax.jit
def _leaf_stats(params):
  return [jnp.stack([x.sum(), (x * x).sum()]) for x in jax.tree.leaves(params)]


def fingerprint(params) -> str:
  """A short hash of the params' values (per-leaf sums and norms), for cache keys: a run
  retrained in the same folder must not reuse stale features."""
  values = np.asarray(jax.device_get(_leaf_stats(params)), np.float64)
  return hashlib.sha1(np.round(values, 4).tobytes()).hexdigest()[:16]


def _to_host(x) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class FeatureExtractor:
  """Pooled features of one model (params placed on `mesh`) for any labelled source."""

  def __init__(self, model_cfg: ModelConfig, params, centers, mesh, *, rules=(),
               pooling: str = "norm", batch_size: int = 64, cache_dir: str | None = None,
               identity: str = "", pool_grid: int = 1):
    if pooling not in POOLINGS:
      raise UserError(f"pooling={pooling!r}: use one of {list(POOLINGS)}.")
    self.pool_grid = check_pool_grid(pool_grid, math.isqrt(model_cfg.seq_len))
    self.width = self.pool_grid ** 2 * model_cfg.d_model  # of one layer's feature
    dp = sharding.data_parallel_size(mesh)
    if batch_size < 1 or batch_size % (dp * jax.process_count()):
      raise UserError(f"batch_size={batch_size} must be a positive multiple of the "
                      f"data-parallel size {dp} (and of the {jax.process_count()} processes).")
    self.model_cfg, self.mesh, self.rules = model_cfg, mesh, tuple(rules)
    self.params, self.param_shardings = place_params(model_cfg, params, mesh, self.rules)
    self.centers = None if centers is None else np.asarray(centers, np.float32)
    self.pooling, self.batch_size, self.cache_dir = pooling, batch_size, cache_dir
    palette_hash = "" if centers is None else hashlib.sha1(self.centers.tobytes()).hexdigest()
    self.model_key = {"identity": identity, "params": fingerprint(self.params),
                      "palette": palette_hash[:16], "model": repr(model_cfg)}
    self.cache_hits, self.cache_misses = 0, 0  # layers read from / written to the cache

  def _cache_entry(self, data_key: dict, layer: int) -> tuple[str, str]:
    """(file, key digest) of one layer's features; the digest is also stored in the file."""
    entry = {"model": self.model_key, "data": data_key, "layer": layer,
             "pooling": self.pooling}
    if self.pool_grid != 1:  # absent at 1: the caches written before the option stay valid
      entry["pool_grid"] = self.pool_grid
    key = json.dumps(entry, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()
    name = f"{data_key.get('split', 'data')}-l{layer}-{digest[:20]}.npz"
    return storage.join(self.cache_dir, name), digest

  def _read_cache(self, path: str, digest: str, rows: int):
    """(features [rows, D], labels [rows]) from a cache file; None if it is absent, or (with a
    warning) when it cannot be trusted."""
    if not storage.isfile(path):
      return None
    try:
      arrays = _load_npz(path)
    except _UNREADABLE as e:
      problem = f"unreadable ({type(e).__name__}: {e})"
    else:
      problem = _cache_problem(arrays, digest, rows, self.width)
    if problem:
      logging.warning("Feature cache %s cannot be used: %s; recomputing it.", path, problem)
      return None
    return arrays["features"], arrays["labels"]

  def compute(self, source, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Runs the model over `source`: (float32 [N, len(layers), F], int32 labels [N])."""
    fn = make_feature_fn(self.model_cfg, tuple(layers), self.pooling, self.mesh, self.rules,
                         self.pool_grid)
    feats, labels = [], []
    batches = pipeline.eval_batches(source, self.centers, self.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    for batch in batches:
      g = sharding.global_batch(batch, self.mesh)
      keep = _to_host(g["mask"]) > 0
      feats.append(_to_host(fn(self.params, g["tokens"]))[keep])
      labels.append(_to_host(g["label"])[keep])
    return np.concatenate(feats), np.concatenate(labels).astype(np.int32)

  def features(self, source, data_key: dict, layers: Sequence[int]):
    """({layer: float32 [N, D]}, int32 labels [N]) of `source`, from the cache where present.

    `data_key` (JSON-able) names the data and split, e.g. the data config plus the split.
    """
    out, labels = {}, None
    todo = list(layers)
    if self.cache_dir:
      for layer in layers:
        cached = self._read_cache(*self._cache_entry(data_key, layer), len(source))
        if cached is not None:
          out[layer], labels = cached
          todo.remove(layer)
          self.cache_hits += 1
    if todo:
      feats_NxKxD, labels = self.compute(source, todo)
      for k, layer in enumerate(todo):
        out[layer] = feats_NxKxD[:, k]
        if self.cache_dir and jax.process_index() == 0:
          self._save(*self._cache_entry(data_key, layer), out[layer], labels)
          self.cache_misses += 1
    return out, labels

  def _save(self, path: str, digest: str, feats_NxD: np.ndarray, labels_N: np.ndarray) -> None:
    with fileio.atomic_open(path, "wb") as f:  # a killed run leaves no half-written cache
      np.savez(f, features=feats_NxD, labels=labels_N, key=np.array(digest))


def _load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an `.npz` file, read in full (so that zip's CRC check runs on each)."""
  # np.load would take other bytes for a pickle or a bare .npy, and say so misleadingly.
  data = storage.read_bytes(path)
  magic = data[:4]
  if magic != b"PK\x03\x04":
    raise ValueError("the file is empty" if not magic else "not an .npz (zip) archive")
  with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
    return {name: loaded[name] for name in loaded.files}


def _cache_problem(arrays: dict, digest: str, rows: int, width: int) -> str | None:
  """Why the arrays of a cache file are not this entry's features, or None."""
  for name in ("features", "labels", "key"):
    if name not in arrays:
      return f"it has no {name!r} array (it holds {sorted(arrays)})"
  feats, labels, key = arrays["features"], arrays["labels"], arrays["key"]
  if key.shape != () or str(key) != digest:
    return "its stored key is not this entry's (a copied or renamed file?)"
  if feats.dtype != np.float32 or feats.shape != (rows, width):
    return f"features are {feats.dtype} {feats.shape}, expected float32 {(rows, width)}"
  if labels.dtype != np.int32 or labels.shape != (rows,):
    return f"labels are {labels.dtype} {labels.shape}, expected int32 {(rows,)}"
  return None
