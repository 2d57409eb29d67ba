"""The trainer: objectives, optimiser, config checks, NaN stop, CLI, kill-and-resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from igpt import (evaluation, guards, losses, metrics, model, optim, palette, pipeline, readers,
                  run, sharding, spec, train)

import train_helpers as th

ONE_DEVICE = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))


def _one_device_mesh():
  return sharding.make_mesh(ONE_DEVICE, jax.devices()[:1])


def _random_tokens(config, batch, seed=0):
  rng = np.random.default_rng(seed)
  vocab_size = spec.model_config(config).vocab_size
  return rng.integers(0, vocab_size, (batch, config.model.image_side**2)).astype(np.int32)


# ------------------------------------------------------------------------------------------
# Objectives.
# ------------------------------------------------------------------------------------------

def test_ar_loss_has_no_shift():
  # Logits that put all mass on token i at position i: zero loss only if NOT shifted.
  tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  logits = 50.0 * jax.nn.one_hot(tokens, 10)
  loss, per_example = losses.ar_loss(logits, tokens)
  assert float(loss) < 1e-6 and per_example.shape == (1,)
  shifted, _ = losses.ar_loss(logits[:, :-1], tokens[:, 1:])
  assert float(shifted) > 10


def test_bert_loss_counts_only_masked_positions():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 8, (3, 16)))
  keep = jnp.asarray(rng.random((3, 16)) > 0.3)
  loss, per_example = losses.bert_loss(logits, tokens, keep)
  # By hand: per-example mean CE over masked positions, then mean over examples.
  ce = np.asarray(losses.token_cross_entropy(logits, tokens))
  want = np.mean([ce[b][~np.asarray(keep[b])].mean() for b in range(3)])
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  # Changing logits at kept positions changes nothing; at a masked one it does.
  noise = jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
  at_kept = jnp.where(keep[..., None], logits + noise, logits)
  np.testing.assert_allclose(float(losses.bert_loss(at_kept, tokens, keep)[0]), float(loss), rtol=1e-6)
  at_masked = jnp.where(keep[..., None], logits, logits + noise)
  assert abs(float(losses.bert_loss(at_masked, tokens, keep)[0]) - float(loss)) > 1e-3


def test_bert_mask_rate_and_bits_per_dim():
  keep = losses.bert_keep_mask(jax.random.key(0), (64, 1024), 0.15)
  assert abs(1 - float(keep.mean()) - 0.15) < 0.005
  # The spec's convention: bits/dim = CE / ln 2 / 3 (per RGB sub-pixel).
  assert math.isclose(float(losses.bits_per_dim(2.0895)), 2.0895 / math.log(2) / 3)


def test_bert_model_is_bidirectional_and_hides_masked_tokens():
  config = th.tiny_config(objective="bert")
  cfg = spec.model_config(config)
  assert not cfg.causal
  params = model.init_params(cfg, jax.random.key(0))
  params["wtet"] = 0.02 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  tokens = jnp.asarray(_random_tokens(config, 2))
  keep = jnp.ones(tokens.shape, bool).at[:, 5].set(False)
  logits, _ = model.apply(cfg, params, tokens, keep)
  # No causal mask: the first position sees the last token.
  changed_last = tokens.at[:, -1].set((tokens[:, -1] + 1) % cfg.vocab_size)
  assert float(jnp.abs(model.apply(cfg, params, changed_last, keep)[0][:, 0] - logits[:, 0]).max()) > 1e-6
  # A masked token's embedding is zeroed: changing it changes nothing anywhere.
  changed_masked = tokens.at[:, 5].set((tokens[:, 5] + 1) % cfg.vocab_size)
  np.testing.assert_array_equal(model.apply(cfg, params, changed_masked, keep)[0], logits)


# ------------------------------------------------------------------------------------------
# Optimiser, gradient accumulation, FLOPs.
# ------------------------------------------------------------------------------------------

def test_schedule_warms_up_then_decays_to_zero_and_paper_adam():
  config = th.tiny_config(train__total_steps=100, optim__warmup_steps=10, optim__lr=1e-3)
  schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
  assert float(schedule(0)) == 0.0
  assert math.isclose(float(schedule(5)), 5e-4, rel_tol=1e-5)
  assert math.isclose(float(schedule(10)), 1e-3, rel_tol=1e-5)
  assert float(schedule(55)) < 1e-3 and abs(float(schedule(100))) < 1e-12
  assert config.optim.b2 == 0.95 and config.optim.weight_decay == 0.0


def _one_step(config, tokens, mesh=None):
  mesh = mesh or _one_device_mesh()
  setup = train.TrainSetup.build(th.spec_for(config, mesh), mesh)
  state, shardings = train.create_train_state(setup, jax.random.key(0))
  step = train.make_train_step(setup, shardings)
  batch = sharding.global_batch({"tokens": tokens}, mesh)
  state, m = step(state, batch, jax.random.key(7))
  state, m = step(state, batch, jax.random.key(8))  # the 2nd step has a nonzero lr
  return jax.device_get(state), jax.device_get(m)


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch():
  # BERT: masks are drawn for the whole batch, then split (AR on 8 devices: test_sharding).
  config = th.tiny_config(objective="bert", optim__clip_grad_norm=1.0)
  tokens = _random_tokens(config, 16)
  full, m_full = _one_step(config, tokens)
  config.train.grad_accum_steps = 4
  accum, m_accum = _one_step(config, tokens)
  np.testing.assert_allclose(m_accum["loss"], m_full["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_accum["grad_norm"], m_full["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(accum["params"]), jax.tree.leaves(full["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert int(accum["step"]) == 2


def test_bfloat16_compute_and_remat_keep_float32_params():
  config = th.tiny_config()
  tokens = _random_tokens(config, 16)
  ref, m_ref = _one_step(config, tokens)
  config.model.dtype, config.model.remat = "bfloat16", True
  low, m_low = _one_step(config, tokens)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(low["params"]))
  assert abs(float(m_low["loss"]) - float(m_ref["loss"])) < 0.05  # bf16 matmuls, same model


def test_flops_per_token_convention():
  cfg = spec.model_config(th.tiny_config())
  d, n, t, v = 32, 2, 64, 16
  assert metrics.flops_per_token(cfg) == 6 * (12 * d * d * n + v * d) + 12 * n * d * t
  # iGPT-S: N = 12 d^2 L + V d = 75.76M matmul weights, attention adds 12 L d T = 151M.
  s = model.ModelConfig(num_layers=24, d_model=512, num_heads=8, seq_len=1024)
  assert metrics.flops_per_token(s) == 6 * 75_759_616 + 150_994_944
  assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops_per_device("cpu") is None
  assert metrics.peak_flops_per_device("cpu", 1e12) == 1e12


# ------------------------------------------------------------------------------------------
# Config checks: fail fast, before any compile.
# ------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "mesh": (dict(mesh__data=3, mesh__fsdp=1), "needs 3 devices"),
    "mesh_minus_one": (dict(mesh__data=2, mesh__fsdp=-1), "does not divide"),
    "batch": (dict(train__batch_size=10, train__grad_accum_steps=4), "not divisible"),
    "objective": (dict(objective="gpt"), "objective='gpt' is unknown"),
    "palette_file": (dict(data__palette_path="/nonexistent/palette.npy"), "does not exist"),
    "vocab": (dict(model__vocab_size=8), "vocab_size=8 is smaller"),
    "warmup": (dict(optim__warmup_steps=50), "warmup_steps=50"),
    "augment_tokens": (dict(data__augment=True, data__source="openai_npy"),
                       "data.augment=True crops"),
    "unknown_field": (dict(train__totl_steps=3), "train.totl_steps is not a run config field"),
    "schedule": (dict(optim__schedule="linear"), "optim.schedule='linear'"),
    "classes": (dict(objective="classify"), "finetune.num_classes >= 2"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_fails_before_compile(name, tmp_path, monkeypatch):
  overrides, message = BAD_CONFIGS[name]

  def no_compile(*args, **kwargs):
    raise AssertionError("reached state creation/compile with a bad config")

  monkeypatch.setattr(train, "create_train_state", no_compile)
  monkeypatch.setattr(train, "make_train_step", no_compile)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.train_and_evaluate(th.tiny_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_unreadable_dataset_fails_before_compile(tmp_path, monkeypatch):
  def no_compile(*args, **kwargs):
    raise AssertionError("reached state creation/compile with a bad dataset")

  monkeypatch.setattr(train, "create_train_state", no_compile)
  config = th.tiny_config(data__source="folder", data__path=str(tmp_path / "no_such_dir"))
  with pytest.raises((ValueError, FileNotFoundError, OSError)) as e:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "no_such_dir" in str(e.value)
  assert not os.path.exists(tmp_path / "w")  # nothing half-made left behind


def _prepare_palette(config, source, workdir: str):
  """The palette a run in `workdir` trains with, stored there as a new run stores it."""
  centers, is_new = run.choose_palette(spec.resolve(config, 1, 1), source, workdir)
  if is_new:
    run.store_palette(workdir, centers)
  return centers


def test_palette_is_fitted_then_reused_and_given_file_used_as_is(tmp_path):
  config = th.tiny_config()
  source = readers.make_source(config.data, "train", config.model.image_side)
  fitted = _prepare_palette(config, source, str(tmp_path / "a"))
  assert fitted.shape == (16, 3)
  np.testing.assert_array_equal(palette.load_palette(str(tmp_path / "a" / "palette.npy")), fitted)
  # On resume the stored palette is reused, even if the data would now fit another one.
  config.data.palette_fit_pixels = 5000
  np.testing.assert_array_equal(
      _prepare_palette(config, source, str(tmp_path / "a")), fitted)
  # A given file is used as is (and copied into the workdir for probe/sample).
  given = np.linspace(-1, 1, 12 * 3, dtype=np.float32).reshape(12, 3)
  palette.save_palette(str(tmp_path / "given.npy"), given)
  config.data.palette_path = str(tmp_path / "given.npy")
  os.makedirs(tmp_path / "b")
  got = _prepare_palette(config, source, str(tmp_path / "b"))
  np.testing.assert_array_equal(got, given)
  np.testing.assert_array_equal(palette.load_palette(str(tmp_path / "b" / "palette.npy")), given)
  # A workdir palette that disagrees with the given file is an error, not a silent switch.
  with pytest.raises(ValueError, match="differs"):
    _prepare_palette(config, source, str(tmp_path / "a"))


# ------------------------------------------------------------------------------------------
# In-process runs (1 device).
# ------------------------------------------------------------------------------------------

def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # lr is 0 at step 0 (warm-up), then 1e38: params overflow at the 2nd update.
  config = th.tiny_config(optim__lr=1e38, optim__warmup_steps=1, train__checkpoint_every_steps=1,
                          train__log_every_steps=1)
  with pytest.raises(guards.NonFiniteLossError, match="at step 2.*last good checkpoint \\(step 1\\)"):
    train.train_and_evaluate(config, str(tmp_path))
  step, state, _ = th.restore_latest(config, str(tmp_path))
  assert step == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


@pytest.mark.slow
def test_bert_run_trains_and_writes_its_workdir(tmp_path):
  config = th.tiny_config(objective="bert", train__total_steps=8, train__eval_every_steps=8)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 8 and math.isfinite(final["eval_loss"])
  assert final["eval_bits_per_dim"] == pytest.approx(final["eval_loss"] / math.log(2) / 3)
  for name in ("config.json", "palette.npy", "metrics.jsonl"):
    assert os.path.exists(tmp_path / name), name
  assert json.load(open(tmp_path / "config.json"))["objective"] == "bert"
  records = th.read_metrics(str(tmp_path))
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [4, 8]
  for key in ("tokens_per_s", "images_per_s", "model_tflops_per_s_per_device", "grad_norm",
              "param_norm", "lr", "train_bits_per_dim"):
    assert key in train_records[-1], key
  assert "mfu" not in train_records[-1]  # CPU: peak unknown, MFU omitted
  # Rerunning a finished run resumes at the end: nothing to train, same evaluation.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)


# ------------------------------------------------------------------------------------------
# Subprocesses: the CLI on 8 fake devices, and kill-and-resume.
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_end_to_end_on_8_devices_then_restore_on_1(tmp_path):
  workdir = str(tmp_path / "run")
  steps = 32
  th.run(th.cli_args(workdir, **{"train.total_steps": steps, "train.checkpoint_every_steps": 16,
                                 "train.eval_every_steps": 16, "train.eval_batches": 2,
                                 "mesh.data": 2, "mesh.fsdp": -1, "model.d_model": 64}),
         num_devices=8)
  records = th.read_metrics(workdir)
  train_losses = [r["loss"] for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert len(train_losses) == steps // 4 and evals[-1]["step"] == steps
  assert train_losses[-1] < train_losses[0] - 0.3, train_losses  # learning the digits
  assert evals[-1]["eval_loss"] < math.log(16) - 0.5, evals
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["mesh"]["data"] == 2 and saved["model"]["d_model"] == 64

  # Save on an 8-device (data=2, fsdp=4) mesh, restore on this process's single device.
  config = ml_collections.ConfigDict(saved)
  step, state, extra = th.restore_latest(config, workdir)
  assert step == steps and extra["data"]["next_step"] == steps
  mesh = _one_device_mesh()
  setup = train.TrainSetup.build(th.spec_for(config, mesh), mesh)
  _, shardings = train.abstract_train_state(setup)
  centers = palette.load_palette(os.path.join(workdir, "palette.npy"))
  source = readers.make_source(config.data, "val", config.model.image_side)
  batches = [sharding.global_batch({"tokens": b["tokens"], "mask": b["mask"]}, mesh) for b in
             pipeline.eval_batches(source, centers, config.train.batch_size, 2, 0, 1)]
  ev = evaluation.mean_loss(evaluation.make_loss_step(setup, shardings["params"]),
                            state["params"], batches, train.run_rngs(config.seed)[2])
  assert ev["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)


def _latest_checkpoint(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return None
  steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()]
  return max(steps, default=None)


RESUME_OVERRIDES = {"train.total_steps": 40, "train.checkpoint_every_steps": 3,
                    "train.log_every_steps": 3, "train.eval_every_steps": 20}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """An uninterrupted 40-step run: what an interrupted and resumed one must equal."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  th.run(th.cli_args(workdir, **RESUME_OVERRIDES))
  return workdir


def _assert_same_final_state(straight, resumed):
  config = th.tiny_config(**{k.replace(".", "__"): v for k, v in RESUME_OVERRIDES.items()})
  steps = RESUME_OVERRIDES["train.total_steps"]
  step_a, a, extra_a = th.restore_latest(config, straight)
  step_b, b, extra_b = th.restore_latest(config, resumed)
  assert step_a == step_b == steps and extra_a["data"] == extra_b["data"]
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)  # bit for bit (params, Adam moments, step)
  # The resumed run's metrics continue the file without duplicated steps.
  resumed_steps = [r["step"] for r in th.read_metrics(resumed) if "loss" in r]
  assert resumed_steps == sorted(set(resumed_steps)) and resumed_steps[-1] == steps
  # So do its TensorBoard curves (as TensorBoard reads them): the steps of metrics.jsonl, once.
  _assert_tensorboard_matches_metrics(resumed)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(straight_run, tmp_path):
  steps = RESUME_OVERRIDES["train.total_steps"]  # enough left after the kill point
  killed = str(tmp_path / "killed")
  victim = subprocess.Popen(th.cli_args(killed, **RESUME_OVERRIDES), env=th.env(1), cwd=th.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while (_latest_checkpoint(killed) or 0) < 6 and victim.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  time.sleep(np.random.default_rng().uniform(0, 0.1))  # land anywhere: mid-step or mid-save
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  interrupted_at = _latest_checkpoint(killed)
  assert interrupted_at is not None and interrupted_at < steps
  th.run(th.cli_args(killed, **RESUME_OVERRIDES))  # resumes from the newest whole checkpoint
  _assert_same_final_state(straight_run, killed)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stops_at_and_resume_is_bit_exact(straight_run, tmp_path):
  # What a preemptible VM or a scheduler sends before eviction: the run saves where it is.
  steps = RESUME_OVERRIDES["train.total_steps"]
  stopped = str(tmp_path / "stopped")
  victim = subprocess.Popen(th.cli_args(stopped, **RESUME_OVERRIDES), env=th.env(1),
                            cwd=th.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
  lines = []
  for line in victim.stderr:
    lines.append(line)
    if f"step 6/{steps}" in line:
      victim.send_signal(signal.SIGTERM)
      time.sleep(0.05)
      victim.send_signal(signal.SIGTERM)  # a second notice during the save changes nothing
  victim.wait(timeout=240)
  assert victim.returncode == 75, "".join(lines[-20:])
  last = lines[-1].strip()
  assert last.startswith("preempted at step ") and last.endswith(
      "rerun the same command to resume"), last
  saved = int(last.split()[3])
  assert 6 <= saved < steps and _latest_checkpoint(stopped) == saved, (saved, lines[-5:])
  assert not [n for n in os.listdir(os.path.join(stopped, "checkpoints")) if "tmp" in n]
  resumed = th.run(th.cli_args(stopped, **RESUME_OVERRIDES))
  _assert_same_final_state(straight_run, stopped)
  # The same model, mesh and schedule as the runs before it: its step comes from the cache.
  assert "(compilation cache hit" in resumed.stderr, resumed.stderr[-3000:]


def _assert_tensorboard_matches_metrics(workdir):
  scalars = th.read_tensorboard_scalars(workdir)
  records = th.read_metrics(workdir)
  for prefix, key in (("train/", "loss"), ("eval/", "eval_loss")):
    want = [(r["step"], r[key]) for r in records if key in r]
    got = scalars[prefix + key]
    assert [s for s, _ in got] == [s for s, _ in want], (prefix, got, want)
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
  assert {"train/grad_norm", "train/lr", "train/tokens_per_s", "eval/eval_bits_per_dim"} <= set(scalars)


@pytest.mark.slow
def test_tensorboard_scalars_samples_and_profile_trace(tmp_path):
  runs = {}
  for name in ("a", "b"):  # two identical runs: the samples are a function of the seed
    runs[name] = str(tmp_path / name)
    th.run(th.cli_args(runs[name], **{"train.profile_start_step": 2, "train.profile_num_steps": 2,
                                      "train.sample_every_steps": 6}))
  workdir = runs["a"]
  _assert_tensorboard_matches_metrics(workdir)
  traces = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(workdir, "profile"))
            for f in files if f.endswith(".xplane.pb")]
  assert any(f.endswith(".trace.json.gz") for _, _, files in os.walk(workdir) for f in files)
  assert traces, os.listdir(workdir)
  # Sample pictures at steps 6 and 12 (the last), as PNGs and TensorBoard images.
  pngs = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert pngs == ["step_0000006.png", "step_0000012.png"], pngs
  images = th.read_tensorboard_images(workdir)
  assert [step for step, _ in images["samples"]] == [6, 12]
  for png in pngs:
    a = np.asarray(Image.open(os.path.join(runs["a"], "samples", png)))
    b = np.asarray(Image.open(os.path.join(runs["b"], "samples", png)))
    np.testing.assert_array_equal(a, b)
  assert [r["step"] for r in th.read_metrics(workdir) if "sample_seconds" in r] == [6, 12]
