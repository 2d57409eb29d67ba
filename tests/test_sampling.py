"""The sampler (igpt.sampling) and sample.py: cache equivalence, controls, determinism, CLI."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from igpt import model, sampling, trained
from igpt.errors import UserError
from igpt.commands import sample as sample_cli
from igpt.convert import hf as convert_hf
import train_helpers

SAMPLE_PY = os.path.join(train_helpers.REPO, "sample.py")


@functools.lru_cache(maxsize=None)
def _model(num_layers=2, d_model=32, num_heads=4, seq_len=16, vocab_size=16, seed=0):
  """A random causal model whose output head is not zero (so the logits are not flat)."""
  cfg = model.ModelConfig(num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                          seq_len=seq_len, vocab_size=vocab_size)
  params = model.init_params(cfg, jax.random.key(seed))
  params["wtet"] = 0.3 * jax.random.normal(jax.random.key(seed + 1), params["wtet"].shape)
  return cfg, params


def _tokens(cfg, batch, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.seq_len)),
                     jnp.int32)


def _assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want)), np.max(np.abs(got - want))


_decode = jax.jit(model.decode, static_argnums=0)
_prefill = jax.jit(model.decode, static_argnums=(0, 4))
_apply = jax.jit(lambda cfg, params, tokens: model.apply(cfg, params, tokens)[0], static_argnums=0)


# ------------------------------------------------------------------------------------------
# The cache


def test_cached_decoding_matches_the_full_pass():
  cfg, params = _model()
  tokens = _tokens(cfg, batch=3)
  full = _apply(cfg, params, tokens)
  prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))  # the token before each position
  # One token at a time through a cache that grows like the sampler's (8, then 16).
  cache, steps = model.init_cache(cfg, 3, 8), []
  for p in range(cfg.seq_len):
    if p == 8:
      cache = model.pad_cache(cache, 16)
    logits, cache = _decode(cfg, params, cache, prev[:, p:p + 1], jnp.int32(p))
    steps.append(logits)
  _assert_close(jnp.concatenate(steps, axis=1), full, rtol=1e-5)
  # An 8-token prefill (static start 0), then two chunks of 4 at traced starts.
  chunks = [_prefill(cfg, params, model.init_cache(cfg, 3), prev[:, :8], 0)]
  for start in (8, 12):
    chunks.append(_decode(cfg, params, chunks[-1][1], prev[:, start:start + 4], jnp.int32(start)))
  _assert_close(jnp.concatenate([c[0] for c in chunks], axis=1), full, rtol=1e-5)


def test_greedy_sampling_is_the_argmax_of_the_full_pass():
  cfg, params = _model()
  prompt = _tokens(cfg, batch=2)[:, :5]
  got = sampling.sample(cfg, params, prompt, jax.random.key(0), sampling.Settings(greedy=True))
  want = jnp.pad(prompt, ((0, 0), (0, cfg.seq_len - 5)))
  for p in range(5, cfg.seq_len):
    logits = _apply(cfg, params, want)
    want = want.at[:, p].set(jnp.argmax(logits[:, p], axis=-1))
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------
# Sampling controls


@pytest.mark.slow
def test_sampled_frequencies_match_the_softmax():
  # Only the last position is sampled, 8,000 times after the same prompt.
  cfg, params = _model(num_layers=1, d_model=16, num_heads=2, seq_len=6, vocab_size=6)
  prompt = jnp.tile(_tokens(cfg, batch=1)[:, :5], (8_000, 1))
  temperature = 0.7
  logits = _apply(cfg, params, jnp.pad(prompt[:1], ((0, 0), (0, 1))))[0, 5]
  expected = np.asarray(jax.nn.softmax(logits / temperature), np.float64)
  expected /= expected.sum()
  assert expected.max() < 0.9  # a distribution worth testing
  tokens = sampling.sample(cfg, params, prompt, jax.random.key(7),
                           sampling.Settings(temperature=temperature))
  np.testing.assert_array_equal(tokens[:, :5], prompt)
  counts = np.bincount(np.asarray(tokens[:, 5]), minlength=cfg.vocab_size)
  assert stats.chisquare(counts, expected * counts.sum()).pvalue > 1e-3


def test_top_k_never_leaves_the_top_k():
  logits = jax.random.normal(jax.random.key(0), (64, 32))
  noise = jax.random.gumbel(jax.random.key(1), (200, 64, 32))
  draw = jax.vmap(lambda g_BxV: sampling.sample_token(logits, g_BxV, sampling.Settings(top_k=3)))
  tokens = np.asarray(draw(noise))  # [200, 64]
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  assert all(set(tokens[:, b]) <= set(top3[b]) for b in range(64))
  assert len(set(tokens[:, 0])) == 3  # and it does use all three


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (50, 20)) * 2)
  for top_p in (0.1, 0.5, 0.9, 1.0):
    kept = np.isfinite(sampling.filter_logits(jnp.asarray(logits), 1.0, 0, top_p))
    for row, keep in zip(logits, np.asarray(kept)):
      order = np.argsort(-row)
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      mass = np.cumsum(probs[order])
      size = int(np.searchsorted(mass, top_p - 1e-6)) + 1  # first prefix reaching p
      assert set(np.flatnonzero(keep)) == set(order[:min(size, len(row))]), top_p


def test_settings_are_checked():
  for bad, match in ((dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
                     (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")):
    with pytest.raises(ValueError, match=match):
      sampling.Settings(**bad).check()
  sampling.Settings(temperature=0.0, greedy=True).check()


# ------------------------------------------------------------------------------------------
# Completion and determinism


@pytest.mark.slow
def test_completion_keeps_the_prompt_and_the_seed_fixes_the_images():
  cfg, params = _model()
  prompt = _tokens(cfg, batch=4)[:, :6]
  run = lambda seed: np.asarray(sampling.sample(cfg, params, prompt, jax.random.key(seed)))
  a, b, c = run(1), run(1), run(2)
  np.testing.assert_array_equal(a[:, :6], prompt)
  np.testing.assert_array_equal(a, b)
  assert (a[:, 6:] != c[:, 6:]).any()
  # The segmentation does not change the draws.
  d = sampling.sample(cfg, params, prompt, jax.random.key(1), segment_len=8)
  np.testing.assert_array_equal(a, d)
  # Nor does a prompt that ends inside a later segment (positions 10.. of segments of 4).
  long_prompt = _tokens(cfg, batch=4)[:, :10]
  e, f = (np.asarray(sampling.sample(cfg, params, long_prompt, jax.random.key(1), segment_len=n))
          for n in (4, None))
  np.testing.assert_array_equal(e, f)


@pytest.mark.slow
def test_sharded_over_four_devices_gives_the_same_tokens():
  script = textwrap.dedent("""
      import jax, numpy as np
      from igpt import model, sampling
      assert jax.device_count() == 4
      cfg = model.ModelConfig(num_layers=2, d_model=32, num_heads=4, seq_len=16, vocab_size=16)
      params = model.init_params(cfg, jax.random.key(0))
      params["wtet"] = 0.3 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
      prompt = np.random.default_rng(0).integers(0, 16, (8, 5)).astype(np.int32)
      one = sampling.sample(cfg, params, prompt, jax.random.key(3))
      mesh = sampling.batch_mesh()
      four = sampling.sample(cfg, params, prompt, jax.random.key(3), mesh=mesh)
      assert len(four.sharding.device_set) == 4, four.sharding
      np.testing.assert_array_equal(np.asarray(one), np.asarray(four))
      print("same")
  """)
  proc = train_helpers.run([sys.executable, "-c", script], num_devices=4, timeout=120)
  assert "same" in proc.stdout


# ------------------------------------------------------------------------------------------
# Prompts from outside


def _fail_if_compiled(monkeypatch):
  """A bad prompt must be refused before either compiled piece of the sampler runs."""
  def compiled(*args, **kwargs):
    raise AssertionError("the sampler ran before the prompt was checked")
  monkeypatch.setattr(sampling, "prefill", compiled)
  monkeypatch.setattr(sampling, "_segment", compiled)


# (bad values in a [2, 5] prompt of 7s, its dtype, what the message must say).
BAD_PROMPTS = {
    "HF start token first": ({(0, 0): 512}, np.int32,
                             r"prompt_BxN\[0, 0\] = 512 .*\[0, 512\).*drop that first column"),
    "512 later": ({(1, 3): 512}, np.int32, r"prompt_BxN\[1, 3\] = 512 .*\[0, 512\).*palette"),
    "-1 int16": ({(1, 4): -1}, np.int16, r"prompt_BxN\[1, 4\] = -1 .*\[0, 512\)"),
    "-1 int32": ({(0, 2): -1, (1, 0): 600}, np.int32,
                 r"prompt_BxN\[0, 2\] = -1 .*\(2 such values\)"),
    "far out int64": ({(0, 1): 2 ** 40}, np.int64, rf"prompt_BxN\[0, 1\] = {2 ** 40} "),
    "far out uint16": ({(1, 1): 65535}, np.uint16, r"prompt_BxN\[1, 1\] = 65535 "),
    "floats": ({}, np.float32, "integer tokens in \\[0, 512\\); got dtype float32"),
}


@pytest.mark.parametrize("case", BAD_PROMPTS)
def test_prompts_outside_the_vocabulary_are_refused(monkeypatch, case):
  cfg, params = _model(vocab_size=512)
  values, dtype, match = BAD_PROMPTS[case]
  prompt = np.full((2, 5), 7).astype(dtype)
  for at, value in values.items():
    prompt[at] = value
  _fail_if_compiled(monkeypatch)
  with pytest.raises(UserError, match=match):
    sampling.sample(cfg, params, prompt, jax.random.key(0))
  with pytest.raises(UserError, match="tokens \\[batch, positions\\]; got shape \\(5,\\)"):
    sampling.sample(cfg, params, prompt[0], jax.random.key(0))


def test_prompts_at_the_vocabulary_edges_are_sampled_as_before():
  cfg, params = _model(vocab_size=512)
  prompt = np.array([[0, 511, 0, 511, 3], [511, 0, 511, 0, 5]])
  want = sampling.sample(cfg, params, jnp.asarray(prompt, jnp.int32), jax.random.key(2))
  for dtype in (np.int16, np.uint16, np.int64):
    got = sampling.sample(cfg, params, prompt.astype(dtype), jax.random.key(2))
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(want)[:, :5], prompt)
  # A float array with no prompt tokens is nothing to misread (unconditional).
  sampling.sample(cfg, params, np.zeros((2, 0)), jax.random.key(2))


# ------------------------------------------------------------------------------------------
# sample.py


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train_helpers.run(train_helpers.cli_args(workdir, train__total_steps=4, train__eval_every_steps=4),
                    timeout=180)
  return workdir


def _sample_cli(*args, num_devices=1):
  return subprocess.run([sys.executable, SAMPLE_PY, *args], env=train_helpers.env(num_devices),
                        cwd=train_helpers.REPO, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_cli_writes_the_grid_and_the_tokens(tiny_run, tmp_path):
  proc = _sample_cli("--workdir", tiny_run, "--out", str(tmp_path), "--config.num_samples=3",
                     "--config.completions_per_image=2", "--config.prompt_rows=3",
                     "--config.name=grid", "--config.upscale_factor=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  tokens = np.load(tmp_path / "grid.npy")
  assert tokens.shape == (3, 2, 64)
  # 3 rows of (original, prompt, 2 completions), 8x8 images at 4x with 2-pixel gaps.
  assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 3 * 34 + 2)
  assert "pixels" in proc.stderr and "tokens/s" in proc.stderr  # the progress line
  # Unconditional, into the run's samples/ folder by default (in-process: no second start-up).
  config = _sample_config(mode="unconditional", num_samples=5, grid_columns=5)
  png = sample_cli.sample_images(config, trained.ModelSource(workdir=tiny_run), None)
  assert png == os.path.join(tiny_run, "samples", "unconditional_step4_seed0.png")
  assert np.load(png[:-4] + ".npy").shape == (5, 64)


def _sample_config(**overrides):
  spec = importlib.util.spec_from_file_location(
      "sample_config", os.path.join(train_helpers.REPO, "configs", "sample.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(overrides)
  return config


@pytest.mark.slow
def test_cli_bad_inputs_give_one_line(tiny_run, tmp_path):
  bad_palette = tmp_path / "palette.npy"
  np.save(bad_palette, np.zeros((4, 3), np.float32))
  cases = {
      "no checkpoint": (["--workdir", str(tmp_path / "fresh")], "no checkpoint in"),
      "prompt rows": (["--workdir", tiny_run, "--config.prompt_rows=9"], "prompt_rows=9"),
      "temperature": (["--workdir", tiny_run, "--config.temperature=0"], "temperature=0"),
      "top_p": (["--workdir", tiny_run, "--config.top_p=1.5"], "top_p=1.5"),
      "hf palette": (["--hf", str(tmp_path / "hf"), "--palette", str(bad_palette)],
                     "has 4 colours but the model has 16 tokens"),
      # --config has a default file, whose overrides apply when the flag is defined.
      "unknown field": (["--workdir", tiny_run, "--config.temprature=0.5"],
                        "field 'temprature' in --config.temprature (did you mean 'temperature'?)"),
      "unknown flag": (["--workdir", tiny_run, "--stpe=3"], "Unknown command line flag 'stpe'"),
      "two models": (["--workdir", tiny_run, "--hf", str(tmp_path / "hf")],
                     "give exactly one of --workdir (a run folder) and --hf"),
      "empty images folder": (["--workdir", tiny_run, f"--config.images={tmp_path / 'empty'}"],
                              f"the folder '{tmp_path / 'empty'}' holds no image files"),
  }
  os.makedirs(tmp_path / "empty")
  # An HF folder made from the tiny run, for the palette case.
  r = trained.load_run(tiny_run)
  convert_hf.save_hf_checkpoint(r.model_cfg, r.params, str(tmp_path / "hf"))
  os.makedirs(tmp_path / "fresh")  # a run folder killed before its first checkpoint
  for name in ("config.json", "palette.npy"):
    shutil.copy(os.path.join(tiny_run, name), tmp_path / "fresh" / name)
  procs = {name: subprocess.Popen([sys.executable, SAMPLE_PY, *args], env=train_helpers.env(1),
                                  cwd=train_helpers.REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=180)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (name, stderr[-2000:])
    assert len(errors) == 1 and cases[name][1] in errors[0], (name, stderr[-2000:])
    assert "Traceback" not in stderr, name


# ------------------------------------------------------------------------------------------
# sample.py's outputs: written as a pair, named after their prompts


def _picture(seed, side=8):
  return np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)


def _pair(folder):
  """{file name: bytes} of the folder (hidden temps included)."""
  return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def _half_then(error, path_arg):
  """A writer that writes the start of the file its argument `path_arg` names, then fails."""
  def write(*args, **kwargs):
    del kwargs
    with open(args[path_arg], "wb") as f:
      f.write(b"\x89PNG half")
    raise error
  return write


def _fail_on_call(function, number, error):
  calls = []
  def wrapper(*args, **kwargs):
    calls.append(args)
    if len(calls) == number:
      raise error
    return function(*args, **kwargs)
  return wrapper


ENOSPC = OSError(28, "No space left on device")
# Where writing the pair can fail: (object, attribute, replacement given the original).
OUTPUT_FAILURES = {
    "PNG half-written": (Image.Image, "save", lambda real: _half_then(ENOSPC, 1)),
    "killed in the PNG": (Image.Image, "save", lambda real: _half_then(KeyboardInterrupt(), 1)),
    "tokens after the PNG": (np, "save", lambda real: _half_then(ENOSPC, 0)),
    "first rename": (os, "replace", lambda real: _fail_on_call(real, 1, ENOSPC)),
    "second rename": (os, "replace", lambda real: _fail_on_call(real, 2, ENOSPC)),
}


@pytest.mark.parametrize("case", OUTPUT_FAILURES)
def test_failed_output_write_leaves_the_previous_pair(tmp_path, monkeypatch, case):
  sample_cli.write_outputs(str(tmp_path), "grid", _picture(0), np.arange(6, dtype=np.int16))
  before = _pair(tmp_path)
  owner, attribute, replacement = OUTPUT_FAILURES[case]
  monkeypatch.setattr(owner, attribute, replacement(getattr(owner, attribute)))
  with pytest.raises((OSError, KeyboardInterrupt)):
    sample_cli.write_outputs(str(tmp_path), "grid", _picture(1), np.arange(9, dtype=np.int16))
  monkeypatch.undo()
  assert _pair(tmp_path) == before  # byte-identical, and no temporaries beside them
  assert list(before) == ["grid.npy", "grid.png"]
  sample_cli.write_outputs(str(tmp_path), "grid", _picture(1), np.arange(9, dtype=np.int16))
  np.testing.assert_array_equal(np.load(tmp_path / "grid.npy"), np.arange(9))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), _picture(1))


@pytest.fixture
def small_disk(tmp_path):
  """A 256 KiB tmpfs (needs root and a kernel that lets this process mount)."""
  folder = tmp_path / "small"
  folder.mkdir()
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                          capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError) as e:
    pytest.skip(f"cannot run mount: {e}")
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
  yield folder
  subprocess.run(["umount", str(folder)], check=True, timeout=30)


@pytest.mark.parametrize("side,num_tokens", [(384, 8), (128, 120 << 10)],
                         ids=["the PNG overfills it", "the tokens overfill it"])
def test_full_disk_leaves_the_previous_pair(small_disk, side, num_tokens):
  sample_cli.write_outputs(str(small_disk), "grid", _picture(0), np.arange(6, dtype=np.int16))
  before = _pair(small_disk)
  # Random pixels do not compress: side x side x 3 bytes of PNG. (Pillow reports its short
  # write as a bare OSError, without ENOSPC.)
  with pytest.raises(OSError):
    sample_cli.write_outputs(str(small_disk), "grid", _picture(1, side=side),
                             np.zeros(num_tokens, np.int16))
  assert _pair(small_disk) == before


def test_killed_mid_write_leaves_the_previous_pair(tmp_path):
  # A real SIGKILL while the PNG is being written: nothing can clean up, so the half-written
  # temp stays, hidden, but the published pair is the old one.
  script = textwrap.dedent(f"""
      import os, signal, numpy as np
      from PIL import Image
      from igpt.commands import sample as sample_cli
      def save(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
      Image.Image.save = save
      sample_cli.write_outputs({str(tmp_path)!r}, "grid", np.zeros((8, 8, 3), np.uint8),
                               np.arange(9, dtype=np.int16))
  """)
  sample_cli.write_outputs(str(tmp_path), "grid", _picture(0), np.arange(6, dtype=np.int16))
  before = _pair(tmp_path)
  proc = subprocess.run([sys.executable, "-c", script], env=train_helpers.env(1),
                        cwd=train_helpers.REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == -9, proc.stderr[-2000:]
  after = _pair(tmp_path)
  assert {f: after[f] for f in before} == before
  assert all(f.startswith((".grid.png-", ".grid.npy-")) for f in set(after) - set(before)), after


def test_default_output_names_say_where_the_prompts_came_from(tmp_path):
  files = [str(tmp_path / f"{i}.png") for i in range(3)]
  names = {
      "val": sample_cli.output_name(_sample_config(), 500, "val"),
      "test": sample_cli.output_name(_sample_config(split="test"), 500, "test"),
      "images": sample_cli.output_name(_sample_config(images=str(tmp_path)), 500,
                                       sample_cli.images_origin(files)),
      "other images": sample_cli.output_name(_sample_config(images=str(tmp_path)), 500,
                                             sample_cli.images_origin(files[:2])),
      "unconditional": sample_cli.output_name(_sample_config(mode="unconditional"), 500),
  }
  assert names["val"] == "completion_val_step500_seed0"
  assert names["unconditional"] == "unconditional_step500_seed0"
  assert names["images"].startswith("completion_images-")
  assert names["images"].endswith("_step500_seed0")
  assert len(set(names.values())) == len(names), names
  # The hash follows the files, not how the folder was written.
  assert sample_cli.images_origin(files) == sample_cli.images_origin(
      [os.path.relpath(f) for f in files])
  assert sample_cli.output_name(_sample_config(name="mine"), 500, "val") == "mine"


def test_completions_of_a_split_and_of_image_files_keep_their_own_files(tiny_run, tmp_path):
  folder = tmp_path / "pictures"
  folder.mkdir()
  for i in range(2):
    Image.fromarray(_picture(i)).save(folder / f"{i}.png")
  out = tmp_path / "out"
  common = dict(num_samples=2, completions_per_image=1, batch_size=2)
  val = sample_cli.sample_images(_sample_config(**common), trained.ModelSource(workdir=tiny_run), str(out))
  images = sample_cli.sample_images(_sample_config(images=str(folder), **common),
                           trained.ModelSource(workdir=tiny_run), str(out))
  assert os.path.basename(val) == "completion_val_step4_seed0.png"
  assert os.path.basename(images).startswith("completion_images-")
  assert sorted(os.listdir(out)) == sorted(os.path.basename(p)[:-4] + ext for p in (val, images)
                                           for ext in (".npy", ".png"))


def test_prompts_of_a_pre_tokenised_split_are_read_as_tokens(tmp_path):
  # OpenAI's .npy token files have no images: their tokens are the prompts as they are.
  import ml_collections  # noqa: PLC0415
  from igpt import config as config_lib  # noqa: PLC0415
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (10, 16)).astype(np.uint16)
  np.save(tmp_path / "cifar10_teX.npy", tokens)
  np.save(tmp_path / "cifar10_teY.npy", np.eye(10, dtype=np.uint8)[np.arange(10)])
  run_config = ml_collections.ConfigDict({"data": config_lib.data_section()})
  run_config.data.update(source="openai_npy", path=str(tmp_path), name="cifar10")
  cfg = model.ModelConfig(num_layers=1, d_model=8, num_heads=2, seq_len=16, vocab_size=512)
  m = trained.TrainedModel(model_cfg=cfg, params={}, palette=rng.uniform(-1, 1, (512, 3)),
                           description="made up", identity="x", config=run_config)
  got, origin = sample_cli.load_prompt_tokens(
      _sample_config(split="test", num_samples=3, first_image_index=2), m)
  np.testing.assert_array_equal(got, tokens[2:5])
  assert origin == "test"
