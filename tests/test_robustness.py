"""train.py under abuse: bad inputs and faults end in one short line, and the run folder stays
whole (unchanged, or resumable to the same params as an undisturbed run).

Each case runs the real CLI in a subprocess on the smallest tiny config (train_helpers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from igpt import config as config_lib
from igpt import model, run, trained
from igpt.convert import hf as convert_hf
from igpt.model import ModelConfig

import train_helpers as th

# Checkpoints every 2 steps and all kept: enough older ones to fall back through.
BASE = {"train.checkpoint_every_steps": 2, "train.keep_checkpoints": 10}
MAX_ERROR_LINES = 12  # a few log lines before the error, never a traceback


def cli(workdir, timeout=240, args=None, **overrides):
  """Runs train.py; (exit status, stderr + stdout)."""
  argv = args or th.cli_args(str(workdir), **{**BASE, **overrides})
  proc = subprocess.run(argv, env=th.env(1), cwd=th.REPO, capture_output=True, text=True,
                        timeout=timeout)
  return proc.returncode, proc.stderr + proc.stdout


def assert_user_error(rc, out, *names):
  """Exit 2, a short output without a traceback, and an `error:` line naming each of `names`."""
  lines = out.strip().splitlines()
  assert rc == 2, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert len(lines) <= MAX_ERROR_LINES, out[-3000:]
  error = next(ln for ln in lines if ln.startswith("error: "))
  for name in names:
    assert name in error, (name, error)


def snapshot(workdir) -> dict:
  """path -> (size, mtime_ns) of every file under `workdir` (the lock file aside)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if name != ".lock":
        st = os.stat(os.path.join(root, name))
        out[os.path.relpath(os.path.join(root, name), workdir)] = (st.st_size, st.st_mtime_ns)
  return out


def final_params(workdir, step=None):
  return jax.device_get(trained.load_run(str(workdir), step).params)


def assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 12-step run (checkpoints 2..12) and its console output; never modified."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  rc, out = cli(workdir)
  assert rc == 0, out[-3000:]
  return workdir, out


def copy_of(finished, tmp_path, name="copy"):
  dst = tmp_path / name
  shutil.copytree(finished[0], dst)
  return dst


# ------------------------------------------------------------------------------ a normal run


@pytest.mark.slow
def test_a_normal_run_reads_well(finished):
  workdir, out = finished
  assert "Unable to initialize backend" not in out
  progress = [ln for ln in out.splitlines() if "step 12/12" in ln]
  assert progress and "train_actions.py:" in progress[0]  # the real origin, not metrics.py
  done = [ln for ln in out.splitlines() if "Done:" in ln]
  assert len(done) == 1 and len(done[0]) < 250 and "eval loss" in done[0], done
  # Created with the user's umask, like metrics.jsonl (not the temp file's 0600).
  modes = {n: os.stat(workdir / n).st_mode & 0o777
           for n in ("config.json", "palette.npy", "metrics.jsonl")}
  assert len(set(modes.values())) == 1, modes


# ------------------------------------------------------------------------------ mistakes


def _no_get_config(tmp_path):
  path = tmp_path / "noget.py"
  path.write_text("x = 1\n")
  return path


def _digit_folder(tmp_path, corrupt: bool) -> str:
  """A folder source of 12 small PNGs in two class subfolders, one of them not an image."""
  from PIL import Image  # noqa: PLC0415
  folder = tmp_path / "images"
  rng = np.random.default_rng(0)
  for i in range(12):
    (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(folder / f"c{i % 2}" / f"{i}.png")
  if corrupt:
    (folder / "c1" / "7.png").write_bytes(b"\x89PNG not really")
  return str(folder)


@pytest.mark.parametrize("case", [
    "keep_checkpoints=0", "unknown mesh axis", "config file without get_config",
    "workdir is a file", "palette too big for the vocabulary", "batch_size=0",
    "palette of the wrong shape", "corrupt image in a folder source",
    "init_from a run with no checkpoint", "negative lr", "fewer classes than labels",
    "config variant the file does not take"])
def test_mistakes_are_one_line_and_leave_no_run(case, tmp_path):
  workdir = tmp_path / "run"
  overrides, args, names = {}, None, ()
  if case == "keep_checkpoints=0":
    overrides, names = {"train.keep_checkpoints": 0}, ("train.keep_checkpoints=0",)
  elif case == "unknown mesh axis":
    args = th.cli_args(str(workdir)) + ["--config.mesh.pipeline=2"]
    names = ("pipeline", "--config.mesh.pipeline")
  elif case == "config file without get_config":
    bad = _no_get_config(tmp_path)
    args = [sys.executable, os.path.join(th.REPO, "train.py"), "--config", str(bad),
            "--workdir", str(workdir)]
    names = (str(bad), "get_config")
  elif case == "workdir is a file":
    workdir.write_text("not a folder")
    names = (str(workdir), "not a folder")
  elif case == "palette too big for the vocabulary":
    big = tmp_path / "big.npy"
    np.save(big, np.linspace(-1, 1, 64 * 3, dtype=np.float32).reshape(64, 3))
    overrides, names = {"data.palette_path": str(big)}, (str(big), "64 colours")
  elif case == "batch_size=0":
    overrides, names = {"train.batch_size": 0}, ("train.batch_size=0",)
  elif case == "palette of the wrong shape":
    bad = tmp_path / "rgba.npy"
    np.save(bad, np.zeros((16, 4), np.float32))
    overrides, names = {"data.palette_path": str(bad)}, (str(bad), "(k, 3)")
  elif case == "corrupt image in a folder source":
    folder = _digit_folder(tmp_path, corrupt=True)
    overrides = {"data.source": "folder", "data.path": folder, "data.val_examples": 2}
    names = (os.path.join(folder, "c1", "7.png"),)
  elif case == "init_from a run with no checkpoint":
    killed = tmp_path / "killed"  # a run killed before its first checkpoint
    killed.mkdir()
    (killed / "config.json").write_text(th.tiny_config().to_json())
    np.save(killed / "palette.npy", np.zeros((16, 3), np.float32))
    overrides, names = {"init_from": str(killed)}, (str(killed), "has no checkpoint")
  elif case == "negative lr":
    overrides, names = {"optim.lr": -1}, ("optim.lr=-1",)
  elif case == "fewer classes than labels":
    overrides = {"objective": "classify", "finetune.num_classes": 5}
    names = ("finetune.num_classes=5", "10 classes", "--config.finetune.num_classes=10")
  else:
    args = [sys.executable, os.path.join(th.REPO, "train.py"), "--config",
            os.path.join(th.REPO, "configs", "tiny.py") + ":foo", "--workdir", str(workdir)]
    names = ("configs/tiny.py takes no variant (':foo')",)
  rc, out = cli(workdir, args=args, **overrides)
  assert_user_error(rc, out, *names)
  if case == "workdir is a file":
    assert workdir.read_text() == "not a folder"
  else:
    assert not os.path.exists(workdir), os.listdir(workdir)  # not even an empty folder


@pytest.mark.parametrize("overrides,fields", [
    ({"model.d_model": 64, "model.num_heads": 4}, ["model.d_model", "model.num_heads"]),
    ({"seed": 1}, ["seed"]),
    ({"data.palette_size": 8}, ["data.palette_size"]),
    ({"data.source": "idx", "data.path": "/nonexistent"}, ["data.source", "data.path"]),
    ({"optim.lr": 0.01}, ["optim.lr"]),
], ids=["shapes", "seed", "palette_size", "data source", "lr"])
def test_a_config_that_changes_the_run_is_refused_before_any_write(finished, overrides, fields):
  workdir = finished[0]
  before = snapshot(workdir)
  rc, out = cli(workdir, **overrides)
  assert_user_error(rc, out, *fields, "another --workdir", "config.json")
  assert snapshot(workdir) == before


# ------------------------------------------------------------------------------ faults


def _largest_file(folder):
  files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
  return max(files, key=os.path.getsize)


# Each kind of damage, applied to one checkpoint of a copy (newest first).
def _data_dir(checkpoint, item):
  return checkpoint / item / "ocdbt.process_0" / "d"


DAMAGE = {
    12: ("truncated data file", lambda d: os.truncate(_largest_file(_data_dir(d, "params")), 100)),
    10: ("deleted data file", lambda d: os.remove(_largest_file(_data_dir(d, "train_state")))),
    8: ("deleted _METADATA", lambda d: os.remove(d / "params" / "_METADATA")),
    6: ("empty extra", lambda d: open(d / "extra" / "metadata", "w").close()),
    4: ("missing extra", lambda d: shutil.rmtree(d / "extra")),
}


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_resume_reaches_the_same_params(finished, tmp_path):
  workdir = copy_of(finished, tmp_path)  # its .lock is a stale one: taken over
  for step, (_, damage) in DAMAGE.items():
    damage(workdir / "checkpoints" / str(step))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 12, "loss": 2.3')  # a torn last line
  rc, out = cli(workdir)
  assert rc == 0, out[-3000:]
  assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
  for step, (kind, _) in DAMAGE.items():
    lines = [ln for ln in out.splitlines() if f"checkpoints/{step} is damaged" in ln]
    assert len(lines) == 1, (kind, out[-3000:])
    assert os.path.isdir(workdir / "checkpoints" / f"{step}.damaged"), kind
  assert "Resumed from checkpoint step 2" in out and "cut-off last line" in out
  assert_same_params(final_params(workdir), final_params(finished[0]))
  steps = [r["step"] for r in th.read_metrics(str(workdir)) if "loss" in r]
  assert steps == [4, 8, 12]  # no duplicates, the torn record gone


def test_every_checkpoint_damaged_is_refused_not_restarted(finished, tmp_path):
  workdir = copy_of(finished, tmp_path)
  for step in range(2, 13, 2):
    os.truncate(_largest_file(_data_dir(workdir / "checkpoints" / str(step), "params")), 100)
  for attempt in ("first", "rerun"):  # the rerun finds only the set-aside ones: refused too
    rc, out = cli(workdir)
    assert_user_error(rc, out, "12.damaged", "2.damaged", "delete or move them",
                      "new --workdir")
    assert "Compiled the train step" not in out, attempt
    steps = sorted(os.listdir(workdir / "checkpoints"))
    assert steps == sorted(f"{s}.damaged" for s in range(2, 13, 2)), (attempt, steps)


def test_fewer_steps_than_the_run_has_made_is_refused(finished):
  workdir = finished[0]
  before = snapshot(workdir)
  rc, out = cli(workdir, **{"train.total_steps": 6})
  assert_user_error(rc, out, "at step 12", "train.total_steps=6", "new --workdir")
  assert snapshot(workdir) == before  # config.json still says what the run did


def test_a_run_palette_smaller_than_the_vocabulary_samples_only_its_colours(finished, tmp_path):
  # Tokens past the palette never occurred in training; sample.py draws only its colours. The
  # run: the finished one's weights, saved as a run whose palette has 8 of its 16 tokens.
  src = trained.load_run(str(finished[0]))
  config = config_lib.complete(src.config)
  config.data.palette_size, config.model.vocab_size = 8, src.model_cfg.vocab_size
  workdir = tmp_path / "copy"
  trained.save_run(str(workdir), config, src.palette[:8], src.params, step=src.step)
  out_dir = tmp_path / "samples"
  proc = subprocess.run(
      [sys.executable, os.path.join(th.REPO, "sample.py"), "--workdir", str(workdir),
       "--out", str(out_dir), "--config.mode=unconditional", "--config.num_samples=3",
       "--config.name=free"], env=th.env(1), cwd=th.REPO, capture_output=True, text=True,
      timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tokens = np.load(out_dir / "free.npy")
  assert tokens.shape == (3, 64) and 0 <= tokens.min() and tokens.max() < 8


def test_the_same_init_from_path_relative_or_absolute_is_the_same_run():
  from igpt import workdir as workdirs  # noqa: PLC0415
  here = os.path.abspath("runs/pretrained")
  assert workdirs.config_changes({"init_from": "runs/pretrained"}, {"init_from": here}) == ([], [])
  unsafe, _ = workdirs.config_changes({"init_from": "runs/a"}, {"init_from": "runs/b"})
  assert unsafe == ["init_from: 'runs/a' -> 'runs/b'"]


@pytest.mark.slow
def test_concurrent_runs_second_exits_at_once_first_finishes(finished, tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(th.cli_args(str(workdir), **BASE), env=th.env(1), cwd=th.REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 120
    while not (workdir / ".lock").exists() or not (workdir / ".lock").read_text():
      assert time.time() < deadline and first.poll() is None
      time.sleep(0.2)
    t0 = time.time()
    rc, out = cli(workdir)
    assert_user_error(rc, out, str(workdir), f"pid {first.pid}", "in use")
    assert time.time() - t0 < 60
    assert first.wait(timeout=240) == 0, first.stdout.read()[-3000:]
  finally:
    first.kill()
  assert_same_params(final_params(workdir), final_params(finished[0]))
  steps = [r["step"] for r in th.read_metrics(str(workdir)) if "loss" in r]
  assert steps == [4, 8, 12]


@pytest.mark.slow
def test_diverging_run_stops_before_its_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  rc, out = cli(workdir, **{"optim.lr": 1e6, "train.log_every_steps": 2})
  assert_user_error(rc, out, "diverged", "guard.")
  saved = run.checkpointer(str(workdir)).all_steps()
  assert all(s < 4 for s in saved), saved  # nothing after the divergence was checkpointed


@pytest.mark.slow
def test_sigint_then_resume_with_safe_changes(tmp_path):
  workdir = tmp_path / "run"
  # Enough steps that the run is still going when the signal lands (log lines sync each 2).
  overrides = {"train.total_steps": 120, "train.log_every_steps": 2,
               "train.checkpoint_every_steps": 4}
  proc = subprocess.Popen(th.cli_args(str(workdir), **overrides), env=th.env(1), cwd=th.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "step 8/120" in line:  # checkpoint 4 is written
      proc.send_signal(signal.SIGINT)
      break
  rest = proc.communicate(timeout=120)[0]
  out = "".join(lines) + rest
  assert proc.returncode == 130, out[-3000:]
  assert "Traceback" not in rest, rest[-3000:]
  tail = rest.strip().splitlines()
  assert tail and "rerun the same command to resume from checkpoint" in tail[-1], tail
  assert str(workdir) in tail[-1]
  # Safe fields may change on resume; they are logged.
  rc, out = cli(workdir, **{**overrides, "train.total_steps": 128, "train.log_every_steps": 64,
                            "train.keep_checkpoints": 1})
  assert rc == 0, out[-3000:]
  assert "Resumed from checkpoint" in out
  assert "changed settings" in out and "train.total_steps: 120 -> 128" in out
  assert json.load(open(workdir / "config.json"))["train"]["total_steps"] == 128
  assert trained.load_run(str(workdir)).step == 128


def _mount(*args) -> bool:
  return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_full_disk_stops_at_once_with_an_error_line(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)):
    pytest.skip("mounting a small tmpfs needs root")
  try:
    workdir = disk / "run"
    rc, out = cli(workdir, **{"train.checkpoint_every_steps": 1, "train.keep_checkpoints": 20})
    # Exit 2 and the one `error:` line last, naming the path. The save's TensorStore callbacks
    # find Orbax's event loop closed and would print a traceback each, before and after that
    # line, as many as the timing makes (none to dozens).
    lines = out.strip().splitlines()
    assert rc == 2, out[-3000:]
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    error = next(ln for ln in lines if ln.startswith("error: "))
    assert lines[-2:] == [error, "(run with --debug for the traceback)"], out[-3000:]
    assert "No space left on device" in error and str(disk) in error, error
    # It stops at the save that failed: no Orbax error lines, no partial checkpoint left.
    assert not [ln for ln in lines if ln.startswith("E") and "orbax" in ln.lower()], out[-3000:]
    ckpt_dir = workdir / "checkpoints"
    left = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
    assert not [n for n in left if "tmp" in n], left
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_finished_run_evaluates_from_a_read_only_folder(finished, tmp_path):
  workdir = copy_of(finished, tmp_path)
  os.remove(workdir / ".lock")  # a copy as shipped: no lock file either
  before = snapshot(workdir)
  if os.geteuid() != 0 or not _mount("--bind", str(workdir), str(workdir)):
    pytest.skip("a read-only bind mount needs root")
  try:
    if not _mount("-o", "remount,bind,ro", str(workdir)):
      pytest.skip("cannot remount read-only here")
    rc, out = cli(workdir)
  finally:
    subprocess.run(["umount", "-l", str(workdir)], check=False)
  assert rc == 0, out[-3000:]
  assert "Compiled the train step" not in out  # evaluating needs no train step
  want = [ln for ln in finished[1].splitlines() if "Done:" in ln][0].split("eval loss")[1]
  got = [ln for ln in out.splitlines() if "Done:" in ln][0]
  assert want.split(",")[0] in got
  assert snapshot(workdir) == before
  # Training on from a read-only folder is refused in one line.
  if _mount("--bind", str(workdir), str(workdir)) and _mount("-o", "remount,bind,ro",
                                                             str(workdir)):
    try:
      rc, out = cli(workdir, **{"train.total_steps": 14})
    finally:
      subprocess.run(["umount", "-l", str(workdir)], check=False)
    assert_user_error(rc, out, "Read-only file system", str(workdir))


# ------------------------------------------------------------------------------ HF loader

HF_TINY = ModelConfig(num_layers=1, d_model=8, num_heads=2, seq_len=4, vocab_size=3, causal=True)


@pytest.fixture
def hf_dir(tmp_path):
  shapes = jax.eval_shape(lambda: model.init_params(HF_TINY, jax.random.key(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  folder = tmp_path / "hf"
  convert_hf.save_hf_checkpoint(HF_TINY, params, str(folder))
  return folder


def _edit_config(folder, **changes):
  cfg = json.load(open(folder / "config.json"))
  cfg.update(changes)
  (folder / "config.json").write_text(json.dumps(cfg))


def _drop_bias(folder):
  from safetensors.numpy import load_file, save_file
  sd = load_file(str(folder / "model.safetensors"))
  del sd["transformer.h.0.mlp.c_fc.bias"]
  save_file(sd, str(folder / "model.safetensors"))


HF_CASES = {
    "model_type gpt2": (lambda f: _edit_config(f, model_type="gpt2"), None, "'gpt2'"),
    "model_type bert": (lambda f: _edit_config(f, model_type="bert"), None, "'bert'"),
    "empty config": (lambda f: (f / "config.json").write_text("{}"), None, "empty"),
    "config not JSON": (lambda f: (f / "config.json").write_text("n_embd: 8"), None, "not a JSON"),
    "missing Conv1D bias": (_drop_bias, None, "h.0.mlp.c_fc.bias"),
    "path does not exist": (None, "nope", "does not exist"),
    "config as weights": (None, "config.json", "not weights"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_loader_rejects_what_is_not_an_imagegpt_checkpoint(hf_dir, case):
  edit, path, match = HF_CASES[case]
  convert_hf.load_hf_checkpoint(str(hf_dir))  # the untouched folder loads
  if edit:
    edit(hf_dir)
  target = str(hf_dir / path) if path else str(hf_dir)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    convert_hf.load_hf_checkpoint(target)
  assert match in str(e.value)
  if path or case == "config not JSON":
    assert str(hf_dir) in str(e.value)  # names the path at fault
