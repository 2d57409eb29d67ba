"""Properties of igpt/model.py: causality, BERT mode, sizes, numerics, init, remat."""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpt import config as igpt_config
from igpt import kernels, model, sharding, spec
from igpt.errors import UserError

# A small model: 2 layers, width 64, 4 heads, 4x4 images.
SMALL = model.ModelConfig(num_layers=2, d_model=64, num_heads=4, seq_len=16)
_forward = jax.jit(model.apply, static_argnums=0)


def _shapes(cfg):
  """The params pytree as shapes, without running (or compiling) the initialisers."""
  return jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _params(cfg, seed=0):
  """Random params drawn in numpy (compiling the jax init costs seconds per config).

  Every leaf is random, the head included (the init's zero `wtet` would make every logit 0),
  with scales that keep activations O(1) and attention far from uniform.
  """
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = jax.tree_util.keystr(path)
    if name.endswith("['g']"):
      return 1 + 0.1 * rng.standard_normal(shape.shape, np.float32)
    if name in ("['wte']", "['wpe']", "['sos']"):
      return 0.5 * rng.standard_normal(shape.shape, np.float32)
    fan_in = cfg.d_model if "attn" in name or name == "['wtet']" else shape.shape[0]
    return rng.standard_normal(shape.shape, np.float32) / np.float32(math.sqrt(fan_in))

  return jax.tree_util.tree_map_with_path(draw, _shapes(cfg))


def _tokens(cfg, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.seq_len)), jnp.int32)


def _change(tokens, t):
  """Tokens with position t set to a different colour in every row."""
  return tokens.at[:, t].set((tokens[:, t] + 1 + tokens.shape[1]) % 512)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("t", [0, 5, SMALL.seq_len - 2])
def test_causal_logit_i_sees_only_tokens_before_i(t):
  """Logit i predicts x_i from x_<i: changing x_t leaves logits 0..t alone, changes t+1."""
  params, x = _params(SMALL), _tokens(SMALL)
  logits, _ = _forward(SMALL, params, x)
  logits2, _ = _forward(SMALL, params, _change(x, t))
  np.testing.assert_allclose(logits2[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-6)
  assert np.all(np.max(np.abs(logits2[:, t + 1] - logits[:, t + 1]), axis=-1) > 1e-3)


def test_causal_last_token_is_never_read():
  """SOS shift: the last pixel is dropped from the input, so it changes nothing."""
  params, x = _params(SMALL), _tokens(SMALL)
  logits, _ = _forward(SMALL, params, x)
  logits2, _ = _forward(SMALL, params, _change(x, SMALL.seq_len - 1))
  np.testing.assert_array_equal(logits2, logits)


def test_causal_embed_is_sos_then_shifted_tokens():
  params, x = _params(SMALL), _tokens(SMALL)
  _, hidden = _forward(SMALL, params, x)
  want = jnp.concatenate([jnp.broadcast_to(params["sos"], (2, 1, SMALL.d_model)),
                          params["wte"][x[:, :-1]]], axis=1) + params["wpe"]
  np.testing.assert_allclose(hidden["embed"], want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- BERT mode

BERT = model.ModelConfig(num_layers=2, d_model=64, num_heads=4, seq_len=16, causal=False)


def test_bert_sees_both_sides_and_has_no_sos():
  params, x = _params(BERT), _tokens(BERT)
  assert "sos" not in params and "sos" in _params(SMALL)
  logits, _ = _forward(BERT, params, x)
  logits2, _ = _forward(BERT, params, _change(x, BERT.seq_len - 1))
  # The last token reaches the first position (no causal mask, no shift).
  assert np.all(np.max(np.abs(logits2[:, 0] - logits[:, 0]), axis=-1) > 1e-3)


def test_bert_masked_tokens_are_zeroed():
  params, x = _params(BERT), _tokens(BERT)
  keep = jnp.asarray(np.random.default_rng(1).random(x.shape) > 0.3)
  keep = keep.at[:, 3].set(False)
  _, hidden = _forward(BERT, params, x, keep)
  embed = np.asarray(hidden["embed"])
  wpe = np.broadcast_to(np.asarray(params["wpe"]), embed.shape)
  masked = ~np.asarray(keep)
  # A masked position carries only its position embedding; kept ones their token too.
  np.testing.assert_array_equal(embed[masked], wpe[masked])
  np.testing.assert_allclose(embed[~masked], (params["wte"][x] + params["wpe"])[~masked],
                             rtol=1e-6, atol=1e-7)
  # So a masked token's colour cannot leak into any output.
  logits, _ = _forward(BERT, params, x, keep)
  logits2, _ = _forward(BERT, params, _change(x, 3), keep)
  np.testing.assert_array_equal(logits2, logits)


# ----------------------------------------------------------------------------- sizes

PAPER_COUNTS = {"s": 76_571_648, "m": 455_157_760, "l": 1_362_250_752, "xl": 6_801_438_720}


@pytest.mark.parametrize("size", sorted(PAPER_COUNTS))
def test_paper_param_counts(size):
  cfg = spec.model_config(igpt_config.paper_config(size))
  assert model.param_count(cfg) == PAPER_COUNTS[size]


def test_small_count_formula_pieces():
  """iGPT-S piece by piece. Per block 12 d^2 + 2 d (q, k, v, c_proj: 4 d^2; MLP 8 d^2; two
  gains); wte + wtet 2*512*d; wpe n*d; sos d and ln_f d. The spec writes the last term as
  `+ d`, which gives 76,571,136; both d-sized vectors are needed for 76,571,648."""
  cfg = spec.model_config(igpt_config.paper_config("s"))
  d, layers, n = cfg.d_model, cfg.num_layers, cfg.seq_len
  assert (d, layers, n, cfg.num_heads) == (512, 24, 1024, 8)
  shapes = _shapes(cfg)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  for i in range(layers):
    assert size(shapes[f"h_{i}"]) == 12 * d * d + 2 * d
  assert size(shapes["wte"]) + size(shapes["wtet"]) == 2 * 512 * d
  assert size(shapes["wpe"]) == n * d
  assert size(shapes["sos"]) + size(shapes["ln_f"]) == 2 * d
  assert 12 * d * d * layers + 2 * d * layers + 2 * 512 * d + n * d + 2 * d == 76_571_648
  assert size(shapes) == model.param_count(cfg) == 76_571_648


def test_bert_variant_has_no_sos():
  cfg = spec.model_config(igpt_config.paper_config("s"))
  bert = model.ModelConfig(**dict(vars(cfg), causal=False))
  assert model.param_count(bert) == model.param_count(cfg) - cfg.d_model


# ----------------------------------------------------------------------------- numerics


def test_bfloat16_compute_close_to_float32():
  """bf16 activations/matmuls, f32 params and norm statistics: logits within 5% of the
  largest |logit| (observed ~1-2%), finite, and returned as float32."""
  cfg16 = model.ModelConfig(**dict(vars(SMALL), dtype="bfloat16"))
  params16 = _shapes(cfg16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  params, x = _params(SMALL), _tokens(SMALL, batch=4)
  logits32, _ = _forward(SMALL, params, x)
  logits16, hidden16 = _forward(cfg16, params, x)
  assert logits16.dtype == jnp.float32 and hidden16["h_0"].dtype == jnp.bfloat16
  assert np.all(np.isfinite(logits16))
  err = np.max(np.abs(logits16 - logits32)) / np.max(np.abs(logits32))
  assert err < 5e-2, err


def test_remat_matches_exactly():
  """Rematerialisation recomputes the same ops: logits and grads agree (bit-identical on CPU;
  the tolerance only allows for reordered reductions on other backends)."""
  cfg_remat = model.ModelConfig(**dict(vars(SMALL), remat=True))
  params, x = _params(SMALL), _tokens(SMALL)

  def loss(cfg, p):
    logits, _ = model.apply(cfg, p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[..., None], -1))

  results = [jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(c, params)
             for c in (SMALL, cfg_remat)]
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  logits0, _ = _forward(SMALL, params, x)
  logits1, _ = _forward(cfg_remat, params, x)
  np.testing.assert_allclose(logits1, logits0, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- init


def test_init_statistics_match_spec():
  """TF init: wte N(0,.02), wpe N(0,.01), sos N(0,.02), q/k/v N(0,1/sqrt d), attention
  c_proj N(0,1/sqrt(d L)), MLP N(0,.02), wtet zeros, norm gains ones."""
  cfg = model.ModelConfig(num_layers=2, d_model=256, num_heads=4, seq_len=64)
  p = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
  d, layers = cfg.d_model, cfg.num_layers

  def check_std(x, want, tol=0.05):
    x = np.asarray(x)
    assert abs(x.std() / want - 1) < tol, (x.std(), want)
    assert abs(x.mean()) < 4 * want / math.sqrt(x.size)

  check_std(p["wte"], 0.02)
  check_std(p["wpe"], 0.01)
  check_std(p["sos"], 0.02, tol=0.25)  # only d samples
  for i in range(layers):
    attn, mlp = p[f"h_{i}"]["attn"], p[f"h_{i}"]["mlp"]
    for name in ("q", "k", "v"):
      check_std(attn[name], 1 / math.sqrt(d))
    check_std(attn["c_proj"], 1 / math.sqrt(d * layers))
    check_std(mlp["c_fc"], 0.02)
    check_std(mlp["c_proj"], 0.02)
    for norm in ("ln_1", "ln_2"):
      np.testing.assert_array_equal(p[f"h_{i}"][norm]["g"], 1.0)
  np.testing.assert_array_equal(p["ln_f"]["g"], 1.0)
  np.testing.assert_array_equal(p["wtet"], 0.0)
  # Distinct layers and q/k/v draw distinct values.
  assert not np.allclose(p["h_0"]["attn"]["q"], p["h_0"]["attn"]["k"])
  assert not np.allclose(p["h_0"]["attn"]["q"], p["h_1"]["attn"]["q"])


# ----------------------------------------------------------------------------------------
# The CPU kernels with hand-written backward passes equal the plain formulas.


def _value_and_grads(f, args, seed=1):
  """f(*args) and the gradient of a random projection of it with respect to every arg."""
  out = f(*args)
  probe = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32)
  grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * probe),
                   argnums=tuple(range(len(args))))(*args)
  return out, grads


def _assert_close(got, want, rtol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.max(np.abs(g - w)) <= rtol * np.max(np.abs(w)), np.max(np.abs(g - w))


@pytest.mark.slow
@pytest.mark.parametrize("causal, length", [(True, 200), (True, 64), (False, 200)])
def test_blocked_attention_matches_dot_product_attention(causal, length):
  # length 200 with block 64: several blocks and a ragged last one.
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (2 * jax.random.normal(key, (2, length, 3, 16), jnp.float32) for key in keys)
  reference = functools.partial(jax.nn.dot_product_attention, scale=1 / 4, is_causal=causal)
  blocked = functools.partial(kernels.blocked_attention, causal=causal, block=64)
  with jax.default_matmul_precision("highest"):
    _assert_close(_value_and_grads(blocked, (q, k, v)), _value_and_grads(reference, (q, k, v)),
                  rtol=1e-5)


def test_blocked_attention_keeps_compute_dtype():
  q = jnp.ones((1, 8, 2, 4), jnp.bfloat16)
  assert kernels.blocked_attention(q, q, q, causal=True).dtype == jnp.bfloat16


@pytest.mark.slow
def test_mlp_and_norm_backward_match_autodiff():
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (2, 5, 8), jnp.float32)
  w_fc = 0.3 * jax.random.normal(keys[1], (8, 32), jnp.float32)
  w_proj = 0.3 * jax.random.normal(keys[2], (32, 8), jnp.float32)
  g = 1 + 0.1 * jax.random.normal(keys[3], (8,), jnp.float32)

  def plain_mlp(x, w_fc, w_proj):
    h = x @ w_fc
    return (h * jax.nn.sigmoid(1.702 * h)) @ w_proj

  def plain_norm(x, g):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + model.NORM_EPS) * g

  with jax.default_matmul_precision("highest"):
    _assert_close(_value_and_grads(kernels.mlp, (x, w_fc, w_proj)),
                  _value_and_grads(plain_mlp, (x, w_fc, w_proj)), rtol=1e-5)
    _assert_close(_value_and_grads(kernels.rms_norm, (x, g)),
                  _value_and_grads(plain_norm, (x, g)), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Attention implementations (model.attention) and decode mode.
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_attention_choices_agree_on_cpu(causal):
  cfg = model.ModelConfig(num_layers=2, d_model=64, num_heads=4, seq_len=256, causal=causal,
                          attention="blocked")
  params = model.init_params(cfg, jax.random.key(0))
  params["wtet"] = 0.02 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  tokens = _tokens(cfg, batch=2)
  outs = {}
  for choice in ("auto", "blocked", "xla"):
    c = model.ModelConfig(**{**cfg.__dict__, "attention": choice})
    outs[choice] = model.apply(c, params, tokens)
  if jax.default_backend() == "cpu":
    assert model.ModelConfig(**{**cfg.__dict__, "attention": "auto"}).attention_implementation() == "blocked"
  for choice in ("auto", "xla"):
    for name in outs["blocked"][1]:
      _assert_close(outs[choice][1][name], outs["blocked"][1][name], rtol=1e-5)
    _assert_close(outs[choice][0], outs["blocked"][0], rtol=1e-5)


def test_attention_resolution_and_clear_errors():
  assert kernels.resolve_attention("auto", "bfloat16", 64, 1024, "gpu") == "cudnn"
  assert kernels.resolve_attention("auto", "float32", 64, 1024, "gpu") == "xla"
  assert kernels.resolve_attention("auto", "bfloat16", 12, 1024, "gpu") == "xla"
  assert kernels.resolve_attention("auto", "float32", 64, 1024, "cpu") == "blocked"
  cfg = model.ModelConfig(num_layers=1, d_model=64, num_heads=4, seq_len=16, attention="cudnn")
  with pytest.raises(ValueError, match="model.attention='cudnn' needs an NVIDIA GPU"):
    cfg.attention_implementation("cpu")
  with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype bfloat16"):
    cfg.attention_implementation("gpu")
  with pytest.raises(ValueError, match="model.attention='flash' is unknown"):
    model.ModelConfig(num_layers=1, d_model=64, num_heads=4, seq_len=16, attention="flash")


def test_splash_attention_resolution_and_clear_errors():
  # The paper's 16x16 .. 64x64 images at head sizes 64 .. 192 take the splash kernel on TPU.
  for seq_len in (256, 1024, 2304, 4096):
    for head_dim in (64, 96, 128, 192):
      for dtype in ("float32", "bfloat16"):
        assert kernels.resolve_attention("auto", dtype, head_dim, seq_len, "tpu") == "splash"
  # Lengths off its 128 tiles (4x4, 12x12 images) and float16 stay with XLA.
  for seq_len, dtype in ((16, "float32"), (144, "bfloat16"), (1024, "float16")):
    assert kernels.resolve_attention("auto", dtype, 64, seq_len, "tpu") == "xla"
  cfg = model.ModelConfig(num_layers=1, d_model=256, num_heads=4, seq_len=1024,
                          attention="splash")
  assert cfg.attention_implementation("tpu") == "splash"
  for backend in ("cpu", "gpu"):
    with pytest.raises(UserError, match=f"model.attention='splash' needs a TPU, but JAX runs "
                                        f"on '{backend}'"):
      cfg.attention_implementation(backend)
  for seq_len, dtype in ((16, "float32"), (1024, "float16")):
    bad = model.ModelConfig(**{**cfg.__dict__, "seq_len": seq_len, "dtype": dtype})
    with pytest.raises(UserError, match="model.attention='splash' needs a sequence length"):
      bad.attention_implementation("tpu")


@pytest.mark.slow
@pytest.mark.parametrize("causal, under_mesh", [(True, True), (False, False)])
def test_splash_attention_matches_xla_in_interpret_mode(causal, under_mesh):
  # The TPU kernel's own code run by Pallas' interpreter on CPU: length 256 is two 128-row
  # tiles, so the causal mask skips one key tile and masks inside the diagonal ones. Under a
  # (one-device) mesh the kernel runs in its shard_map, traced twice in one jit (value and
  # gradient): the kernel cached by the first trace must hold no tracers of it.
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (2 * jax.random.normal(key, (2, 256, 2, 32), jnp.float32) for key in keys)
  splash = functools.partial(kernels.splash_attention, causal=causal, interpret=True)
  xla = functools.partial(kernels.attention, causal=causal, implementation="xla")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  placed = jax.set_mesh(mesh) if under_mesh else contextlib.nullcontext()
  with (placed, nn.logical_axis_rules(sharding.DEFAULT_RULES),
        jax.default_matmul_precision("highest")):
    got = jax.jit(lambda *args: _value_and_grads(splash, args))(q, k, v)
    _assert_close(got, _value_and_grads(xla, (q, k, v)), rtol=1e-5)


def test_splash_attention_lowers_to_tpu_kernels():
  # Without a TPU, lowering is as far as the real kernel goes: Pallas turns it into Mosaic
  # TPU calls (forward, dq, dk/dv) at the paper's lengths and head sizes, ones that are not
  # multiples of the 128 lanes included. Mosaic's own compiler runs only on a TPU.
  for seq_len, head_dim, causal in ((256, 64, True), (2304, 96, False), (4096, 192, True)):
    x = jax.ShapeDtypeStruct((2, seq_len, 2, head_dim), jnp.bfloat16)

    def loss(q, k, v):
      return jnp.sum(kernels.attention(q, k, v, causal, "splash").astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3


@pytest.mark.slow
def test_decode_through_the_cache_matches_the_full_pass():
  cfg = model.ModelConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16, vocab_size=16)
  params = model.init_params(cfg, jax.random.key(0))
  params["wtet"] = 0.1 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  tokens = _tokens(cfg, batch=3)
  full, _ = model.apply(cfg, params, tokens)
  prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))  # the token before each position
  # One position at a time, then a 5-token prefill followed by chunks of 4, 4 and 3.
  cache, steps = model.init_cache(cfg, 3), []
  decode_one = jax.jit(lambda *args: model.decode(cfg, *args))  # one compile for every position
  for p in range(cfg.seq_len):
    logits, cache = decode_one(params, cache, prev[:, p:p + 1], jnp.int32(p))
    steps.append(logits)
  _assert_close(jnp.concatenate(steps, axis=1), full, rtol=1e-5)
  cache, chunks = model.init_cache(cfg, 3), []
  for start, end in ((0, 5), (5, 9), (9, 13), (13, 16)):
    logits, cache = model.decode(cfg, params, cache, prev[:, start:end], start)
    chunks.append(logits)
  _assert_close(jnp.concatenate(chunks, axis=1), full, rtol=1e-5)


def test_init_cache_has_the_layout_decode_declares():
  # init_cache builds the cache without tracing the model; a name or shape that drifted from
  # what `decode` declares would silently make decode allocate a fresh, full-length cache.
  cfg = model.ModelConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16, vocab_size=16,
                          dtype="bfloat16")
  tokens = jax.ShapeDtypeStruct((3, 1), jnp.int32)
  declared = jax.eval_shape(lambda t: model.IGPT(cfg, decode=True).init(jax.random.key(0), t),
                            tokens)["cache"]
  built = model.init_cache(cfg, 3)
  assert jax.tree.structure(built) == jax.tree.structure(declared)
  for b, d in zip(jax.tree.leaves(built), jax.tree.leaves(declared)):
    assert (b.shape, b.dtype) == (d.shape, d.dtype)
  params = model.init_params(cfg, jax.random.key(0))
  _, short = model.decode(cfg, params, model.init_cache(cfg, 3, 4), jnp.zeros((3, 1), jnp.int32), 0)
  assert jax.tree.leaves(short)[0].shape == (3, 4, 4, 8)  # decode kept the given length
