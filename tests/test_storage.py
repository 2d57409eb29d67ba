"""Run folders and data in object storage: the tiny config trains into a `gs://` bucket served
on localhost by a GCS-protocol server (fake-gcs-server), is killed and resumed, and every
reader (sample.py, probe.py, load_run, TensorBoard, the data sources) reads it from there.

The clients find the server through the standard variables only (STORAGE_EMULATOR_HOST,
TENSORSTORE_GCS_HTTP_URL, AWS_ENDPOINT_URL; see tests/object_stores.py). Skips where a
server's wheel or its client is not installed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

import object_stores
import train_helpers as th

pytestmark = pytest.mark.skipif(object_stores.gcs_available() is not None,
                                reason=str(object_stores.gcs_available()))

# Enough steps after the kill point to resume; checkpoints every 3 so one lands early.
OVERRIDES = {"train.total_steps": 24, "train.checkpoint_every_steps": 3,
             "train.log_every_steps": 3, "train.eval_every_steps": 12,
             "train.keep_checkpoints": 10}
BUCKET_URL = f"gs://{object_stores.BUCKET}"


@pytest.fixture(scope="module")
def gcs():
  """The GCS server, with this process's clients pointed at it (subprocesses inherit that)."""
  with object_stores.GcsServer().serving() as server:
    yield server


def _storage():
  from igpt import storage  # noqa: PLC0415
  return storage


def _cli(workdir, **extra):
  return th.cli_args(workdir, **{k.replace(".", "__"): v for k, v in {**OVERRIDES, **extra}.items()})


def _config():
  return th.tiny_config(**{k.replace(".", "__"): v for k, v in OVERRIDES.items()})


def _steps(url: str) -> list[int]:
  storage = _storage()
  folder = storage.join(url, "checkpoints")
  if not storage.isdir(folder):
    return []
  return sorted(int(n) for n in storage.listdir(folder) if n.isdigit()
                and storage.exists(storage.join(folder, n, "commit_success.txt")))


def _metric_steps(url: str) -> list[int]:
  text = _storage().read_text(_storage().join(url, "metrics.jsonl"))
  return [r["step"] for r in map(json.loads, filter(None, text.splitlines())) if "loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run on the local disk: what the bucket run must equal."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  th.run(_cli(workdir))
  return workdir


@pytest.fixture(scope="module")
def bucket_run(gcs, straight):
  """The same run into the bucket, SIGKILLed after a checkpoint and resumed by the same
  command; (url, the step it was killed after)."""
  url = f"{BUCKET_URL}/runs/tiny"
  victim = subprocess.Popen(_cli(url), env=th.env(1), cwd=th.REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not [s for s in _steps(url) if s >= 6] and victim.poll() is None:
    assert time.time() < deadline
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = max(_steps(url))
  assert 6 <= killed_at < OVERRIDES["train.total_steps"]
  proc = th.run(_cli(url))
  assert f"Resumed from checkpoint step {killed_at}" in proc.stderr, proc.stderr[-3000:]
  return url, killed_at


def _assert_same_state(a_dir, b_dir):
  step_a, a, extra_a = th.restore_latest(_config(), a_dir)
  step_b, b, extra_b = th.restore_latest(_config(), b_dir)
  assert step_a == step_b == OVERRIDES["train.total_steps"]
  assert extra_a["data"] == extra_b["data"]
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                  strict=True):
    np.testing.assert_array_equal(x, y)  # bit for bit: params, Adam moments, step


@pytest.mark.slow
def test_killed_bucket_run_resumes_to_the_local_runs_state(bucket_run, straight):
  url, _ = bucket_run
  storage = _storage()
  _assert_same_state(straight, url)
  # metrics.jsonl (rewritten whole, never appended) holds each logged step once.
  assert _metric_steps(url) == [r["step"] for r in th.read_metrics(straight) if "loss" in r]
  assert json.loads(storage.read_text(storage.join(url, "config.json")))
  assert not storage.exists(storage.join(url, ".lock"))  # the lease is given back at the end


def test_tensorboard_reads_the_events_in_the_bucket(bucket_run):
  # TensorBoard without TensorFlow reads gs:// through fsspec (gcsfs); with TensorFlow it
  # would take tf.io.gfile, which knows no emulator. So: a subprocess that hides TF.
  url, _ = bucket_run
  script = textwrap.dedent(f"""
      import json, sys
      sys.modules["tensorflow"] = None
      from tensorboard.backend.event_processing import event_accumulator
      acc = event_accumulator.EventAccumulator("{url}/tensorboard", size_guidance={{"scalars": 0}})
      acc.Reload()
      print(json.dumps({{t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}}))
  """)
  proc = subprocess.run([sys.executable, "-c", script], env=th.env(1), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  scalars = json.loads(proc.stdout.strip().splitlines()[-1])
  loss_tag = next(t for t in scalars if t.endswith("loss") and "eval" not in t)
  assert scalars[loss_tag] == _metric_steps(url)  # each step once, the killed run's extra gone


@pytest.mark.slow
def test_sample_probe_and_load_run_read_the_bucket_run(bucket_run):
  from igpt import trained  # noqa: PLC0415

  url, _ = bucket_run
  storage = _storage()
  proc = subprocess.run(
      [sys.executable, os.path.join(th.REPO, "sample.py"), "--workdir", url,
       "--config.num_samples=2", "--config.completions_per_image=2", "--config.name=grid"],
      env=th.env(1), cwd=th.REPO, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tokens = np.load(io.BytesIO(storage.read_bytes(f"{url}/samples/grid.npy")))
  assert tokens.shape == (2, 2, 64)
  assert storage.read_bytes(f"{url}/samples/grid.png")[:8] == b"\x89PNG\r\n\x1a\n"

  proc = subprocess.run(
      [sys.executable, os.path.join(th.REPO, "probe.py"), "--workdir", url,
       "--config.data.source=digits", "--config.data.name=digits",
       "--config.data.val_examples=200", "--config.l2_grid=(0.01,)", "--config.batch_size=128",
       "--config.random_init_control=False"],
      env=th.env(1), cwd=th.REPO, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(storage.read_text(f"{url}/probe/results_digits.json"))
  assert [r["layer"] for r in results["pretrained"]["layers"]] == [0, 1]
  cached = [n for n in storage.listdir(f"{url}/probe/features") if n.endswith(".npz")]
  assert len(cached) == 6  # two layers x three splits, in the bucket

  model = trained.load_run(url)
  assert model.step == OVERRIDES["train.total_steps"] and model.palette.shape == (16, 3)


def test_a_second_run_on_the_folder_is_refused_with_the_holder(gcs, tmp_path):
  from igpt import lease  # noqa: PLC0415

  url = f"{BUCKET_URL}/runs/held"
  storage = _storage()
  # A live holder: this test process, on this host, renewed just now.
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "x",
            "since": "now", "renewed": time.time()}
  storage.write_bytes(f"{url}/.lock", json.dumps(holder).encode())
  t0 = time.time()
  proc = subprocess.run(_cli(url), env=th.env(1), cwd=th.REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
  assert len(error) == 1 and url in error[0] and f"pid {os.getpid()}" in error[0], error
  assert "Traceback" not in proc.stderr and time.time() - t0 < 60
  assert not storage.exists(f"{url}/checkpoints") and not storage.exists(f"{url}/config.json")

  # In-process: a held lease refuses a second holder; a released one is gone.
  storage.remove(f"{url}/.lock")
  with lease.hold(f"{url}/.lock", url) as refused:
    assert refused is None and lease.read(f"{url}/.lock")["pid"] == os.getpid()
    with pytest.raises(lease.LeaseHeld, match="in use by pid"):
      with lease.hold(f"{url}/.lock", url):
        pass
  assert not storage.exists(f"{url}/.lock")


def test_lease_staleness():
  from igpt import lease  # noqa: PLC0415

  now = 1_000_000.0
  here = socket.gethostname()
  dead = subprocess.Popen(["true"])
  dead.wait()
  assert lease.is_stale({"host": "elsewhere", "pid": 1, "renewed": now - 301}, now)
  assert not lease.is_stale({"host": "elsewhere", "pid": 1, "renewed": now - 299}, now)
  # On this host a dead holder is stale at once; a live one is not.
  assert lease.is_stale({"host": here, "pid": dead.pid, "renewed": now}, now)
  assert not lease.is_stale({"host": here, "pid": os.getppid(), "renewed": now}, now)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_in_the_bucket_is_set_aside(bucket_run, straight):
  # It rewrites the bucket run, to the same final state.
  url, _ = bucket_run
  storage = _storage()
  newest = f"{url}/checkpoints/{OVERRIDES['train.total_steps']}"
  data = f"{newest}/params/ocdbt.process_0/d"
  victim = max(storage.listdir(data), key=lambda n: len(storage.read_bytes(f"{data}/{n}")))
  storage.remove(f"{data}/{victim}")
  proc = th.run(_cli(url))
  assert f"checkpoints/{OVERRIDES['train.total_steps']} is damaged" in proc.stderr
  assert storage.isdir(f"{newest}.damaged")
  _assert_same_state(straight, url)
  assert _metric_steps(url) == sorted(set(_metric_steps(url)))


@pytest.fixture(scope="module")
def s3():
  """moto's S3 server, with this process's (and its subprocesses') AWS clients pointed at it."""
  why = object_stores.s3_available()
  if why:
    pytest.skip(why)
  with object_stores.S3Server().serving() as server:
    yield server


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_palette_and_cifar_folder_read_from_the_bucket(store, request):
  bucket = BUCKET_URL if store == "gcs" else f"s3://{object_stores.BUCKET}"
  request.getfixturevalue(store)
  from igpt import config as config_lib  # noqa: PLC0415
  from igpt import palette, readers  # noqa: PLC0415

  storage = _storage()
  centers = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
  buf = io.BytesIO()
  np.save(buf, centers)
  storage.write_bytes(f"{bucket}/data/palette.npy", buf.getvalue())
  np.testing.assert_array_equal(palette.load_palette(f"{bucket}/data/palette.npy"), centers)

  def put(name, images):
    record = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
              b"labels": list(range(len(images))), b"batch_label": b"fixture"}
    storage.write_bytes(f"{bucket}/data/cifar-10-batches-py/{name}",
                        pickle.dumps(record, protocol=2))

  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  put("data_batch_1", images[:5])
  put("test_batch", images[5:])
  cfg = config_lib.base_config(num_layers=1, d_model=8, num_heads=1).data
  cfg.update(source="cifar", path=f"{bucket}/data/cifar-10-batches-py", val_split="test")
  train = readers.make_source(cfg, "train", 32)
  np.testing.assert_array_equal(train.get(np.arange(5))[0], images[:5])
  np.testing.assert_array_equal(readers.make_source(cfg, "test", 32).get(np.arange(2))[0],
                                images[5:])
  # The local copy is reused, except for an object rewritten since (even at the same size).
  put("test_batch", images[:2])
  np.testing.assert_array_equal(readers.make_source(cfg, "test", 32).get(np.arange(2))[0],
                                images[:2])


def test_a_missing_bucket_is_one_error_line(gcs):
  url = "gs://no-such-bucket-igpt/runs/tiny"
  proc = subprocess.run(_cli(url), env=th.env(1), cwd=th.REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  error = [ln for ln in lines if ln.startswith("error: ")]
  assert len(error) == 1 and "no-such-bucket-igpt" in error[0], lines[-5:]
  assert "Traceback" not in proc.stderr and len(lines) <= 12, lines


def test_an_imported_run_and_a_transformers_folder_in_the_bucket(bucket_run, tmp_path):
  # What `python -m igpt.import_openai --out gs://... --hf_out gs://...` writes: the run in
  # place (Orbax commits it), the transformers folder built locally and uploaded.
  from igpt import trained  # noqa: PLC0415
  from igpt.commands import import_openai  # noqa: PLC0415
  from igpt.convert import hf as convert_hf  # noqa: PLC0415

  url, _ = bucket_run
  storage = _storage()
  source = trained.load_run(url)
  config = json.loads(storage.read_text(f"{url}/config.json"))
  out = f"{BUCKET_URL}/imported/run"
  with import_openai._building(out) as tmp:
    trained.save_run(tmp, ml_collections.ConfigDict(config), source.palette, source.params, 7)
  import_openai._publish(tmp, out)
  back = trained.load_run(out)
  assert back.step == 7
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params),
               jax.device_get(source.params))

  hf_out = f"{BUCKET_URL}/imported/hf"
  with import_openai._building(hf_out, local=True) as tmp:
    assert not storage.is_remote(tmp)
    convert_hf.save_hf_checkpoint(source.model_cfg, source.params, tmp)
  import_openai._publish(tmp, hf_out)
  assert not os.path.exists(tmp)
  hf = trained.load_hf(hf_out, f"{url}/palette.npy")
  np.testing.assert_array_equal(hf.palette, source.palette)
  jax.tree.map(np.testing.assert_allclose, jax.device_get(hf.params),
               jax.device_get(source.params))

  # A failed import leaves nothing in the bucket; an existing --out is refused.
  failed = f"{BUCKET_URL}/imported/failed"
  with pytest.raises(RuntimeError):
    with import_openai._building(failed) as tmp:
      storage.write_bytes(f"{tmp}/config.json", b"{}")
      raise RuntimeError("killed mid-import")
  assert not storage.exists(failed)
  with pytest.raises(FileExistsError, match="already exists"):
    import_openai._check_new_folder(out, "out")


@pytest.mark.slow
def test_two_processes_train_into_the_bucket(gcs, tmp_path):
  # A pod's shape: two jax.distributed processes, one bucket folder, no shared disk. Each
  # writes its own share of every checkpoint; process 0 holds the lease and writes the rest.
  import test_multiprocess  # noqa: PLC0415

  url = f"{BUCKET_URL}/runs/two_processes"
  test_multiprocess._run_two_processes(url, str(tmp_path))
  storage = _storage()
  steps = test_multiprocess.OVERRIDES["train.total_steps"]
  assert _steps(url)[-1] == steps
  params = storage.listdir(f"{url}/checkpoints/{steps}/params")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(params), params
  assert _metric_steps(url) == [3, 6] and not storage.exists(f"{url}/.lock")


def test_an_s3_run_folder_is_refused_before_anything_is_written(s3):
  # Orbax (0.12) writes checkpoints to GCS and disks only; everything else may be in S3.
  url = f"s3://{object_stores.BUCKET}/runs/tiny"
  proc = subprocess.run(_cli(url), env=th.env(1), cwd=th.REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
  assert len(error) == 1 and url in error[0] and "gs://" in error[0], proc.stderr[-2000:]
  assert not _storage().exists(url)
