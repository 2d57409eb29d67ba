"""Tests for igpt.checkpoint.

Cases that need a fresh JAX (8 fake CPU devices) or a process to kill run this file as a
script in a subprocess: `python tests/test_checkpoint.py <case> <directory>` (see the end).
"""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from igpt.checkpoint import Checkpointer

TMP = ".orbax-checkpoint-tmp"


def _params(scale=1.0, big=False):
  # big: 64 MiB of params (192 MiB with Adam's moments), slow enough to kill mid-write.
  shape = (4096, 4096) if big else (8, 4)
  return {"wte": {"embedding": scale * jnp.arange(np.prod(shape), dtype=jnp.float32)
                  .reshape(shape)},
          "ln_f": {"scale": jnp.full((16,), scale, jnp.float32)}}


def _state(scale=1.0, big=False):
  params = _params(scale, big)
  opt = optax.adam(1e-3)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt.init(params), params)  # non-trivial mu/nu/count
  return {"params": params, "opt": opt_state, "step": jnp.int32(7)}


def _abstract(state, sharding=None):
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_adam_state_and_extra(tmp_path):
  state = _state()
  extra = {"data": {"epoch": 2, "index": 1234}, "config": {"lr": 1e-3, "name": "tiny"},
           "palette": [[0, 1, 2], [3, 4, 5]]}
  with Checkpointer(tmp_path, keep=3) as ckpt:
    ckpt.save(7, state, extra)
    ckpt.wait()
  with Checkpointer(tmp_path, keep=3) as ckpt:  # a fresh process would see the same
    assert ckpt.latest_step() == 7
    # The trainer's abstract tree comes from eval_shape, so the namedtuples come from optax.
    abstract = _abstract(jax.eval_shape(lambda: _state()))
    restored, restored_extra = ckpt.restore(7, abstract)
  _assert_same(restored, state)  # incl. ScaleByAdamState / EmptyState namedtuples
  assert restored_extra == extra


def test_save_may_donate_state_right_away(tmp_path):
  state, expected = _state(), jax.tree.map(np.asarray, _state())
  with Checkpointer(tmp_path, keep=1) as ckpt:
    ckpt.save(1, state, {})
    jax.tree.map(lambda x: x.delete(), state)  # what donate_argnums does to the buffers
    ckpt.wait()
    restored, _ = ckpt.restore(1, _abstract(expected))
  _assert_same(restored, expected)


def test_empty_directory_and_keep_last_n(tmp_path):
  with Checkpointer(tmp_path / "run", keep=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in range(1, 6):
      ckpt.save(step, _state(step), {"step": step})
    assert ckpt.latest_step() in (4, 5)  # 5 may still be in flight
    ckpt.wait()
    assert ckpt.latest_step() == 5
    assert ckpt.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path / "run")) == ["4", "5"]
    restored, extra = ckpt.restore(4, _abstract(_state()))
  _assert_same(restored, _state(4))
  assert extra == {"step": 4}


def test_missing_step_and_mismatched_tree_are_clear_errors(tmp_path):
  with Checkpointer(tmp_path, keep=2) as ckpt:
    ckpt.save(1, _state(), {})
    ckpt.save(2, _state(), {})
    ckpt.wait()
    abstract = _abstract(_state())
    with pytest.raises(ValueError, match=rf"step 9 in {tmp_path}.*available steps: \[1, 2\]"):
      ckpt.restore(9, abstract)

    missing = dict(abstract, params={"wte": abstract["params"]["wte"]})
    with pytest.raises(ValueError, match=r"params\.ln_f\.scale: in the checkpoint but not"):
      ckpt.restore(2, missing)
    added = dict(abstract, ema=abstract["params"])
    with pytest.raises(ValueError, match=r"ema\.wte\.embedding: not in the checkpoint"):
      ckpt.restore(2, added)
    wrong = jax.tree.map(lambda x: x, abstract)
    wrong["params"]["wte"]["embedding"] = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"params\.wte\.embedding: shape \(8, 4\) in the "
                                         r"checkpoint, \(4, 8\)"):
      ckpt.restore(2, wrong)
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(3, _state(), {"lr": np.float32(1)})  # at the call, not in a background thread


def test_latest_step_ignores_save_in_flight(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  release = threading.Event()
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_finalize(self):  # holds step 2 just before its commit until released
    release.wait(30)
    await finalize(self)
  with Checkpointer(tmp_path, keep=3) as ckpt:
    ckpt.save(1, _state(), {})
    ckpt.wait()
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_finalize)
    ckpt.save(2, _state(), {})
    try:
      assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    finally:
      release.set()
    ckpt.wait()
    assert ckpt.latest_step() == 2


@pytest.mark.parametrize("when", ["during_write", "before_commit"])
def test_sigkill_mid_save_keeps_previous_step(tmp_path, when):
  """A process killed while saving step 2 leaves step 1 as the latest, restorable step."""
  proc = subprocess.Popen([sys.executable, __file__, f"save_two_{when}", str(tmp_path)],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), stderr=subprocess.DEVNULL)
  # during_write: the first array bytes of step 2 are on disk (the whole write takes ~0.3 s);
  # before_commit: all of step 2 is written, the rename to "2/" is next.
  ready = {"during_write": lambda: any(tmp_path.glob(f"2{TMP}/**/d/*")),
           "before_commit": lambda: (tmp_path / "committing").exists()}[when]
  deadline = time.time() + 60
  while not ready():
    assert proc.poll() is None and time.time() < deadline, "child died or hung"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert (tmp_path / f"2{TMP}").is_dir() and not (tmp_path / "2").exists()

  with Checkpointer(tmp_path, keep=3) as ckpt:
    assert ckpt.latest_step() == 1
    restored, extra = ckpt.restore(1, _abstract(_state()))
    _assert_same(restored, _state(1.0))
    assert extra == {"step": 1}
    with pytest.raises(ValueError, match=r"available steps: \[1\]"):
      ckpt.restore(2, _abstract(_state()))
    ckpt.save(2, _state(2.0), {"step": 2})  # the stray tmp dir of step 2 is replaced
    ckpt.save(3, _state(3.0), {"step": 3})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3] and ckpt.latest_step() == 3
    _assert_same(ckpt.restore(2, _abstract(_state()))[0], _state(2.0))
  assert not (tmp_path / f"2{TMP}").exists()


def test_restore_onto_other_meshes(tmp_path):
  """Saved sharded over 8 devices; restored onto a 2x4 mesh, one device, and here (1 CPU)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, __file__, "save_8_restore_2x4", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
  assert "restored onto 2x4 and 1 device" in out.stdout, out.stderr[-3000:]
  with Checkpointer(tmp_path, keep=1) as ckpt:
    restored, extra = ckpt.restore(1, _abstract(_state()))
  _assert_same(restored, _state())
  assert extra == {"devices": 8}


# ---- Subprocess cases ----

def _save_two(directory, hang_before_commit):
  """Saves step 1, then step 2 (big) and waits; the parent kills this process during step 2."""
  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(1, _state(1.0), {"step": 1})
  ckpt.wait()
  if hang_before_commit:  # stands in for a slow filesystem at the worst moment
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel

    async def hang(self):
      open(os.path.join(directory, "committing"), "w").close()
      time.sleep(600)
    atomicity.AtomicRenameTemporaryPath.finalize = hang
  ckpt.save(2, _state(2.0, big=True), {"step": 2})
  ckpt.wait()
  time.sleep(600)


def _save_8_restore_2x4(directory):
  assert jax.device_count() == 8
  state = _state()
  mesh8 = jax.make_mesh((8,), ("data",))
  place = lambda x: jax.device_put(  # shard dim 0 where it divides, else replicate
      x, NamedSharding(mesh8, P("data") if x.ndim and x.shape[0] % 8 == 0 else P()))
  with Checkpointer(directory, keep=1) as ckpt:
    sharded = jax.tree.map(place, state)
    assert len(sharded["params"]["wte"]["embedding"].addressable_shards) == 8
    ckpt.save(1, sharded, {"devices": 8})
  mesh2x4 = jax.make_mesh((2, 4), ("a", "b"))
  spec = lambda x: P(*("a", "b")[:x.ndim]) if all(d % 4 == 0 for d in x.shape[:2]) else P()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh2x4, spec(x))), state)
  assert abstract["params"]["wte"]["embedding"].sharding.spec == P("a", "b")
  mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  with Checkpointer(directory, keep=1) as ckpt:
    for target in (abstract, _abstract(state, NamedSharding(mesh1, P()))):
      restored, _ = ckpt.restore(1, target)
      for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert x.sharding == t.sharding, (x.sharding, t.sharding)
      _assert_same(restored, state)
  print("restored onto 2x4 and 1 device")


if __name__ == "__main__":
  case, directory = sys.argv[1:]
  if case == "save_8_restore_2x4":
    _save_8_restore_2x4(directory)
  else:
    _save_two(directory, hang_before_commit=case == "save_two_before_commit")
