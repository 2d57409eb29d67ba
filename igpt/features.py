"""Probe features: the mean-pooled residual stream of chosen layers, cached on disk.

Layer l is the stream after block l (`hidden["h_{l}"]` of `model.apply`, 0-based; negative
indices count from the end). Its feature, as in the paper, is

    f^l = mean over positions of norm(h_l),   norm(x) = x * rsqrt(mean(x^2) + 1e-5)

(iGPT's RMS norm without a gain); pooling "raw" averages h_l itself instead.

    extractor = FeatureExtractor(model_cfg, params, centers, mesh, pooling="norm", ...)
    feats, labels = extractor.features(source, data_key, layers=[4, 8])  # {l: [N, D]}, [N]

One jitted forward per batch gives every requested layer (the blocks after the deepest one
are dead code XLA drops); batches are sharded over the mesh's batch axes. With a cache folder
each (model, data, split, layer, pooling) lands in its own `.npz`, so a later probe of other
layers only computes the missing ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from igpt import fileio, model, pipeline, sharding, trained
from igpt.errors import UserError
from igpt.model import ModelConfig

POOLINGS = ("norm", "raw")


def resolve_layers(spec, num_layers: int) -> list[int]:
  """Sorted distinct block indices from "all", "3", "0,4,-1" or a sequence of ints.

  Negative indices count from the end (-1 = the last block); out of range is a ValueError.
  """
  if isinstance(spec, str):
    text = spec.strip().lower()
    if text == "all":
      return list(range(num_layers))
    parts = [p for p in re.split(r"[,\s]+", text.strip("()[]")) if p]
    try:
      spec = [int(p) for p in parts]
    except ValueError:
      raise UserError(f"layers={spec!r}: use 'all' or block indices like '0,4,-1'.") from None
  elif isinstance(spec, int):
    spec = [spec]
  layers = set()
  for i in spec:
    if not -num_layers <= int(i) < num_layers:
      raise UserError(f"layer {i} is out of range: the model has {num_layers} blocks "
                      f"(indices 0..{num_layers - 1}, or -{num_layers}..-1 from the end).")
    layers.add(int(i) % num_layers)
  if not layers:
    raise UserError("no layers given: use 'all' or block indices like '0,4,-1'.")
  return sorted(layers)


def pool(h_BxLxD, pooling: str):
  """Mean over positions of the normalised (`norm`) or raw (`raw`) stream: float32 [B, D]."""
  h_BxLxD = h_BxLxD.astype(jnp.float32)
  if pooling == "norm":
    h_BxLxD = h_BxLxD * jax.lax.rsqrt(jnp.mean(h_BxLxD**2, axis=-1, keepdims=True)
                                      + model.NORM_EPS)
  elif pooling != "raw":
    raise UserError(f"pooling={pooling!r}: use one of {list(POOLINGS)}.")
  return h_BxLxD.mean(axis=1)


@functools.lru_cache(maxsize=16)
def make_feature_fn(model_cfg: ModelConfig, layers: tuple[int, ...], pooling: str, mesh, rules):
  """Jitted `fn(params, tokens_BxL) -> float32 [B, len(layers), D]`, batch-sharded.

  Cached, so the splits of a dataset and a same-shape control model share one compile.
  """
  names = [f"h_{l}" for l in layers]

  def fn(params, tokens_BxL):
    # Linen's logical constraints need the mesh and the rules while tracing.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      _, hidden = model.apply(model_cfg, params, tokens_BxL)
      return jnp.stack([pool(hidden[n], pooling) for n in names], axis=1)

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
               identity: str = ""):
    if pooling not in POOLINGS:
      raise UserError(f"pooling={pooling!r}: use one of {list(POOLINGS)}.")
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

  def _cache_path(self, data_key: dict, layer: int) -> str:
    key = json.dumps({"model": self.model_key, "data": data_key, "layer": layer,
                      "pooling": self.pooling}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:20]
    return os.path.join(self.cache_dir, f"{data_key.get('split', 'data')}-l{layer}-{digest}.npz")

  def compute(self, source, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Runs the model over `source`: (float32 [N, len(layers), D], int32 labels [N])."""
    fn = make_feature_fn(self.model_cfg, tuple(layers), self.pooling, self.mesh, self.rules)
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
        path = self._cache_path(data_key, layer)
        if os.path.isfile(path):
          with np.load(path) as f:
            out[layer], labels = f["features"], f["labels"]
          todo.remove(layer)
          self.cache_hits += 1
    if todo:
      feats_NxKxD, labels = self.compute(source, todo)
      for k, layer in enumerate(todo):
        out[layer] = feats_NxKxD[:, k]
        if self.cache_dir and jax.process_index() == 0:
          self._save(self._cache_path(data_key, layer), out[layer], labels)
          self.cache_misses += 1
    return out, labels

  def _save(self, path: str, feats_NxD: np.ndarray, labels_N: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with fileio.atomic_open(path, "wb") as f:  # a killed run leaves no half-written cache
      np.savez(f, features=feats_NxD, labels=labels_N)
