"""OpenAI's original iGPT release (github.com/openai/image-gpt): its checkpoints and token data.

- `load_tf_checkpoint(prefix)`: a TensorFlow-1 checkpoint `.../model.ckpt-1000000` (files
  `.index`, `.meta`, `.data-000NN-of-000MM`) -> `(ModelConfig, params)` in our layout. Needs
  TensorFlow to read the files: `pip install -e ".[openai]"`.
- `token_source(folder, "cifar10", "train")`: the release's pre-tokenised `{dataset}_trX.npy` /
  `_trY.npy` (and `va`, `te`) as a `TokenSource`, memory-mapped; numpy only.

The release's variables (scope `model/`, from `src/model.py` of the release), with n = side**2,
H heads of hd = d / H:

    wte [V, d]   wpe [n, d]   wtet [V, d]   sos [d] (autoregressive models only)   ln_f/g [d]
    h{i}/ln_1/g, h{i}/ln_2/g [d]
    h{i}/attn/{q,k,v}_proj [H, hd, d]     used as einsum("bsf,hef->bhse", x, w)
    h{i}/attn/c_proj [H, hd, d]           used as einsum("bhse,hef->bsf", a, w)
    h{i}/mlp/c_fc/w [d, 4d]   h{i}/mlp/c_proj/w [4d, d]

A checkpoint without `sos` is a BERT-objective model (no SOS shift, no causal mask). Optimiser
slots and step counters are skipped. Everything else must be exactly this set, or loading fails.
"""

from __future__ import annotations

import glob
import math
import os
import re

import numpy as np

from igpt.model import ModelConfig

SCOPE = "model/"
INSTALL_HINT = 'pip install -e ".[openai]"  (or: pip install tensorflow-cpu)'
# Path components of optimiser slot variables (Adam's m and v under the names TF1's
# AdamOptimizer and the BERT-style AdamWeightDecayOptimizer give them).
_SLOT_PARTS = frozenset({"Adam", "Adam_1", "adam_m", "adam_v", "AdamWeightDecayOptimizer",
                         "AdamWeightDecayOptimizer_1"})
_COUNTERS = frozenset({"global_step", "beta1_power", "beta2_power"})
_LAYER_RE = re.compile(r"h(\d+)/")


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
      raise FileNotFoundError(
          f"{path!r} is a folder holding {len(indexes)} checkpoints (*.index files): give the "
          "checkpoint prefix, e.g. DIR/model.ckpt-1000000.")
    path = indexes[0]
  prefix = _strip_suffix(path)
  expected = (f"{prefix}.index and {prefix}.data-00000-of-000NN ... (the .meta file is not "
              "needed)")
  if not os.path.isfile(prefix + ".index"):
    raise FileNotFoundError(f"no TensorFlow checkpoint at prefix {prefix!r}: expected {expected}.")
  shards = glob.glob(glob.escape(prefix) + ".data-*-of-*")
  totals = {int(m.group(1)) for s in shards if (m := re.search(r"-of-(\d+)$", s))}
  if not totals:
    raise FileNotFoundError(f"{prefix}.index exists but no data shards do: expected {expected}.")
  if len(totals) > 1:
    raise FileNotFoundError(f"data shards of {prefix!r} disagree on their count: {sorted(totals)}.")
  total = totals.pop()
  for i in range(total):
    shard = f"{prefix}.data-{i:05d}-of-{total:05d}"
    if not os.path.isfile(shard):
      raise FileNotFoundError(f"checkpoint shard {shard!r} is missing (an interrupted download?).")
  return prefix


def checkpoint_step(prefix: str) -> int | None:
  """The step in a prefix named like `model.ckpt-1000000`, else None."""
  m = re.search(r"-(\d+)$", os.path.basename(_strip_suffix(os.fspath(prefix))))
  return int(m.group(1)) if m else None


def _import_tensorflow():
  try:
    import tensorflow as tf
  except ImportError as e:
    raise ImportError(f"reading the original TensorFlow checkpoints needs TensorFlow, which is "
                      f"not installed: {INSTALL_HINT}") from e
  return tf


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
    raise ValueError(f"missing variable {SCOPE}{name} in the iGPT checkpoint.")
  shape = tuple(shapes[name])
  if len(shape) != ndim:
    raise ValueError(f"{SCOPE}{name} has shape {shape}; expected {ndim} dimensions.")
  return shape


def infer_config(shapes) -> ModelConfig:
  """ModelConfig from {name (no scope): shape} of the model variables; ValueError if not iGPT."""
  layers = sorted({int(m.group(1)) for name in shapes if (m := _LAYER_RE.match(name))})
  q_names = [f"h{i}/attn/q_proj" for i in layers if f"h{i}/attn/q_proj" in shapes]
  if "wtet" not in shapes and not q_names:
    # GPT-2's release, for one, has model/wte and model/h0/... but fused c_attn weights.
    found = ", ".join(SCOPE + n for n in sorted(shapes)[:6]) or "no variables under model/"
    raise ValueError(f"not an iGPT checkpoint: it has neither {SCOPE}wtet nor "
                     f"{SCOPE}h{{i}}/attn/q_proj (found: {found}).")
  v, d = _shape_of(shapes, "wte", 2)
  heads, hd, d_q = _shape_of(shapes, q_names[0] if q_names else "h0/attn/q_proj", 3)
  if d_q != d or heads * hd != d:
    raise ValueError(f"{SCOPE}{q_names[0]} has shape {(heads, hd, d_q)}; expected "
                     f"[heads, head_dim, d] with heads * head_dim = d = {d} ({SCOPE}wte is "
                     f"{(v, d)}).")
  n = _shape_of(shapes, "wpe", 2)[0]
  if math.isqrt(n) ** 2 != n:
    raise ValueError(f"{SCOPE}wpe has {n} positions, not a square image (side**2).")
  return ModelConfig(num_layers=layers[-1] + 1 if layers else 0, d_model=d, num_heads=heads,
                     seq_len=n, vocab_size=v, causal="sos" in shapes)


def check_variables(cfg: ModelConfig, shapes) -> None:
  """ValueError naming the first missing, unexpected or misshapen variable."""
  want = expected_shapes(cfg)
  missing = sorted(set(want) - set(shapes))
  if missing:
    raise ValueError(f"missing variable {SCOPE}{missing[0]} in the iGPT checkpoint "
                     f"({len(missing)} missing: {[SCOPE + m for m in missing[:4]]}).")
  unexpected = sorted(set(shapes) - set(want))
  if unexpected:
    raise ValueError(f"unexpected variable {SCOPE}{unexpected[0]} {list(shapes[unexpected[0]])} "
                     f"in the iGPT checkpoint ({len(unexpected)} unexpected).")
  for name, shape in want.items():
    if tuple(shapes[name]) != shape:
      raise ValueError(
          f"{SCOPE}{name} has shape {tuple(shapes[name])}, expected {shape} (inferred d="
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
  """{name without scope: shape} of the model's variables; ValueError on anything else."""
  shapes = {}
  for name in sorted(shape_map):
    if is_training_state(name):
      continue
    if not name.startswith(SCOPE):
      raise ValueError(f"unexpected variable {name!r} outside the {SCOPE!r} scope: not an "
                       "iGPT checkpoint of the original release?")
    if not dtype_map[name].is_floating:
      raise ValueError(f"{name} has dtype {dtype_map[name].name}; model weights are floats.")
    shapes[name[len(SCOPE):]] = tuple(shape_map[name])
  return shapes


def load_tf_checkpoint(prefix: str) -> tuple[ModelConfig, dict]:
  """Reads a checkpoint of the original release; returns (ModelConfig, params).

  `prefix` is e.g. `downloads/model.ckpt-1000000` (see `resolve_prefix`). The shape (layers,
  width, heads, positions, vocabulary) comes from the variables; `causal` is False when there
  is no `sos` (a BERT model). Params are float32 numpy arrays. Raises FileNotFoundError for
  missing files, ImportError without TensorFlow, ValueError for anything but an iGPT checkpoint.
  """
  prefix = resolve_prefix(prefix)
  tf = _import_tensorflow()
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = _model_variables(reader.get_variable_to_shape_map(),
                              reader.get_variable_to_dtype_map())
  except tf.errors.OpError as e:
    raise ValueError(f"TensorFlow cannot read checkpoint {prefix!r}: {e.message}") from None
  cfg = infer_config(shapes)
  check_variables(cfg, shapes)

  def get(name):
    try:
      value = np.asarray(reader.get_tensor(SCOPE + name), np.float32)
    except tf.errors.OpError as e:
      raise ValueError(f"cannot read {SCOPE}{name} from {prefix!r}: {e.message}") from None
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{SCOPE}{name} in {prefix!r} holds NaN or infinite values.")
    return value

  return cfg, params_from_release(cfg, get)


# ---------------------------------------------------------------------------------------------
# Pre-tokenised data


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
      raise ValueError(f"{what}: tokens must be an integer array [N, side*side]; got dtype "
                       f"{x.dtype}, shape {x.shape}.")
    if x.shape[1] == 0 or math.isqrt(x.shape[1]) ** 2 != x.shape[1]:
      raise ValueError(f"{what}: {x.shape[1]} tokens per image is not a square image "
                       "(side*side).")
    if y.ndim != 2 or y.shape[1] == 0 or not (np.issubdtype(y.dtype, np.number)
                                             or y.dtype == np.bool_):
      raise ValueError(f"{what}: labels must be one-hot numbers [N, classes]; got dtype "
                       f"{y.dtype}, shape {y.shape}.")
    if len(x) != len(y):
      raise ValueError(f"{what}: {len(x)} token rows but {len(y)} label rows.")

  def _check_values(self, x, y, rows=None):
    """ValueError unless tokens are in [0, num_tokens) and labels one-hot; `rows` are the file
    rows of x and y (default: 0, 1, ...), for the message."""
    name = lambda i: int(i if rows is None else rows[i])
    bad = np.flatnonzero(np.any((x < 0) | (x >= self.num_tokens), axis=1))
    if bad.size:
      i = bad[0]
      raise ValueError(f"{self.description}: image {name(i)} has a token outside "
                       f"[0, {self.num_tokens}) (min {x[i].min()}, max {x[i].max()}).")
    ok = np.all((y == 0) | (y == 1), axis=1) & (np.count_nonzero(y, axis=1) == 1)
    if not np.all(ok):
      i = np.flatnonzero(~ok)[0]
      raise ValueError(f"{self.description}: label row {name(i)} is not one-hot "
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
    raise FileNotFoundError(
        f"{path!r} does not exist. The release's token files are fetched by download.py of "
        "github.com/openai/image-gpt (--dataset cifar10 or imagenet).")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path!r} is not a readable .npy array: {e}") from None


def token_source(folder_or_prefix: str, dataset: str | None = None,
                 split: str = "train") -> TokenSource:
  """The release's tokens of `split` ("train", "val" or "test") as a TokenSource.

  `token_source("downloads", "cifar10", "val")` reads downloads/cifar10_vaX.npy and _vaY.npy;
  a prefix works too, as in the release's own code: `token_source("downloads/cifar10",
  split="val")`.
  """
  if split not in SPLIT_TAGS:
    raise ValueError(f"split={split!r} is not one of {list(SPLIT_TAGS)}.")
  path = os.fspath(folder_or_prefix)
  if os.path.isdir(path):
    if not dataset:
      raise ValueError(f"{path!r} is a folder: name the dataset too (cifar10 or imagenet).")
    prefix = os.path.join(path, dataset)
  else:
    prefix = path
  tag = SPLIT_TAGS[split]
  x_path, y_path = f"{prefix}_{tag}X.npy", f"{prefix}_{tag}Y.npy"
  tokens, onehot = _open_npy(x_path), _open_npy(y_path)
  description = f"{os.path.basename(prefix)} {split} ({x_path})"
  return TokenSource(tokens, onehot, description)
