"""OpenAI's original iGPT release (github.com/openai/image-gpt): its TensorFlow-1 checkpoints.

`load_tf_checkpoint(prefix)`: a TensorFlow-1 checkpoint `.../model.ckpt-1000000` (files
`.index`, `.meta`, `.data-000NN-of-000MM`) -> `(ModelConfig, params)` in our layout. Needs
TensorFlow to read the files: `pip install -e ".[openai]"`. The release's pre-tokenised data is
read by `igpt.readers.openai_npy` (numpy only).

The release's variables (scope `model/`, from `src/model.py` of the release), with n = side**2,
H heads of hd = d / H:

    wte [V, d]   wpe [n, d]   wtet [V, d]   sos [d] (autoregressive models only)   ln_f/g [d]
    h{i}/ln_1/g, h{i}/ln_2/g [d]
    h{i}/attn/{q,k,v}_proj [H, hd, d]     used as einsum("bsf,hef->bhse", x, w)
    h{i}/attn/c_proj [H, hd, d]           used as einsum("bhse,hef->bsf", a, w)
    h{i}/mlp/c_fc/w [d, 4d]   h{i}/mlp/c_proj/w [4d, d]

A checkpoint without `sos` is a BERT-objective model (no SOS shift, no causal mask). Optimiser
slots and step counters are skipped. Everything else must be exactly this set, or loading fails.
A cut-off or damaged `.index` or data shard fails with the file's name (data shards are
checked against the sizes the index gives before any tensor is read).
"""

from __future__ import annotations

import glob
import math
import os
import re
import struct

import numpy as np

from igpt import trees
from igpt.errors import MissingDependencyError, MissingFileError, UserError
from igpt.model import ModelConfig

SCOPE = "model/"
INSTALL_HINT = 'pip install -e ".[openai]"  (or: pip install tensorflow-cpu)'
# Path components of optimiser slot variables (Adam's m and v under the names TF1's
# AdamOptimizer and the BERT-style AdamWeightDecayOptimizer give them).
_SLOT_PARTS = frozenset({"Adam", "Adam_1", "adam_m", "adam_v", "AdamWeightDecayOptimizer",
                         "AdamWeightDecayOptimizer_1"})
_COUNTERS = frozenset({"global_step", "beta1_power", "beta2_power"})
_LAYER_RE = re.compile(r"h(\d+)/")
REDOWNLOAD = "the common result of an interrupted download; download it again"


# ---------------------------------------------------------------------------------------------
# Files


def _strip_suffix(path: str) -> str:
  """The checkpoint prefix of `path`, also when given one of its files."""
  for pattern in (r"\.index$", r"\.meta$", r"\.data-\d+-of-\d+$"):
    stripped = re.sub(pattern, "", path)
    if stripped != path:
      return stripped
  return path


def resolve_prefix(path: str) -> str:
  """Checks that the files of checkpoint `path` exist and returns its prefix.

  `path` is a prefix (`DIR/model.ckpt-1000000`), one of its files, or a folder holding exactly
  one checkpoint. Raises FileNotFoundError naming what is missing.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.index")))
    if len(indexes) != 1:
      raise MissingFileError(
          f"{path!r} is a folder holding {len(indexes)} checkpoints (*.index files): give the "
          "checkpoint prefix, e.g. DIR/model.ckpt-1000000.")
    path = indexes[0]
  prefix = _strip_suffix(path)
  expected = (f"{prefix}.index and {prefix}.data-00000-of-000NN ... (the .meta file is not "
              "needed)")
  if not os.path.isfile(prefix + ".index"):
    raise MissingFileError(f"no TensorFlow checkpoint at prefix {prefix!r}: expected {expected}.")
  shards = glob.glob(glob.escape(prefix) + ".data-*-of-*")
  totals = {int(m.group(1)) for s in shards if (m := re.search(r"-of-(\d+)$", s))}
  if not totals:
    raise MissingFileError(f"{prefix}.index exists but no data shards do: expected {expected}.")
  if len(totals) > 1:
    raise MissingFileError(f"data shards of {prefix!r} disagree on their count: {sorted(totals)}.")
  total = totals.pop()
  for i in range(total):
    _require_shard(shard_path(prefix, i, total))
  return prefix


def shard_path(prefix: str, shard: int, total: int) -> str:
  return f"{prefix}.data-{shard:05d}-of-{total:05d}"


def _require_shard(path: str) -> None:
  if not os.path.isfile(path):
    raise MissingFileError(f"checkpoint shard {path!r} is missing (an interrupted download?).")


def checkpoint_step(prefix: str) -> int | None:
  """The step in a prefix named like `model.ckpt-1000000`, else None."""
  m = re.search(r"-(\d+)$", os.path.basename(_strip_suffix(os.fspath(prefix))))
  return int(m.group(1)) if m else None


def _import_tensorflow():
  try:
    import tensorflow as tf
  except ImportError as e:
    raise MissingDependencyError("reading the original TensorFlow checkpoints needs "
                                 f"TensorFlow, which is not installed: {INSTALL_HINT}") from e
  return tf


# ---------------------------------------------------------------------------------------------
# The index: where each tensor lies in the data shards
#
# TensorFlow's reader tells neither a shard's expected size nor which shard a failed read was
# in (a short read is a bare "Read less bytes than requested"), so the `.index` is read here
# too. It is a LevelDB-format table (uncompressed blocks, prefix-compressed keys) mapping each
# variable name to a BundleEntryProto (shard, offset, size); the empty key holds the header.

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_BYTES = 48  # metaindex and index block handles padded to 40 bytes, then the magic
_BLOCK_TRAILER_BYTES = 5  # compression type, crc32c


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


def _block(buf: bytes, handle: bytes) -> bytes:
  offset, pos = _varint(handle, 0)
  size, _ = _varint(handle, pos)
  if offset + size + _BLOCK_TRAILER_BYTES > len(buf) or buf[offset + size] != 0:
    raise ValueError(f"table block at {offset} runs past the end or is compressed")
  return buf[offset:offset + size]


def _block_entries(block: bytes):
  restarts = struct.unpack("<I", block[-4:])[0]
  end, pos, key = len(block) - 4 - 4 * restarts, 0, b""
  while pos < end:
    shared, pos = _varint(block, pos)
    fresh, pos = _varint(block, pos)
    length, pos = _varint(block, pos)
    key = key[:shared] + block[pos:pos + fresh]
    pos += fresh
    yield key, block[pos:pos + length]
    pos += length


def read_index(path: str) -> tuple[int, dict[str, tuple[int, int, int]]]:
  """(number of shards, {variable: (shard, offset, size)}) from a checkpoint's `.index` file.

  Raises ValueError where the file is not such a table.
  """
  # pylint: disable=g-import-not-at-top
  from google.protobuf.message import DecodeError
  from tensorflow.core.protobuf import tensor_bundle_pb2
  with open(path, "rb") as f:
    buf = f.read()
  if len(buf) < _FOOTER_BYTES or struct.unpack("<Q", buf[-8:])[0] != _TABLE_MAGIC:
    raise ValueError(f"{path!r} has no table footer")
  footer = buf[-_FOOTER_BYTES:]
  num_shards, where = None, {}
  try:
    _, pos = _varint(footer, _varint(footer, 0)[1])  # skips the metaindex handle
    for _, handle in _block_entries(_block(buf, footer[pos:])):
      for key, value in _block_entries(_block(buf, handle)):
        if not key:
          num_shards = tensor_bundle_pb2.BundleHeaderProto.FromString(value).num_shards
          continue
        entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
        where[key.decode("utf-8", "replace")] = (entry.shard_id, entry.offset, entry.size)
  except (IndexError, struct.error, DecodeError) as e:
    raise ValueError(f"{path!r} is not a readable table: {e}") from e
  if num_shards is None:
    raise ValueError(f"{path!r} has no header entry")
  return num_shards, where


def check_shard_sizes(prefix: str, num_shards: int, where) -> None:
  """UserError naming the first data shard shorter than the tensors its index puts there."""
  need = {}
  for shard, offset, size in where.values():
    need[shard] = max(need.get(shard, 0), offset + size)
  for shard, size in sorted(need.items()):
    path = shard_path(prefix, shard, num_shards)
    _require_shard(path)
    have = os.path.getsize(path)
    if have < size:
      raise UserError(f"checkpoint shard {path!r} is cut off: it holds {have} bytes, its index "
                      f"says {size} ({REDOWNLOAD}).")


# ---------------------------------------------------------------------------------------------
# Variable names and shapes


def is_training_state(name: str) -> bool:
  """True for optimiser slots and step counters, which the model does not need."""
  parts = name.split("/")
  return parts[-1] in _COUNTERS or any(p in _SLOT_PARTS for p in parts)


def _block_shapes(d: int, heads: int) -> dict[str, tuple[int, ...]]:
  hd = d // heads
  return {"ln_1/g": (d,), "ln_2/g": (d,),
          "attn/q_proj": (heads, hd, d), "attn/k_proj": (heads, hd, d),
          "attn/v_proj": (heads, hd, d), "attn/c_proj": (heads, hd, d),
          "mlp/c_fc/w": (d, 4 * d), "mlp/c_proj/w": (4 * d, d)}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every variable (names without the `model/` scope) of a release checkpoint of `cfg`."""
  d, v = cfg.d_model, cfg.vocab_size
  shapes = {"wte": (v, d), "wpe": (cfg.seq_len, d), "wtet": (v, d), "ln_f/g": (d,)}
  if cfg.causal:
    shapes["sos"] = (d,)
  for i in range(cfg.num_layers):
    shapes.update({f"h{i}/{k}": s for k, s in _block_shapes(d, cfg.num_heads).items()})
  return shapes


def _shape_of(shapes, name: str, ndim: int) -> tuple[int, ...]:
  if name not in shapes:
    raise UserError(f"missing variable {SCOPE}{name} in the iGPT checkpoint.")
  shape = tuple(shapes[name])
  if len(shape) != ndim:
    raise UserError(f"{SCOPE}{name} has shape {shape}; expected {ndim} dimensions.")
  return shape


def infer_config(shapes) -> ModelConfig:
  """ModelConfig from {name (no scope): shape} of the model variables; UserError if not iGPT."""
  layers = sorted({int(m.group(1)) for name in shapes if (m := _LAYER_RE.match(name))})
  q_names = [f"h{i}/attn/q_proj" for i in layers if f"h{i}/attn/q_proj" in shapes]
  if "wtet" not in shapes and not q_names:
    # GPT-2's release, for one, has model/wte and model/h0/... but fused c_attn weights.
    found = ", ".join(SCOPE + n for n in sorted(shapes)[:6]) or "no variables under model/"
    raise UserError(f"not an iGPT checkpoint: it has neither {SCOPE}wtet nor "
                    f"{SCOPE}h{{i}}/attn/q_proj (found: {found}).")
  v, d = _shape_of(shapes, "wte", 2)
  heads, hd, d_q = _shape_of(shapes, q_names[0] if q_names else "h0/attn/q_proj", 3)
  if d_q != d or heads * hd != d:
    raise UserError(f"{SCOPE}{q_names[0]} has shape {(heads, hd, d_q)}; expected "
                    f"[heads, head_dim, d] with heads * head_dim = d = {d} ({SCOPE}wte is "
                    f"{(v, d)}).")
  n = _shape_of(shapes, "wpe", 2)[0]
  if math.isqrt(n) ** 2 != n:
    raise UserError(f"{SCOPE}wpe has {n} positions, not a square image (side**2).")
  return ModelConfig(num_layers=layers[-1] + 1 if layers else 0, d_model=d, num_heads=heads,
                     seq_len=n, vocab_size=v, causal="sos" in shapes)


def check_variables(cfg: ModelConfig, shapes) -> None:
  """A UserError naming the first missing, unexpected or misshapen variable."""
  want = expected_shapes(cfg)
  diff = trees.leaf_diff(want, shapes)
  if diff.missing:
    raise UserError(f"missing variable {SCOPE}{diff.missing[0]} in the iGPT checkpoint "
                    f"({len(diff.missing)} missing: {[SCOPE + m for m in diff.missing[:4]]}).")
  if diff.unexpected:
    name = diff.unexpected[0]
    raise UserError(f"unexpected variable {SCOPE}{name} {list(shapes[name])} "
                    f"in the iGPT checkpoint ({len(diff.unexpected)} unexpected).")
  if diff.misshapen:
    name = next(n for n in want if n in diff.misshapen)  # the first in the model's order
    raise UserError(
        f"{SCOPE}{name} has shape {tuple(shapes[name])}, expected {want[name]} (inferred d="
        f"{cfg.d_model}, heads={cfg.num_heads}, positions={cfg.seq_len}, vocab="
        f"{cfg.vocab_size}).")


# ---------------------------------------------------------------------------------------------
# Release layout -> ours


def qkv_to_ours(w_HxKxD: np.ndarray) -> np.ndarray:
  """[H, hd, d] as `einsum("bsf,hef->bhse", x, w)` uses it -> our [d, H, hd] ("bld,dhk")."""
  return np.ascontiguousarray(np.transpose(w_HxKxD, (2, 0, 1)))


def params_from_release(cfg: ModelConfig, get) -> dict:
  """Our params pytree; `get(name)` returns the float32 array of a variable (no scope)."""
  params = {"wte": get("wte"), "wpe": get("wpe"), "wtet": get("wtet"),
            "ln_f": {"g": get("ln_f/g")}}
  if cfg.causal:
    params["sos"] = get("sos")
  for i in range(cfg.num_layers):
    b = f"h{i}/"
    params[f"h_{i}"] = {
        "ln_1": {"g": get(b + "ln_1/g")},
        "attn": {"q": qkv_to_ours(get(b + "attn/q_proj")),
                 "k": qkv_to_ours(get(b + "attn/k_proj")),
                 "v": qkv_to_ours(get(b + "attn/v_proj")),
                 # "bhse,hef->bsf" is our "blhk,hkd->bld": same [H, hd, d] layout.
                 "c_proj": get(b + "attn/c_proj")},
        "ln_2": {"g": get(b + "ln_2/g")},
        "mlp": {"c_fc": get(b + "mlp/c_fc/w"), "c_proj": get(b + "mlp/c_proj/w")},
    }
  return params


def _model_variables(shape_map: dict, dtype_map: dict) -> dict[str, tuple[int, ...]]:
  """{name without scope: shape} of the model's variables; UserError on anything else."""
  shapes = {}
  for name in sorted(shape_map):
    if is_training_state(name):
      continue
    if not name.startswith(SCOPE):
      raise UserError(f"unexpected variable {name!r} outside the {SCOPE!r} scope: not an "
                      "iGPT checkpoint of the original release?")
    if not dtype_map[name].is_floating:
      raise UserError(f"{name} has dtype {dtype_map[name].name}; model weights are floats.")
    shapes[name[len(SCOPE):]] = tuple(shape_map[name])
  return shapes


def load_tf_checkpoint(prefix: str) -> tuple[ModelConfig, dict]:
  """Reads a checkpoint of the original release; returns (ModelConfig, params).

  `prefix` is e.g. `downloads/model.ckpt-1000000` (see `resolve_prefix`). The shape (layers,
  width, heads, positions, vocabulary) comes from the variables; `causal` is False when there
  is no `sos` (a BERT model). Params are float32 numpy arrays. Raises FileNotFoundError for
  missing files, ImportError without TensorFlow, UserError for anything but an iGPT checkpoint
  and for a cut-off or damaged file (naming it).
  """
  prefix = resolve_prefix(prefix)
  tf = _import_tensorflow()
  index = prefix + ".index"
  try:
    reader = tf.train.load_checkpoint(prefix)
    shape_map, dtype_map = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
  except tf.errors.OpError as e:
    raise UserError(f"TensorFlow cannot read the checkpoint index {index!r} ({e.message}): "
                    f"it is cut off or damaged, {REDOWNLOAD}.") from None
  try:
    num_shards, where = read_index(index)
  except ValueError:
    # TensorFlow read this index, so it is sound; only the size check and the shard names
    # in read errors below are lost.
    num_shards, where = 0, {}
  check_shard_sizes(prefix, num_shards, where)
  shapes = _model_variables(shape_map, dtype_map)
  cfg = infer_config(shapes)
  check_variables(cfg, shapes)

  def get(name):
    try:
      value = np.asarray(reader.get_tensor(SCOPE + name), np.float32)
    except (tf.errors.OpError, IndexError) as e:  # a short read is a bare IndexError
      shard = (shard_path(prefix, where[SCOPE + name][0], num_shards) if SCOPE + name in where
               else f"{prefix}.data-*")
      reason = getattr(e, "message", None) or str(e)
      raise UserError(f"cannot read {SCOPE}{name} from checkpoint shard {shard!r} ({reason}): "
                      f"the file is damaged or cut off, {REDOWNLOAD}.") from None
    if not np.all(np.isfinite(value)):
      raise UserError(f"{SCOPE}{name} in {prefix!r} holds NaN or infinite values.")
    return value

  return cfg, params_from_release(cfg, get)
