"""Hugging Face ImageGPT checkpoints <-> our params pytree.

HF layout (`ImageGPTForCausalImageModeling`, see docs/IGPT_SPEC.md): Conv1D weights are
[in, out]; `wte` is [V+1, d] with the SOS vector in its last row; `c_attn` packs q|k|v along
its columns; `lm_head` is a torch Linear [V, d]. Our layout (igpt/model.py): q/k/v [d, H, hd],
attention c_proj [H, hd, d], SOS as its own `sos` [d], untied head `wtet` [V, d].

    cfg, params = load_hf_checkpoint("path/to/imagegpt-small")   # config.json + weights
    logits, hidden = model.apply(cfg, params, tokens)

Params come back as plain float32 numpy arrays (put them on devices / shard them yourself).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from igpt import trees
from igpt.errors import MissingDependencyError, MissingFileError, UserError
from igpt.model import NORM_EPS, ModelConfig

# Prefix of the base transformer inside ImageGPTForCausalImageModeling /
# ImageGPTForImageClassification; a bare ImageGPTModel has none.
HF_PREFIX = "transformer."
# Non-parameter buffers older transformers versions saved (causal mask, mask value).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The classifier of ImageGPTForImageClassification: not part of the generative model.
HF_CLASSIFIER_KEY = "score.weight"
# Conv1D layers: HF has a bias on each, the original model has none.
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ----------------------------------------------------------------------------- config


def _field(hf_config: Mapping[str, Any], *names, default=None):
  """First present of `names` (config.json uses n_embd; attribute_map aliases hidden_size)."""
  for name in names:
    if name in hf_config and hf_config[name] is not None:
      return hf_config[name]
  return default


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """Our ModelConfig from an HF ImageGPT config dict (config.json), refusing what we can't model.

  vocab_size counts the SOS row, so our vocab is vocab_size - 1 (513 -> 512 colours).
  A transformers `ImageGPTConfig` object works too.
  """
  if hasattr(hf_config, "to_dict"):
    hf_config = hf_config.to_dict()
  hf_config = dict(hf_config)
  d = int(_field(hf_config, "n_embd", "hidden_size", default=512))
  n_layer = int(_field(hf_config, "n_layer", "num_hidden_layers", default=24))
  n_head = int(_field(hf_config, "n_head", "num_attention_heads", default=8))
  n_positions = int(_field(hf_config, "n_positions", "max_position_embeddings", default=1024))
  vocab = int(_field(hf_config, "vocab_size", default=513))

  eps = float(_field(hf_config, "layer_norm_epsilon", default=1e-5))
  if not math.isclose(eps, NORM_EPS, rel_tol=1e-6):
    raise UserError(f"HF config layer_norm_epsilon={eps}: our norm uses {NORM_EPS}.")
  act = _field(hf_config, "activation_function", default="quick_gelu")
  if act != "quick_gelu":
    raise UserError(f"HF config activation_function={act!r}: our MLP uses quick_gelu.")
  n_inner = _field(hf_config, "n_inner")
  if n_inner is not None and int(n_inner) != 4 * d:
    raise UserError(f"HF config n_inner={n_inner}: our MLP width is 4 * n_embd = {4 * d}.")
  # Flags that change the math away from the original model. (tie_word_embeddings is not
  # checked: the head is read from lm_head.weight, whatever the flag says.)
  for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("add_cross_attention", False)):
    got = _field(hf_config, flag, default=want)
    if bool(got) != want:
      raise UserError(f"HF config {flag}={got}: only {flag}={want} matches iGPT.")
  side = math.isqrt(n_positions)
  if side * side != n_positions:
    raise UserError(f"HF config n_positions={n_positions} is not a square image (side**2).")
  if vocab < 2:
    raise UserError(f"HF config vocab_size={vocab}: it must count the colours plus SOS.")
  return ModelConfig(num_layers=n_layer, d_model=d, num_heads=n_head, seq_len=n_positions,
                     vocab_size=vocab - 1, causal=True)


def hf_config_from_model(cfg: ModelConfig) -> dict:
  """config.json fields for an HF ImageGPTForCausalImageModeling equal to `cfg`."""
  if not cfg.causal:
    raise UserError("HF ImageGPT is autoregressive only; a BERT-objective model (causal=False) "
                    "has no HF equivalent.")
  return {
      "architectures": ["ImageGPTForCausalImageModeling"],
      "model_type": "imagegpt",
      "vocab_size": cfg.vocab_size + 1,
      "n_positions": cfg.seq_len,
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": None,
      "activation_function": "quick_gelu",
      "layer_norm_epsilon": NORM_EPS,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "tie_word_embeddings": False,
      # The paper trained without dropout; HF's default is 0.1 (only active in train mode).
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
      "initializer_range": 0.02,
      "torch_dtype": "float32",
  }


# ----------------------------------------------------------------------------- HF -> ours


def _to_numpy(x) -> np.ndarray:
  """float32 numpy from a numpy array or a torch tensor (so `model.state_dict()` works as is)."""
  if hasattr(x, "detach"):  # torch.Tensor, without importing torch
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def _expected_hf_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
  """Every HF weight key (prefix included for the transformer) -> its shape, head excluded."""
  d, v, n = cfg.d_model, cfg.vocab_size, cfg.seq_len
  shapes = {f"{prefix}wte.weight": (v + 1, d), f"{prefix}wpe.weight": (n, d),
            f"{prefix}ln_f.weight": (d,)}
  for i in range(cfg.num_layers):
    b = f"{prefix}h.{i}."
    shapes.update({
        b + "ln_1.weight": (d,), b + "ln_2.weight": (d,),
        b + "attn.c_attn.weight": (d, 3 * d), b + "attn.c_proj.weight": (d, d),
        b + "mlp.c_fc.weight": (d, 4 * d), b + "mlp.c_proj.weight": (4 * d, d),
    })
  return shapes


def _bias_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
  d = cfg.d_model
  outs = {"attn.c_attn": 3 * d, "attn.c_proj": d, "mlp.c_fc": 4 * d, "mlp.c_proj": d}
  return {f"{prefix}h.{i}.{layer}.bias": (outs[layer],)
          for i in range(cfg.num_layers) for layer in _CONV1D}


def _detect_prefix(keys) -> str:
  """HF_PREFIX for the head-carrying models, '' for a bare ImageGPTModel state dict."""
  if any(k.startswith(HF_PREFIX) for k in keys):
    return HF_PREFIX
  if "wte.weight" in keys:
    return ""
  raise UserError("not an ImageGPT state dict: found neither 'transformer.wte.weight' nor "
                  f"'wte.weight' among keys {sorted(keys)[:8]}...")


def _check_zero_bias(key: str, bias: np.ndarray, bias_atol: float):
  worst = float(np.max(np.abs(bias))) if bias.size else 0.0
  if worst > bias_atol:
    raise UserError(
        f"{key} has non-zero entries (max |b| = {worst:.3g}); iGPT has no linear biases, so this "
        "checkpoint cannot be represented exactly. Only converted checkpoints (zero biases) load.")


def params_from_hf_state_dict(state_dict: Mapping[str, Any], hf_config: Mapping[str, Any] | Any, *,
                              bias_atol: float = 0.0, allow_missing_head: bool = False,
                              require_biases: bool = False) -> tuple[ModelConfig, dict]:
  """Maps an HF ImageGPT state dict onto our params pytree; returns (ModelConfig, params).

  Accepts the `ImageGPTForCausalImageModeling` layout (keys under `transformer.` plus
  `lm_head.weight`) and the bare `ImageGPTModel` layout (no prefix, no head). Without a head
  the call fails unless `allow_missing_head=True`, which sets `wtet` to zeros (hidden states,
  e.g. for a linear probe, stay exact; logits are all zero). Conv1D biases must be zero
  (|b| <= bias_atol) and, with `require_biases` (a checkpoint file, which always has them),
  present; causal-mask buffers are ignored. `score.weight` (the
  ImageGPTForImageClassification head) is ignored here: read it with `hf_classifier_head`.
  Every other key must be known and have the shape the config implies.
  """
  cfg = config_from_hf(hf_config)
  keys = set(state_dict)
  prefix = _detect_prefix(keys)
  weights = _expected_hf_shapes(cfg, prefix)
  biases = _bias_shapes(cfg, prefix)
  head_key = "lm_head.weight"
  v, d = cfg.vocab_size, cfg.d_model
  shapes = dict(weights, **biases, **{head_key: (v, d)})
  got = {k: tuple(np.shape(x)) for k, x in state_dict.items()}
  # Biases and the head may be missing (see the docstring), and buffers and the classifier are
  # extra keys to ignore: each kind of difference is judged on its own below.
  diff = trees.leaf_diff(shapes, got)

  unexpected = [k for k in diff.unexpected
                if k != HF_CLASSIFIER_KEY and not k.endswith(_IGNORED_SUFFIXES)]
  if unexpected:
    raise UserError(f"unexpected key {unexpected[0]!r} in the HF state dict ({len(unexpected)} "
                    f"unexpected in all: {unexpected[:5]}); is hf_config the checkpoint's own?")
  missing = [k for k in diff.missing if k in weights]
  if missing:
    raise UserError(f"missing key {missing[0]!r} in the HF state dict ({len(missing)} missing: "
                    f"{missing[:5]}); does hf_config (n_layer={cfg.num_layers}) match?")
  missing_biases = [k for k in diff.missing if k in biases]
  if require_biases and missing_biases:
    raise UserError(f"missing Conv1D bias {missing_biases[0]!r} in the HF state dict "
                    f"({len(missing_biases)} missing); a whole ImageGPT checkpoint has them all.")
  if head_key not in keys and not allow_missing_head:
    raise UserError(f"the state dict has no {head_key!r} (an ImageGPTModel checkpoint?): our "
                    "model needs the output head. Pass allow_missing_head=True to use zeros "
                    "(hidden states stay exact, logits become zero).")
  if diff.misshapen:
    key = diff.misshapen[0]
    raise UserError(f"{key} has shape {got[key]}, expected {shapes[key]} from the config "
                    f"(n_embd={d}, n_positions={cfg.seq_len}, vocab_size={v + 1}).")

  arrays = {key: _to_numpy(state_dict[key]) for key in sorted(keys & set(shapes))}
  for key in sorted(set(biases) & keys):
    _check_zero_bias(key, arrays[key], bias_atol)

  head = arrays.get(head_key, np.zeros((v, d), np.float32))
  return cfg, _params_from_arrays(cfg, arrays, prefix, head)


def _params_from_arrays(cfg: ModelConfig, arrays: Mapping[str, np.ndarray], prefix: str,
                        head: np.ndarray) -> dict:
  d, h, hd, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.vocab_size
  wte = arrays[f"{prefix}wte.weight"]
  params = {"wte": wte[:v], "sos": wte[v], "wpe": arrays[f"{prefix}wpe.weight"],
            "ln_f": {"g": arrays[f"{prefix}ln_f.weight"]}, "wtet": head}
  for i in range(cfg.num_layers):
    b = f"{prefix}h.{i}."
    # c_attn columns are q|k|v, each split into heads as view(..., H, hd).
    q, k, vv = np.split(arrays[b + "attn.c_attn.weight"], 3, axis=1)
    params[f"h_{i}"] = {
        "ln_1": {"g": arrays[b + "ln_1.weight"]},
        "attn": {"q": q.reshape(d, h, hd), "k": k.reshape(d, h, hd), "v": vv.reshape(d, h, hd),
                 # Rows of c_proj index the merged heads (head-major), hence [H, hd, d].
                 "c_proj": arrays[b + "attn.c_proj.weight"].reshape(h, hd, d)},
        "ln_2": {"g": arrays[b + "ln_2.weight"]},
        "mlp": {"c_fc": arrays[b + "mlp.c_fc.weight"], "c_proj": arrays[b + "mlp.c_proj.weight"]},
    }
  # Copies, so the params never alias (possibly read-only, memory-mapped) input buffers.
  return _map(lambda x: np.array(x, np.float32), params)


def _map(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


def hf_classifier_head(state_dict: Mapping[str, Any]) -> np.ndarray | None:
  """ImageGPTForImageClassification's `score.weight` as an [d, classes] matrix, or None.

  HF applies it (bias-free) to the mean over positions of ln_f(h_L): that is
  `hidden["ln_f"].mean(1) @ head` with our model.
  """
  if HF_CLASSIFIER_KEY not in state_dict:
    return None
  return _to_numpy(state_dict[HF_CLASSIFIER_KEY]).T.copy()


# ----------------------------------------------------------------------------- ours -> HF


def params_to_hf_state_dict(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our params as an HF `ImageGPTForCausalImageModeling` state dict (float32 numpy).

  The inverse of `params_from_hf_state_dict`; Conv1D biases are written as zeros so that
  `ImageGPTForCausalImageModeling.load_state_dict(..., strict=True)` accepts it.
  """
  if not cfg.causal:
    raise UserError("HF ImageGPT is autoregressive only; cannot export a causal=False model.")
  d, v, p = cfg.d_model, cfg.vocab_size, HF_PREFIX
  f32 = lambda x: np.asarray(x, dtype=np.float32)
  sd = {f"{p}wte.weight": np.concatenate([f32(params["wte"]), f32(params["sos"])[None]], 0),
        f"{p}wpe.weight": f32(params["wpe"]), f"{p}ln_f.weight": f32(params["ln_f"]["g"]),
        "lm_head.weight": f32(params["wtet"])}
  for i in range(cfg.num_layers):
    blk, b = params[f"h_{i}"], f"{p}h.{i}."
    attn = blk["attn"]
    qkv = [f32(attn[name]).reshape(d, d) for name in ("q", "k", "v")]
    sd.update({
        b + "ln_1.weight": f32(blk["ln_1"]["g"]), b + "ln_2.weight": f32(blk["ln_2"]["g"]),
        b + "attn.c_attn.weight": np.concatenate(qkv, axis=1),
        b + "attn.c_proj.weight": f32(attn["c_proj"]).reshape(d, d),
        b + "mlp.c_fc.weight": f32(blk["mlp"]["c_fc"]),
        b + "mlp.c_proj.weight": f32(blk["mlp"]["c_proj"]),
    })
  for key, shape in _bias_shapes(cfg, p).items():
    sd[key] = np.zeros(shape, np.float32)
  # Contiguous copies: safetensors refuses non-contiguous or shared buffers.
  return {k: np.ascontiguousarray(x).copy() for k, x in sd.items()}


def save_hf_checkpoint(cfg: ModelConfig, params: Mapping[str, Any], directory: str) -> None:
  """Writes config.json + model.safetensors that `ImageGPTForCausalImageModeling.from_pretrained`
  (and `load_hf_checkpoint`) read."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config_from_model(cfg), f, indent=2)
  save_file(params_to_hf_state_dict(cfg, params), os.path.join(directory, "model.safetensors"),
            metadata={"format": "pt"})


# ----------------------------------------------------------------------------- files


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except (TypeError, ValueError) as e:  # e.g. bfloat16 tensors, which numpy can't hold
    try:
      from safetensors.torch import load_file as load_torch
    except ImportError:
      raise UserError(f"cannot read {path} with numpy ({e}); install torch to read it.") from e
    return {k: _to_numpy(t) for k, t in load_torch(path).items()}


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise MissingDependencyError(f"{path} is a PyTorch pickle: reading it needs torch (pip "
                                 "install torch), or convert it to model.safetensors first.") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return {k: _to_numpy(t) for k, t in state_dict.items()}


def _read_hf_config(config_path: str) -> dict:
  """An ImageGPT config.json as a dict; a UserError naming the file for anything else."""
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{config_path} is not a JSON config ({e}).") from e
  if not isinstance(hf_config, dict) or not hf_config:
    raise UserError(f"{config_path} is empty or not a JSON object; an ImageGPT config.json "
                    "names model_type 'imagegpt' and the model's sizes.")
  model_type = hf_config.get("model_type", "imagegpt")
  if model_type != "imagegpt":
    raise UserError(f"{config_path} has model_type={model_type!r}: only ImageGPT checkpoints "
                    "(model_type 'imagegpt') load.")
  # Without model_type (hand-written configs) the sizes must be spelled out: defaults would
  # silently make an iGPT-S.
  sizes = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
  missing = [k for k in sizes if k not in hf_config]
  if "model_type" not in hf_config and missing:
    raise UserError(f"{config_path} has no model_type and lacks {missing}; an ImageGPT "
                    "config.json names model_type 'imagegpt' and the model's sizes.")
  return hf_config


def load_hf_checkpoint(path_or_dir: str, **kwargs) -> tuple[ModelConfig, dict]:
  """Reads an HF ImageGPT checkpoint; returns (ModelConfig, params).

  `path_or_dir`: a folder with config.json and model.safetensors (preferred, numpy only) or
  pytorch_model.bin (needs torch), or the path of one such weights file next to its
  config.json. Sharded checkpoints (`*.index.json`) are not supported. kwargs go to
  `params_from_hf_state_dict`. The config must be ImageGPT's (model_type 'imagegpt', or no
  model_type but every size given), and every Conv1D bias must be there (and zero).
  """
  if not os.path.exists(path_or_dir):
    raise MissingFileError(f"{path_or_dir} does not exist; give an HF ImageGPT folder "
                           "(config.json + model.safetensors) or its weights file.")
  if os.path.isdir(path_or_dir):
    directory, weights = path_or_dir, None
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(directory, name)):
        weights = os.path.join(directory, name)
        break
    if weights is None:
      raise MissingFileError(f"{directory} has neither model.safetensors nor pytorch_model.bin "
                             "(sharded checkpoints are not supported).")
  else:
    directory, weights = os.path.dirname(path_or_dir) or ".", path_or_dir
    if weights.endswith(".json"):
      raise UserError(f"{weights} is a JSON file, not weights: give the checkpoint folder or "
                      "its model.safetensors / pytorch_model.bin.")
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise MissingFileError(f"{config_path} not found: the HF config is needed for the shapes.")
  hf_config = _read_hf_config(config_path)
  if weights.endswith(".safetensors"):
    state_dict = _read_safetensors(weights)
  else:
    state_dict = _read_torch_bin(weights)
  kwargs.setdefault("require_biases", True)
  return params_from_hf_state_dict(state_dict, hf_config, **kwargs)
