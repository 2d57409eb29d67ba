"""Numerical parity of our model with Hugging Face's ImageGPT, and the checkpoint converter.

Metric: for each output tensor, rel_err = max|ours - ref| / max|ref| must be <= 1e-5
(float32 on both sides; observed ~5e-7). Every hidden state is compared, not only the logits.

The fixture tests need no torch: tests/fixtures/*.npz hold HF's outputs
(scripts/make_parity_fixture.py). The live tests rebuild random HF models when torch and
transformers are installed, and round-trip checkpoints through files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from igpt import model
from igpt.convert import hf as convert_hf

RTOL = 1e-5
# Jitted: op-by-op dispatch of an unjitted Flax forward is slower than compiling it.
_forward = jax.jit(model.apply, static_argnums=0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "tests", "fixtures"))
                  if f.startswith("hf_parity_") and f.endswith(".npz"))


def _fixture_module():
  """scripts/make_parity_fixture.py as a module (scripts/ is not a package)."""
  path = os.path.join(ROOT, "scripts", "make_parity_fixture.py")
  spec = importlib.util.spec_from_file_location("make_parity_fixture", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_fixture(name):
  """(state_dict, hf_config, x, reference outputs) of one stored fixture."""
  with np.load(os.path.join(ROOT, "tests", "fixtures", name + ".npz")) as f:
    arrays = {k: f[k] for k in f.files}
  state_dict = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
  ref = {k: v for k, v in arrays.items() if k == "logits" or k.startswith("hidden/")}
  return state_dict, json.loads(str(arrays["hf_config"])), arrays["x"], ref


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _errors(cfg, params, x, ref, with_logits=True) -> dict[str, float]:
  """rel_err of our forward pass against HF's outputs, per output name."""
  # Full float32 matmuls: on GPUs the default precision (TF32) is far coarser than 1e-5.
  with jax.default_matmul_precision("highest"):
    logits, hidden = _forward(cfg, params, np.asarray(x, np.int32))
  ref_hidden = {k[len("hidden/"):] for k in ref if k.startswith("hidden/")}
  assert set(hidden) == ref_hidden, "every hidden state must have a reference"
  errs = {k: rel_err(v, ref["hidden/" + k]) for k, v in hidden.items()}
  if with_logits:
    errs["logits"] = rel_err(logits, ref["logits"])
  return errs


def assert_parity(cfg, params, x, ref, with_logits=True):
  errs = _errors(cfg, params, x, ref, with_logits)
  bad = {k: e for k, e in errs.items() if not e <= RTOL}
  assert not bad, f"rel_err above {RTOL}: {bad} (all: {errs})"


# ----------------------------------------------------------------------------- fixtures


def test_fixtures_present():
  assert len(FIXTURES) >= 2, "run scripts/make_parity_fixture.py"


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity(name):
  state_dict, hf_config, x, ref = _load_fixture(name)
  cfg, params = convert_hf.params_from_hf_state_dict(state_dict, hf_config)
  assert x.shape[0] >= 2 and x.shape[1] == cfg.seq_len
  assert_parity(cfg, params, x, ref)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_params_match_init_layout(name):
  state_dict, hf_config, _, _ = _load_fixture(name)
  cfg, params = convert_hf.params_from_hf_state_dict(state_dict, hf_config)
  init = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(init)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(init)):
    assert got.shape == want.shape and got.dtype == np.float32


def test_fixture_detects_layout_errors():
  """The comparison is sharp: a head-order or q/k mix-up in the converter would fail it."""
  name = FIXTURES[0]
  state_dict, hf_config, x, ref = _load_fixture(name)
  cfg, params = convert_hf.params_from_hf_state_dict(state_dict, hf_config)
  swapped = jax.tree.map(np.copy, params)
  attn = swapped["h_0"]["attn"]
  attn["q"], attn["k"] = attn["k"], attn["q"]
  assert max(_errors(cfg, swapped, x, ref).values()) > 1e-2
  transposed = jax.tree.map(np.copy, params)
  c_proj = transposed["h_0"]["attn"]["c_proj"]
  transposed["h_0"]["attn"]["c_proj"] = np.swapaxes(c_proj, 0, 1).reshape(c_proj.shape)
  assert max(_errors(cfg, transposed, x, ref).values()) > 1e-2


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_roundtrip_to_hf(name):
  state_dict, hf_config, _, _ = _load_fixture(name)
  cfg, params = convert_hf.params_from_hf_state_dict(state_dict, hf_config)
  back = convert_hf.params_to_hf_state_dict(cfg, params)
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_save_then_load_safetensors_without_torch(tmp_path):
  state_dict, hf_config, x, ref = _load_fixture(FIXTURES[0])
  cfg, params = convert_hf.params_from_hf_state_dict(state_dict, hf_config)
  convert_hf.save_hf_checkpoint(cfg, params, str(tmp_path))
  cfg2, params2 = convert_hf.load_hf_checkpoint(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # A weights file path works as well as its folder.
  cfg3, _ = convert_hf.load_hf_checkpoint(str(tmp_path / "model.safetensors"))
  assert cfg3 == cfg
  assert_parity(cfg2, params2, x, ref)


# ----------------------------------------------------------------------------- converter errors


@pytest.fixture(scope="module")
def small():
  """(state_dict, hf_config) of the first fixture."""
  state_dict, hf_config, _, _ = _load_fixture(FIXTURES[0])
  return state_dict, hf_config


def test_config_mapping(small):
  _, hf_config = small
  cfg = convert_hf.config_from_hf(hf_config)
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads) == (
      hf_config["n_layer"], hf_config["n_embd"], hf_config["n_head"])
  assert cfg.seq_len == hf_config["n_positions"] and cfg.vocab_size == 512 and cfg.causal
  # The released checkpoints' config (openai/imagegpt-small).
  released = dict(vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8,
                  activation_function="quick_gelu", layer_norm_epsilon=1e-5)
  assert convert_hf.config_from_hf(released) == model.ModelConfig(24, 512, 8, 1024)
  # A transformers config object is accepted as well as a dict.
  class FakeConfig:
    def to_dict(self):
      return dict(hf_config)
  assert convert_hf.config_from_hf(FakeConfig()) == cfg
  # Our export maps back to the same config.
  assert convert_hf.config_from_hf(convert_hf.hf_config_from_model(cfg)) == cfg


@pytest.mark.parametrize("field,value,match", [
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"),
    ("activation_function", "gelu_new", "quick_gelu"),
    ("n_positions", 15, "square"),
    ("n_inner", 100, "n_inner"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
])
def test_config_rejects_other_math(small, field, value, match):
  _, hf_config = small
  with pytest.raises(ValueError, match=match):
    convert_hf.config_from_hf(dict(hf_config, **{field: value}))


def test_nonzero_bias_is_refused(small):
  state_dict, hf_config = small
  sd = dict(state_dict)
  key = "transformer.h.1.mlp.c_fc.bias"
  sd[key] = sd[key].copy()
  sd[key][3] = 0.25
  with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias.*non-zero"):
    convert_hf.params_from_hf_state_dict(sd, hf_config)
  # A tolerance lets near-zero biases through, on purpose only.
  convert_hf.params_from_hf_state_dict(sd, hf_config, bias_atol=0.5)


def test_missing_unexpected_and_misshapen_keys(small):
  state_dict, hf_config = small
  sd = {k: v for k, v in state_dict.items() if k != "transformer.h.1.ln_2.weight"}
  with pytest.raises(ValueError, match=r"missing key 'transformer\.h\.1\.ln_2\.weight'"):
    convert_hf.params_from_hf_state_dict(sd, hf_config)
  sd = dict(state_dict, **{"transformer.h.7.ln_1.weight": np.ones(64, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'transformer\.h\.7\.ln_1\.weight'"):
    convert_hf.params_from_hf_state_dict(sd, hf_config)
  sd = dict(state_dict, **{"transformer.wpe.weight": np.zeros((17, 64), np.float32)})
  with pytest.raises(ValueError, match=r"transformer\.wpe\.weight has shape \(17, 64\)"):
    convert_hf.params_from_hf_state_dict(sd, hf_config)
  sd = dict(state_dict, **{"lm_head.weight": np.zeros((513, 64), np.float32)})
  with pytest.raises(ValueError, match=r"lm_head\.weight has shape"):
    convert_hf.params_from_hf_state_dict(sd, hf_config)
  with pytest.raises(ValueError, match="not an ImageGPT state dict"):
    convert_hf.params_from_hf_state_dict({"foo.weight": np.zeros(3)}, hf_config)


def test_buffers_are_ignored_and_classifier_is_separate(small):
  state_dict, hf_config = small
  cfg, params = convert_hf.params_from_hf_state_dict(state_dict, hf_config)
  n = hf_config["n_positions"]
  score = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
  sd = dict(state_dict, **{"transformer.h.0.attn.bias": np.tril(np.ones((1, 1, n, n), bool)),
                           "transformer.h.0.attn.masked_bias": np.array(-1e4, np.float32),
                           "score.weight": score})
  _, params2 = convert_hf.params_from_hf_state_dict(sd, hf_config)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  np.testing.assert_array_equal(convert_hf.hf_classifier_head(sd), score.T)
  assert convert_hf.hf_classifier_head(state_dict) is None


def test_bare_model_layout_needs_explicit_missing_head(small):
  """ImageGPTModel keys (no `transformer.` prefix, no lm_head): hidden states still exact."""
  state_dict, hf_config = small
  _, _, x, ref = _load_fixture(FIXTURES[0])
  bare = {k[len("transformer."):]: v for k, v in state_dict.items() if k.startswith("transformer.")}
  with pytest.raises(ValueError, match="lm_head"):
    convert_hf.params_from_hf_state_dict(bare, hf_config)
  cfg, params = convert_hf.params_from_hf_state_dict(bare, hf_config, allow_missing_head=True)
  assert not np.any(params["wtet"])
  assert_parity(cfg, params, x, ref, with_logits=False)


def test_torch_bin_without_torch_says_so(tmp_path, small, monkeypatch):
  _, hf_config = small
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="needs torch"):
    convert_hf.load_hf_checkpoint(str(tmp_path))


def test_missing_files_are_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    convert_hf.load_hf_checkpoint(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert_hf.load_hf_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------- live (torch)

# (layers, width, heads, image side, colours): shapes unlike the stored fixtures, one with a
# 16-colour palette like configs/tiny.py.
LIVE_CONFIGS = [(1, 32, 2, 6, 512), (2, 40, 5, 5, 16)]


@pytest.fixture(scope="module")
def hf():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  return _fixture_module()


def _random_tokens(hf_config, batch=2, seed=0):
  vocab = hf_config["vocab_size"] - 1
  return np.random.default_rng(seed).integers(0, vocab, (batch, hf_config["n_positions"]))


@pytest.mark.parametrize("shape", LIVE_CONFIGS)
def test_live_parity(hf, shape):
  layers, width, heads, side, colours = shape
  hf_config = hf.hf_config_dict(layers, width, heads, side, vocab_size=colours)
  hf_model = hf.build_hf_model(hf_config, seed=11)
  x = _random_tokens(hf_config)
  cfg, params = convert_hf.params_from_hf_state_dict(hf_model.state_dict(), hf_config)
  assert_parity(cfg, params, x, hf.hf_reference(hf_model, x))


def test_live_checkpoint_files(hf, tmp_path):
  """save_pretrained (safetensors) and a torch .bin with legacy buffers both load exactly."""
  import torch
  hf_config = hf.hf_config_dict(2, 32, 4, 4)
  hf_model = hf.build_hf_model(hf_config, seed=5)
  x = _random_tokens(hf_config, batch=3)
  ref = hf.hf_reference(hf_model, x)

  hf_model.save_pretrained(str(tmp_path / "st"))
  assert os.path.exists(tmp_path / "st" / "model.safetensors")
  cfg, params = convert_hf.load_hf_checkpoint(str(tmp_path / "st"))
  assert_parity(cfg, params, x, ref)

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
  state = dict(hf_model.state_dict())
  n = hf_config["n_positions"]
  state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, n, n, dtype=torch.uint8))
  state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
  torch.save(state, bin_dir / "pytorch_model.bin")
  cfg2, params2 = convert_hf.load_hf_checkpoint(str(bin_dir))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_live_export_loads_in_transformers(hf, tmp_path):
  """Our params -> save_hf_checkpoint -> HF from_pretrained gives our logits."""
  from transformers import ImageGPTForCausalImageModeling
  cfg = model.ModelConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16)
  # Random values in every leaf (the init's zero head and unit gains would hide mistakes);
  # drawn in numpy because compiling the jax init costs seconds.
  shapes = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
  convert_hf.save_hf_checkpoint(cfg, params, str(tmp_path))
  hf_model, info = ImageGPTForCausalImageModeling.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  x = _random_tokens(convert_hf.hf_config_from_model(cfg), batch=2)
  assert_parity(cfg, params, x, hf.hf_reference(hf_model.float().eval(), x))


def test_live_classifier_head(hf):
  """ImageGPTForImageClassification: our ln_f features, mean-pooled, times score.T."""
  import torch
  from transformers import ImageGPTConfig, ImageGPTForImageClassification
  hf_config = hf.hf_config_dict(1, 32, 2, 4)
  torch.manual_seed(0)
  clf = ImageGPTForImageClassification(
      ImageGPTConfig(**hf_config, num_labels=3, attn_implementation="eager")).float().eval()
  hf.randomize_(clf, seed=2)
  x = _random_tokens(hf_config)
  ids = np.concatenate([np.full((2, 1), 512), x[:, :-1]], axis=1)
  with torch.no_grad():
    want = clf(input_ids=torch.from_numpy(ids)).logits.numpy()
  cfg, params = convert_hf.params_from_hf_state_dict(clf.state_dict(), hf_config,
                                                  allow_missing_head=True)
  with jax.default_matmul_precision("highest"):
    _, hidden = _forward(cfg, params, x)
  got = np.asarray(hidden["ln_f"]).mean(1) @ convert_hf.hf_classifier_head(clf.state_dict())
  assert rel_err(got, want) <= RTOL
