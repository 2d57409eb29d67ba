"""Importing OpenAI's original iGPT release: TF checkpoints, token files, the import command.

The checkpoints here are written by TensorFlow itself, the way the release's were (TF1 graph
variables under `model/`, Adam slots and global_step beside them, a sharded Saver), with random
values. Our forward pass on the imported params is compared, logits and every hidden state,
with a NumPy transcription of the release's graph (src/model.py of github.com/openai/image-gpt):
rel_err = max|ours - ref| / max|ref| <= 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from absl import flags

from igpt import model
from igpt.commands import import_openai
from igpt.convert import openai_tf
from igpt.readers import openai_npy
from test_parity import RTOL, _fixture_module, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_forward = jax.jit(model.apply, static_argnums=0)
NUM_SHARDS = 3
STEP = 1000000


# ----------------------------------------------------------------------------- release files


def release_variables(layers, d, heads, n, causal=True, seed=0) -> dict[str, np.ndarray]:
  """Random float32 variables with the release's names and shapes (scope included).

  Scales keep activations O(1) and attention far from uniform, so that a permuted weight
  changes the outputs visibly.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape, std=1.0: (std * rng.standard_normal(shape)).astype(np.float32)
  gain = lambda: (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)
  hd = d // heads
  v = {"model/wte": normal(512, d, std=0.5), "model/wpe": normal(n, d, std=0.5),
       "model/wtet": normal(512, d, std=d ** -0.5), "model/ln_f/g": gain()}
  if causal:
    v["model/sos"] = normal(d, std=0.5)
  for i in range(layers):
    b = f"model/h{i}/"
    v.update({b + "ln_1/g": gain(), b + "ln_2/g": gain(),
              b + "attn/c_proj": normal(heads, hd, d, std=d ** -0.5),
              b + "mlp/c_fc/w": normal(d, 4 * d, std=d ** -0.5),
              b + "mlp/c_proj/w": normal(4 * d, d, std=(4 * d) ** -0.5)})
    for w in "qkv":
      v[b + f"attn/{w}_proj"] = normal(heads, hd, d, std=1.5 * d ** -0.5)
  return v


def training_state(variables) -> dict[str, np.ndarray]:
  """Optimiser slots and counters as a training run leaves them beside the weights."""
  extra = {"global_step": np.array(STEP, np.int64), "beta1_power": np.float32(0.9),
           "beta2_power": np.float32(0.95)}
  for name in ("model/wte", "model/h0/attn/q_proj"):
    extra[name + "/Adam"] = np.zeros_like(variables[name])
    extra[name + "/Adam_1"] = np.ones_like(variables[name])
  extra["model/wpe/adam_m"] = np.zeros_like(variables["model/wpe"])
  return extra


def write_tf1_checkpoint(folder, variables: dict[str, np.ndarray], step=STEP,
                         shards=NUM_SHARDS) -> str:
  """Saves `variables` as a TF1 sharded checkpoint `folder/model.ckpt-<step>`; the prefix.

  A sharded Saver writes one data file per device holding variables, so the variables are
  spread over `shards` CPU devices of the session.
  """
  tf = pytest.importorskip("tensorflow")
  v1 = tf.compat.v1
  os.makedirs(folder, exist_ok=True)
  graph = tf.Graph()
  with graph.as_default():
    created = []
    for k, (name, value) in enumerate(sorted(variables.items())):
      with tf.device(f"/cpu:{k % shards}"):
        created.append(v1.Variable(value, name=name))
    assert [c.op.name for c in created] == sorted(variables)
    saver = v1.train.Saver(sharded=True)
    config = v1.ConfigProto(device_count={"CPU": shards})
    with v1.Session(graph=graph, config=config) as session:
      session.run(v1.global_variables_initializer())
      return saver.save(session, os.path.join(folder, "model.ckpt"), global_step=step)


# ----------------------------------------------------------------------------- NumPy reference


def _norm(x, g):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g


def _softmax(w):
  e = np.exp(w - w.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _attn(x, b, var, causal):
  q, k, v = (np.einsum("bsf,hef->bhse", x, var(b + f"attn/{w}_proj")) for w in "qkv")
  w = q @ np.swapaxes(k, -1, -2) / np.sqrt(v.shape[-1])
  if causal:
    n = w.shape[-1]
    keep = np.tril(np.ones((n, n)))
    w = w * keep - 1e10 * (1 - keep)
  return np.einsum("bhse,hef->bsf", _softmax(w) @ v, var(b + "attn/c_proj"))


def _mlp(x, b, var):
  h = x @ var(b + "mlp/c_fc/w")
  return (h / (1 + np.exp(-1.702 * h))) @ var(b + "mlp/c_proj/w")


def reference_forward(variables, x_BxN, causal):
  """The release's graph in float64 NumPy: (logits, {embed, block_i, ln_f})."""
  var = lambda name: variables["model/" + name].astype(np.float64)
  layers = len({k.split("/")[1] for k in variables if k.startswith("model/h")})
  h = var("wte")[x_BxN]
  if causal:
    sos = np.broadcast_to(var("sos"), (len(x_BxN), 1, h.shape[-1]))
    h = np.concatenate([sos, h[:, :-1]], axis=1)
  h = h + var("wpe")[:x_BxN.shape[1]]
  hidden = {"embed": h}
  for i in range(layers):
    b = f"h{i}/"
    h = h + _attn(_norm(h, var(b + "ln_1/g")), b, var, causal)
    h = h + _mlp(_norm(h, var(b + "ln_2/g")), b, var)
    hidden[f"block_{i}"] = h
  hidden["ln_f"] = _norm(h, var("ln_f/g"))
  return hidden["ln_f"] @ var("wtet").T, hidden


def _by_reference_name(hidden: dict, prefix: str = "") -> dict:
  """`hidden` (keys after `prefix`) under the reference's names: block outputs are matched by
  their index suffix (`block_3`, `h_3`), whatever the other side calls them."""
  out = {}
  for key, value in hidden.items():
    if not key.startswith(prefix):
      continue
    name = key[len(prefix):]
    index = name.rsplit("_", 1)[-1]
    out[f"block_{index}" if name not in ("embed", "ln_f") and index.isdigit() else name] = value
  return out


def compare(logits, hidden, ref_logits, ref_hidden) -> dict[str, float]:
  """rel_err per output (every hidden state and the logits) against the reference."""
  hidden = _by_reference_name(hidden)
  assert set(hidden) == set(ref_hidden), (sorted(hidden), sorted(ref_hidden))
  errs = {k: rel_err(hidden[k], ref_hidden[k]) for k in ref_hidden}
  errs["logits"] = rel_err(logits, ref_logits)
  return errs


def release_errors(cfg, params, variables, x) -> dict[str, float]:
  """rel_err of our forward pass against the reference, per output."""
  with jax.default_matmul_precision("highest"):
    logits, hidden = _forward(cfg, params, x)
  return compare(logits, hidden, *reference_forward(variables, x, cfg.causal))


# ----------------------------------------------------------------------------- fixtures


AR_SHAPE = dict(layers=2, d=32, heads=4, n=16)  # 4x4 images, head_dim 8
BERT_SHAPE = dict(layers=3, d=24, heads=3, n=64)  # 8x8 images, head_dim 8


@pytest.fixture(scope="module")
def ar_release(tmp_path_factory):
  """(prefix, model variables) of a sharded autoregressive checkpoint with training state."""
  variables = release_variables(**AR_SHAPE, seed=1)
  folder = tmp_path_factory.mktemp("igpt-s")
  prefix = write_tf1_checkpoint(folder, {**variables, **training_state(variables)})
  return prefix, variables


@pytest.fixture(scope="module")
def bert_release(tmp_path_factory):
  variables = release_variables(**BERT_SHAPE, causal=False, seed=2)
  prefix = write_tf1_checkpoint(tmp_path_factory.mktemp("igpt-s-bert"), variables, shards=2)
  return prefix, variables


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(3).integers(0, 512, (3, 64), dtype=np.int32)


@pytest.fixture
def palette_file(tmp_path):
  centers = np.random.default_rng(4).uniform(-1, 1, (512, 3)).astype(np.float32)
  path = tmp_path / "kmeans_centers.npy"
  np.save(path, centers)
  return str(path)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_sharded_like_the_release(ar_release):
  prefix, _ = ar_release
  assert os.path.basename(prefix) == f"model.ckpt-{STEP}"
  files = sorted(os.listdir(os.path.dirname(prefix)))
  shards = [f for f in files if ".data-" in f]
  assert shards == [f"model.ckpt-{STEP}.data-{i:05d}-of-{NUM_SHARDS:05d}" for i in range(3)]
  assert f"model.ckpt-{STEP}.index" in files and f"model.ckpt-{STEP}.meta" in files
  # The index as read here: every variable, and shards exactly as long as their tensors.
  num_shards, where = openai_tf.read_index(prefix + ".index")
  tf = pytest.importorskip("tensorflow")
  assert num_shards == NUM_SHARDS
  assert set(where) == set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
  for i, shard in enumerate(shards):
    end = max(offset + size for s, offset, size in where.values() if s == i)
    assert end == os.path.getsize(os.path.join(os.path.dirname(prefix), shard))


def test_ar_checkpoint_matches_release_graph(ar_release, tokens):
  prefix, variables = ar_release
  cfg, params = openai_tf.load_tf_checkpoint(prefix)
  assert cfg == model.ModelConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16)
  init = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(init)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(init)):
    assert got.shape == want.shape and got.dtype == np.float32
  errs = release_errors(cfg, params, variables, tokens[:, :16])
  assert max(errs.values()) <= RTOL, errs
  assert openai_tf.checkpoint_step(prefix) == STEP


def test_bert_checkpoint_matches_release_graph(bert_release, tokens):
  prefix, variables = bert_release
  cfg, params = openai_tf.load_tf_checkpoint(prefix)
  assert cfg == model.ModelConfig(num_layers=3, d_model=24, num_heads=3, seq_len=64,
                                  causal=False)
  assert "sos" not in params
  errs = release_errors(cfg, params, variables, tokens)
  assert max(errs.values()) <= RTOL, errs


@pytest.mark.parametrize("wrong", [
    lambda w: np.ascontiguousarray(w.reshape(-1, w.shape[-1]).reshape(w.shape[2], *w.shape[:2])),
    lambda w: np.ascontiguousarray(np.transpose(w, (2, 1, 0)).reshape(w.shape[2], *w.shape[:2])),
], ids=["reshape-without-transpose", "heads-and-head-dim-swapped"])
def test_wrong_qkv_mapping_fails_the_check(ar_release, tokens, monkeypatch, wrong):
  prefix, variables = ar_release
  monkeypatch.setattr(openai_tf, "qkv_to_ours", wrong)
  cfg, params = openai_tf.load_tf_checkpoint(prefix)
  errs = release_errors(cfg, params, variables, tokens[:, :16])
  assert errs["logits"] > 1e-2 and errs["block_0"] > 1e-2, errs


def test_checkpoint_files_given_other_ways(ar_release):
  prefix, _ = ar_release
  assert openai_tf.resolve_prefix(prefix + ".index") == prefix
  assert openai_tf.resolve_prefix(prefix + ".data-00001-of-00003") == prefix
  assert openai_tf.resolve_prefix(os.path.dirname(prefix)) == prefix


def test_missing_tensorflow_names_the_extra(ar_release, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
  with pytest.raises(ImportError, match=r'pip install -e "\.\[openai\]"'):
    openai_tf.load_tf_checkpoint(ar_release[0])


def test_wrong_prefix_and_missing_shard(tmp_path, ar_release):
  with pytest.raises(FileNotFoundError, match=r"nope/model\.ckpt-5.*\.index.*\.data-00000"):
    openai_tf.load_tf_checkpoint(str(tmp_path / "nope" / "model.ckpt-5"))
  with pytest.raises(FileNotFoundError, match="0 checkpoints"):
    openai_tf.load_tf_checkpoint(str(tmp_path))
  prefix, _ = ar_release
  partial = tmp_path / "partial"
  partial.mkdir()
  for f in os.listdir(os.path.dirname(prefix)):
    if not f.endswith("data-00001-of-00003"):
      os.symlink(os.path.join(os.path.dirname(prefix), f), partial / f)
  with pytest.raises(FileNotFoundError, match=r"shard .*model\.ckpt-1000000\.data-00001-of-00003"):
    openai_tf.load_tf_checkpoint(str(partial / f"model.ckpt-{STEP}"))


def _shapes(variables):
  return {k[len("model/"):]: v.shape for k, v in variables.items()}


def test_layout_errors_name_the_variable():
  """Shape-level checks, without TensorFlow (the same calls load_tf_checkpoint makes)."""
  good = _shapes(release_variables(**AR_SHAPE))
  check = lambda s: openai_tf.check_variables(openai_tf.infer_config(s), s)
  check(good)
  gpt2 = {"wte": (512, 32), "wpe": (16, 32), "h0/attn/c_attn/w": (1, 32, 96),
          "h0/ln_1/g": (32,), "h0/ln_1/b": (32,), "ln_f/g": (32,), "ln_f/b": (32,)}
  with pytest.raises(ValueError, match="not an iGPT checkpoint"):
    check(gpt2)
  with pytest.raises(ValueError, match=r"missing variable model/h1/ln_2/g"):
    check({k: s for k, s in good.items() if k != "h1/ln_2/g"})
  with pytest.raises(ValueError, match=r"missing variable model/h1/attn/c_proj.*4 missing"):
    check({k: s for k, s in good.items() if not k.startswith("h1/attn/")})
  with pytest.raises(ValueError, match=r"unexpected variable model/h0/attn/bias"):
    check(dict(good, **{"h0/attn/bias": (32,)}))
  with pytest.raises(ValueError, match=r"unexpected variable model/clf/wclf"):
    check(dict(good, **{"clf/wclf": (10, 32)}))
  with pytest.raises(ValueError, match=r"model/h1/mlp/c_fc/w has shape \(32, 96\), expected "
                                       r"\(32, 128\)"):
    check(dict(good, **{"h1/mlp/c_fc/w": (32, 96)}))
  with pytest.raises(ValueError, match=r"model/wpe has 15 positions"):
    check(dict(good, **{"wpe": (15, 32)}))
  with pytest.raises(ValueError, match=r"model/h0/attn/q_proj has shape \(4, 8, 24\)"):
    check(dict(good, **{"h0/attn/q_proj": (4, 8, 24)}))


def test_training_state_is_recognised():
  skip = openai_tf.is_training_state
  assert all(map(skip, ["global_step", "beta1_power", "model/wte/Adam", "model/wte/Adam_1",
                        "model/h3/attn/q_proj/adam_v", "model/h0/ln_1/g/adam_m"]))
  assert not any(map(skip, ["model/wte", "model/h0/attn/q_proj", "model/adam"]))


def test_gpt2_checkpoint_is_refused(tmp_path):
  rng = np.random.default_rng(0)
  gpt2 = {"model/wte": rng.standard_normal((50, 8)), "model/wpe": rng.standard_normal((16, 8)),
          "model/h0/attn/c_attn/w": rng.standard_normal((1, 8, 24)),
          "model/h0/attn/c_attn/b": np.zeros(24), "model/ln_f/g": np.ones(8)}
  prefix = write_tf1_checkpoint(tmp_path, {k: v.astype(np.float32) for k, v in gpt2.items()},
                                shards=1)
  with pytest.raises(ValueError, match="not an iGPT checkpoint"):
    openai_tf.load_tf_checkpoint(prefix)


# ----------------------------------------------------------------------------- token files


def _write_tokens(folder, name="cifar10", tag="tr", n=6, side=4, classes=10, seed=0,
                  x_dtype=np.uint16, y_dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 512, (n, side * side)).astype(x_dtype)
  labels = rng.integers(0, classes, n)
  y = np.eye(classes, dtype=y_dtype)[labels]
  np.save(os.path.join(folder, f"{name}_{tag}X.npy"), x)
  np.save(os.path.join(folder, f"{name}_{tag}Y.npy"), y)
  return x, labels


def test_token_source_returns_exact_tokens_and_labels(tmp_path):
  x, labels = _write_tokens(tmp_path)
  vx, vlabels = _write_tokens(tmp_path, tag="va", n=4, seed=1, x_dtype=np.int64, y_dtype=np.uint8)
  src = openai_npy.token_source(str(tmp_path), "cifar10", "train")
  assert (len(src), src.image_side, src.num_classes) == (6, 4, 10)
  assert isinstance(src._tokens, np.memmap)  # not read into memory
  assert "cifar10 train" in src.description
  got_x, got_y = src.get_tokens([5, 0, 2])
  assert got_x.dtype == np.int32 and got_y.dtype == np.int32
  np.testing.assert_array_equal(got_x, x[[5, 0, 2]])
  np.testing.assert_array_equal(got_y, labels[[5, 0, 2]])
  # The release's own way: a path prefix.
  val = openai_npy.token_source(str(tmp_path / "cifar10"), split="val")
  np.testing.assert_array_equal(val.get_tokens(np.arange(4))[0], vx)
  np.testing.assert_array_equal(val.get_tokens(np.arange(4))[1], vlabels)
  with pytest.raises(IndexError, match=r"\[0, 6\)"):
    src.get_tokens([6])


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((4, 16), np.float32), np.eye(10)[:4], "integer array"),
    (np.zeros((4, 15), np.int32), np.eye(10)[:4], "15 tokens per image is not a square"),
    (np.zeros((4, 4, 4), np.int32), np.eye(10)[:4], r"shape \(4, 4, 4\)"),
    (np.full((4, 16), 512, np.int32), np.eye(10)[:4], r"image 0 has a token outside \[0, 512\)"),
    (np.full((4, 16), -1, np.int32), np.eye(10)[:4], "token outside"),
    (np.zeros((4, 16), np.int32), np.eye(10)[:3], "4 token rows but 3 label rows"),
    (np.zeros((4, 16), np.int32), np.arange(4), r"labels must be one-hot numbers \[N, classes\]"),
    (np.zeros((4, 16), np.int32), 2 * np.eye(10)[:4], "label row 0 is not one-hot"),
    (np.zeros((4, 16), np.int32), np.ones((4, 10)), "label row 0 is not one-hot"),
])
def test_token_source_errors(tmp_path, x, y, match):
  np.save(tmp_path / "cifar10_teX.npy", x)
  np.save(tmp_path / "cifar10_teY.npy", y)
  with pytest.raises(ValueError, match=match) as info:
    openai_npy.token_source(str(tmp_path), "cifar10", "test")
  assert "cifar10_teX.npy" in str(info.value)


def test_large_token_files_are_checked_per_batch(tmp_path, monkeypatch):
  x, _ = _write_tokens(tmp_path, n=8)
  x[5, 3] = 700
  np.save(tmp_path / "cifar10_trX.npy", x)
  monkeypatch.setattr(openai_npy, "_EAGER_CHECK_BYTES", 0)
  src = openai_npy.token_source(str(tmp_path), "cifar10", "train")  # no full scan
  src.get_tokens([0, 1, 7])
  with pytest.raises(ValueError, match=r"image 5 has a token outside \[0, 512\) .*max 700"):
    src.get_tokens([1, 5])


def test_token_source_missing_file_and_bad_split(tmp_path):
  _write_tokens(tmp_path)
  os.remove(tmp_path / "cifar10_trY.npy")
  with pytest.raises(FileNotFoundError, match=r"cifar10_trY\.npy"):
    openai_npy.token_source(str(tmp_path), "cifar10", "train")
  with pytest.raises(FileNotFoundError, match=r"imagenet_vaX\.npy"):
    openai_npy.token_source(str(tmp_path), "imagenet", "val")
  with pytest.raises(ValueError, match="split='valid'"):
    openai_npy.token_source(str(tmp_path), "cifar10", "valid")
  with pytest.raises(ValueError, match="name the dataset"):
    openai_npy.token_source(str(tmp_path), None, "train")
  (tmp_path / "cifar10_teX.npy").write_bytes(b"not an array")
  _write_tokens(tmp_path, tag="te")
  (tmp_path / "cifar10_teY.npy").write_bytes(b"not an array")
  with pytest.raises(ValueError, match=r"cifar10_teY\.npy' is not a readable \.npy"):
    openai_npy.token_source(str(tmp_path), "cifar10", "test")


# ----------------------------------------------------------------------------- the command


def _fake_run_module(fail_after_first_file=False):
  """Stands in for igpt.trained: save_run writes the files it is given, as plain .npy/.json."""
  saved = {}

  def save_run(workdir, config, palette_centers, params, step):
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json())
    if fail_after_first_file:
      raise OSError("No space left on device")
    np.save(os.path.join(workdir, "palette.npy"), palette_centers)
    saved.update(config=config, palette=palette_centers, params=params, step=step)

  return types.SimpleNamespace(save_run=save_run), saved


@pytest.fixture
def fake_run(monkeypatch):
  import igpt
  fake, saved = _fake_run_module()
  monkeypatch.setitem(sys.modules, "igpt.trained", fake)
  monkeypatch.setattr(igpt, "trained", fake, raising=False)
  return saved


COMMAND_FLAGS = ("checkpoint", "palette", "out", "hf_out")


def cli(argv):
  """Runs the command in this process; its exit status (output: the caller's capsys).

  The command's flags are defined for the call only, as the entry point defines them.
  """
  flags.FLAGS.unparse_flags()
  import_openai.define_flags()
  try:
    rest = import_openai.parse_flags(["import_openai", *argv])
    import_openai.main(rest)
  except SystemExit as e:
    return e.code
  finally:
    for name in COMMAND_FLAGS:
      delattr(flags.FLAGS, name)
  return 0


def _assert_one_line_error(capsys, code, match):
  err = capsys.readouterr().err
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert match in lines[0], lines[0]


def test_import_writes_run_folder(ar_release, palette_file, tmp_path, fake_run, capsys):
  prefix, _ = ar_release
  out = tmp_path / "runs" / "igpt_s_openai"
  out.parent.mkdir()
  assert cli(["--checkpoint", prefix, "--palette", palette_file, "--out", str(out)]) == 0
  assert sorted(os.listdir(out.parent)) == ["igpt_s_openai"]  # no temp folder left
  assert sorted(os.listdir(out)) == ["config.json", "palette.npy"]
  c = fake_run["config"]
  assert (c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.image_side) == (
      2, 32, 4, 4)
  assert (c.objective, c.model.vocab_size, c.data.palette_size) == ("ar", 512, 512)
  assert c.data.palette_path == palette_file
  assert fake_run["step"] == STEP
  np.testing.assert_array_equal(fake_run["palette"], np.load(palette_file))
  _, params = openai_tf.load_tf_checkpoint(prefix)
  jax.tree.map(np.testing.assert_array_equal, fake_run["params"], params)


def test_import_bert_sets_objective(bert_release, palette_file, tmp_path, fake_run, capsys):
  out = tmp_path / "bert"
  assert cli(["--checkpoint", bert_release[0], "--palette", palette_file, "--out", str(out)]) == 0
  assert fake_run["config"].objective == "bert"
  assert fake_run["config"].model.image_side == 8


def _bad_palette(tmp_path, value):
  path = tmp_path / "bad_palette.npy"
  np.save(path, value)
  return str(path)


@pytest.mark.parametrize("case", ["no-tensorflow", "wrong-prefix", "gpt2", "missing-variable",
                                  "misshapen-variable", "palette-shape", "palette-range",
                                  "palette-nan", "out-exists", "bert-hf-out", "flag-missing",
                                  "disk-full"])
def test_import_errors_are_one_line_and_leave_nothing(case, ar_release, bert_release,
                                                      palette_file, tmp_path, fake_run,
                                                      monkeypatch, capsys):
  ar_prefix, variables = ar_release
  work = tmp_path / "work"
  work.mkdir()
  out = work / "out"
  args = {"--checkpoint": ar_prefix, "--palette": palette_file, "--out": str(out)}
  match = {
      "no-tensorflow": '.[openai]', "wrong-prefix": "no TensorFlow checkpoint at prefix",
      "gpt2": "not an iGPT checkpoint", "missing-variable": "missing variable model/h1/ln_2/g",
      "misshapen-variable": "model/h0/mlp/c_proj/w has shape (100, 32)",
      "palette-shape": "(256, 3)", "palette-range": "[-1, 1]", "palette-nan": "NaN",
      "out-exists": "already exists", "bert-hf-out": "BERT", "flag-missing": "--palette",
      "disk-full": "No space left on device"}[case]
  if case == "no-tensorflow":
    monkeypatch.setitem(sys.modules, "tensorflow", None)
  elif case == "wrong-prefix":
    args["--checkpoint"] = str(tmp_path / "downloads" / "model.ckpt-1000000")
  elif case in ("gpt2", "missing-variable", "misshapen-variable"):
    v = dict(variables)
    if case == "gpt2":
      v = {k: x for k, x in v.items() if not k.endswith(("wtet", "_proj"))}
      v["model/h0/attn/c_attn/w"] = np.zeros((1, 32, 96), np.float32)
    elif case == "missing-variable":
      del v["model/h1/ln_2/g"]
    else:
      v["model/h0/mlp/c_proj/w"] = np.zeros((100, 32), np.float32)
    args["--checkpoint"] = write_tf1_checkpoint(tmp_path / "ckpt", v, shards=1)
  elif case == "palette-shape":
    args["--palette"] = _bad_palette(tmp_path, np.zeros((256, 3), np.float32))
  elif case == "palette-range":
    args["--palette"] = _bad_palette(tmp_path, np.full((512, 3), 127.0, np.float32))
  elif case == "palette-nan":
    args["--palette"] = _bad_palette(tmp_path, np.full((512, 3), np.nan, np.float32))
  elif case == "out-exists":
    out.mkdir()
  elif case == "bert-hf-out":
    args["--checkpoint"] = bert_release[0]
    args["--hf_out"] = str(work / "hf")
  elif case == "flag-missing":
    del args["--palette"]
  elif case == "disk-full":
    import igpt
    failing, _ = _fake_run_module(fail_after_first_file=True)
    monkeypatch.setitem(sys.modules, "igpt.trained", failing)
    monkeypatch.setattr(igpt, "trained", failing)
  before = sorted(os.listdir(work))
  code = cli([x for kv in args.items() for x in kv])
  _assert_one_line_error(capsys, code, match)
  assert sorted(os.listdir(work)) == before  # no output, no temp folder


def _truncate(path, fraction):
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * fraction))


def _flip_inside(prefix, variable):
  """Inverts 64 bytes in the middle of `variable`'s bytes in its data shard; the shard."""
  num_shards, where = openai_tf.read_index(prefix + ".index")
  shard, offset, size = where[variable]
  path = openai_tf.shard_path(prefix, shard, num_shards)
  with open(path, "r+b") as f:
    f.seek(offset + size // 2)
    region = f.read(64)
    f.seek(offset + size // 2)
    f.write(bytes(b ^ 0xFF for b in region))
  return path


SHARD = f"model.ckpt-{STEP}.data-00001-of-{NUM_SHARDS:05d}"
INDEX = f"model.ckpt-{STEP}.index"


@pytest.mark.parametrize("case,file,match", [
    ("shard-half", SHARD, "is cut off: it holds"),
    ("shard-empty", SHARD, "is cut off: it holds 0 bytes"),
    ("shard-flipped", None, "Checksum does not match"),  # TF checks each tensor's crc32c
    ("index-half", INDEX, "not an sstable"),
    ("index-empty", INDEX, "too short"),
])
def test_damaged_release_files_are_named(case, file, match, ar_release, palette_file, tmp_path,
                                         fake_run, capsys):
  source = os.path.dirname(ar_release[0])
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  for f in os.listdir(source):
    shutil.copy(os.path.join(source, f), downloads / f)
  prefix = str(downloads / f"model.ckpt-{STEP}")
  if case == "shard-flipped":
    damaged = _flip_inside(prefix, "model/wte")
  else:
    damaged = str(downloads / file)
    _truncate(damaged, 0.5 if case.endswith("half") else 0)
  work = tmp_path / "work"
  work.mkdir()
  code = cli(["--checkpoint", prefix, "--palette", palette_file, "--out", str(work / "out")])
  line = capsys.readouterr().err.strip()
  assert code == 2 and len(line.splitlines()) == 1 and line.startswith("error: "), line
  assert repr(damaged) in line and match in line and "download it again" in line, line
  assert not os.listdir(work)


def test_short_shard_is_reported_without_the_index_sizes(tmp_path, ar_release, monkeypatch):
  """Where the index cannot be parsed here, TF's bare short-read IndexError still becomes a
  UserError."""
  source = os.path.dirname(ar_release[0])
  for f in os.listdir(source):
    shutil.copy(os.path.join(source, f), tmp_path / f)
  _truncate(tmp_path / SHARD, 0.5)

  def unreadable(path):
    raise ValueError(f"{path!r} is not a readable table")

  monkeypatch.setattr(openai_tf, "read_index", unreadable)
  with pytest.raises(ValueError, match=r"cannot read model/.* from checkpoint shard .*\.data-\*.*"
                                       r"Read less bytes than requested.*download it again"):
    openai_tf.load_tf_checkpoint(str(tmp_path / f"model.ckpt-{STEP}"))


def test_debug_flag_shows_the_exception(tmp_path, palette_file):
  with pytest.raises(FileNotFoundError):
    cli(["--checkpoint", str(tmp_path / "nope"), "--palette", palette_file,
         "--out", str(tmp_path / "out"), "--debug"])


def test_command_line_error_in_a_fresh_process(tmp_path, palette_file):
  """The real entry point (absl app.run): one stderr line, exit status 2."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, "-m", "igpt.import_openai", "--checkpoint", str(tmp_path / "model.ckpt-1"),
       "--palette", palette_file, "--out", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: no TensorFlow checkpoint at prefix '{tmp_path / 'model.ckpt-1'}': expected "
      f"{tmp_path / 'model.ckpt-1'}.index and {tmp_path / 'model.ckpt-1'}.data-00000-of-000NN "
      "... (the .meta file is not needed)."]
  assert not os.path.exists(tmp_path / "out")


def test_importing_the_command_defines_no_flags():
  """Only running the entry point defines them, so other commands can share the names."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  code = ("import igpt.import_openai, igpt.commands.import_openai\n"
          "from absl import flags\n"
          f"defined = [n for n in {COMMAND_FLAGS!r} if n in flags.FLAGS]\n"
          "assert not defined, defined")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr


def test_imported_run_loads_back(ar_release, palette_file, tmp_path, tokens, capsys):
  """Through the real igpt.trained."""
  from igpt import trained  # noqa: PLC0415
  prefix, variables = ar_release
  out = tmp_path / "run"
  assert cli(["--checkpoint", prefix, "--palette", palette_file, "--out", str(out)]) == 0
  loaded = trained.load_run(str(out))
  assert loaded.step == STEP and loaded.model_cfg.causal
  np.testing.assert_array_equal(loaded.palette, np.load(palette_file))
  params = jax.tree.map(np.asarray, loaded.params)
  errs = release_errors(loaded.model_cfg, params, variables, tokens[:, :16])
  assert max(errs.values()) <= RTOL, errs


@pytest.mark.slow
def test_hf_export_of_imported_checkpoint(ar_release, palette_file, tmp_path, fake_run, tokens,
                                          capsys):
  """--hf_out loads in transformers and gives the release graph's logits and hidden states."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  prefix, variables = ar_release
  hf_out = tmp_path / "hf"
  assert cli(["--checkpoint", prefix, "--palette", palette_file, "--out", str(tmp_path / "run"),
              "--hf_out", str(hf_out)]) == 0
  assert sorted(os.listdir(tmp_path)) == ["hf", "kmeans_centers.npy", "run"]
  hf_model, info = transformers.ImageGPTForCausalImageModeling.from_pretrained(
      str(hf_out), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  x = tokens[:, :16]
  hf = _fixture_module().hf_reference(hf_model.float().eval(), x)
  errs = compare(hf["logits"], _by_reference_name(hf, "hidden/"),
                 *reference_forward(variables, x, causal=True))
  assert max(errs.values()) <= RTOL, errs
