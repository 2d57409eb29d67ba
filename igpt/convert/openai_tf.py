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
"""

from __future__ import annotations

import glob
import math
import os
import re

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
    shard = f"{prefix}.data-{i:05d}-of-{total:05d}"
    if not os.path.isfile(shard):
      raise MissingFileError(f"checkpoint shard {shard!r} is missing (an interrupted download?).")
  return prefix


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
  """ModelConfig from {name (no scope): shape} of the model variables; ValueError if not iGPT."""
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
  """ValueError naming the first missing, unexpected or misshapen variable."""
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
  """{name without scope: shape} of the model's variables; ValueError on anything else."""
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
  missing files, ImportError without TensorFlow, ValueError for anything but an iGPT checkpoint.
  """
  prefix = resolve_prefix(prefix)
  tf = _import_tensorflow()
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = _model_variables(reader.get_variable_to_shape_map(),
                              reader.get_variable_to_dtype_map())
  except tf.errors.OpError as e:
    raise UserError(f"TensorFlow cannot read checkpoint {prefix!r}: {e.message}") from None
  cfg = infer_config(shapes)
  check_variables(cfg, shapes)

  def get(name):
    try:
      value = np.asarray(reader.get_tensor(SCOPE + name), np.float32)
    except tf.errors.OpError as e:
      raise UserError(f"cannot read {SCOPE}{name} from {prefix!r}: {e.message}") from None
    if not np.all(np.isfinite(value)):
      raise UserError(f"{SCOPE}{name} in {prefix!r} holds NaN or infinite values.")
    return value

  return cfg, params_from_release(cfg, get)
