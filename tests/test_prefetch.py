"""The prefetcher: the batches of `pipeline.batch_at`, whatever the workers, errors at their
step, no thread left behind, and the time the loop waited for input."""

from __future__ import annotations

import functools
import threading
import time
import traceback

import numpy as np
import pytest
from PIL import Image

from igpt import palette, pipeline, prefetch, readers
from igpt.errors import UserError

import train_helpers as th

BATCH = 64  # the 1,237 training digits make 19.3 batches per epoch: steps 0-29 cross one


@pytest.fixture(scope="module")
def digits():
  cfg = th.tiny_config()
  source = readers.make_source(cfg.data, "train", cfg.model.image_side)
  return source, palette.fit_palette(pipeline.sample_pixels(source, 5_000, seed=0),
                                     cfg.data.palette_size, seed=0)


def _batch_maker(source, palette, augment=True):
  return functools.partial(pipeline.batch_at, source, palette, batch_size=BATCH, seed=3,
                           augment=augment)


def _assert_same(got: dict, want: dict):
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _input_threads():
  return [t for t in threading.enumerate() if t.name.startswith("igpt-input")]


@pytest.mark.parametrize("num_workers", [0, 1, 4])
@pytest.mark.parametrize("start_step", [0, 13])
def test_batches_are_batch_at_whatever_the_workers_and_start(digits, num_workers, start_step):
  make = _batch_maker(*digits)
  with prefetch.Prefetcher(lambda s: make(step=s), start_step, 30, num_workers) as batches:
    for step in range(start_step, 30):
      _assert_same(batches.get(step), make(step=step))
    _assert_same(batches.get(31), make(step=31))  # past stop_step: made on the spot


def test_asking_out_of_order_restarts_the_read_ahead(digits):
  make = _batch_maker(*digits, augment=False)
  with prefetch.Prefetcher(lambda s: make(step=s), 0, 30, num_workers=2, depth=3) as batches:
    for step in (0, 1, 9, 10, 4, 5, 29):
      _assert_same(batches.get(step), make(step=step))


def test_workers_run_at_the_same_time():
  barrier = threading.Barrier(4, timeout=20)  # broken unless 4 batches are made at once

  def make(step):
    if step < 4:
      barrier.wait()
    return step

  with prefetch.Prefetcher(make, 0, 8, num_workers=4) as batches:
    assert [batches.get(s) for s in range(8)] == list(range(8))


def test_an_unreadable_image_fails_at_its_own_step(tmp_path, digits):
  source, palette = digits
  images, _ = source.get(np.arange(40))
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
  bad_step = 3  # its batch holds the only bad file in epoch 0 (steps 0-4)
  bad = pipeline.batch_indices_at(len(images), bad_step, 8, seed=0)[0]
  (tmp_path / f"{bad:03d}.png").write_bytes(b"not a png")
  files = readers.FileSource(sorted(str(p) for p in tmp_path.iterdir()), None, 8, "pngs", None)
  make = functools.partial(pipeline.batch_at, files, palette, batch_size=8, seed=0)
  with prefetch.Prefetcher(lambda s: make(step=s), 0, 10, num_workers=2, depth=8) as batches:
    for step in range(bad_step):
      _assert_same(batches.get(step), make(step=step))
    with pytest.raises(UserError) as raised:
      batches.get(bad_step)
  message = str(raised.value)
  assert message.startswith(f"input batch of step {bad_step}: Image file ")
  assert f"{bad:03d}.png" in message and "\n" not in message


class _Boom(RuntimeError):
  pass


def _fail_at(bad_step, error):
  def make(step):
    if step == bad_step:
      raise error
    return step
  return make


@pytest.mark.parametrize("num_workers", [0, 3])
def test_a_bug_keeps_its_type_and_the_worker_traceback(num_workers):
  with prefetch.Prefetcher(_fail_at(5, _Boom("bad row 7")), 0, 9, num_workers) as batches:
    assert [batches.get(s) for s in range(5)] == list(range(5))
    with pytest.raises(_Boom, match=r"^input batch of step 5: bad row 7$") as raised:
      batches.get(5)
    assert batches.get(6) == 6  # the steps after it are unharmed
  frames = traceback.extract_tb(raised.value.__traceback__)
  assert any(f.name == "make" for f in frames)


def test_an_os_error_keeps_its_fields_and_gets_a_note():
  error = FileNotFoundError(2, "No such file or directory", "/data/x.png")
  with prefetch.Prefetcher(_fail_at(1, error), 0, 4, num_workers=1) as batches:
    batches.get(0)
    with pytest.raises(FileNotFoundError) as raised:
      batches.get(1)
  assert raised.value is error and error.filename == "/data/x.png"
  assert str(error) == "[Errno 2] No such file or directory: '/data/x.png'"
  if hasattr(error, "__notes__"):
    assert error.__notes__ == ["raised while making the input batch of step 1"]


def test_close_ends_every_worker_even_mid_batch():
  started = threading.Event()

  def slow(step):
    started.set()
    time.sleep(0.2)
    return step

  batches = prefetch.Prefetcher(slow, 0, 1000, num_workers=4, depth=16)
  assert started.wait(10) and _input_threads()
  batches.close()
  assert not _input_threads()
  with pytest.raises(RuntimeError, match="closed"):
    batches.get(0)
  with pytest.raises(ZeroDivisionError):  # leaving the block by an error closes it too
    with prefetch.Prefetcher(slow, 0, 1000, num_workers=2):
      1 / 0  # noqa: B018
  assert not _input_threads()


def test_slow_input_shows_in_the_wait_stats():
  def slow(step):
    time.sleep(0.03)
    return step

  with prefetch.Prefetcher(slow, 0, 100, num_workers=1) as batches:
    for step in range(10):
      batches.get(step)
    stats = batches.take_wait_stats()
    assert (stats.steps, stats.first_step, stats.last_step) == (10, 0, 9)
    assert stats.wait_s >= 0.2 and stats.fraction > 0.7
    line = prefetch.input_bound_warning(stats, "raise data.num_workers")
    assert line.startswith("step 9 waited ") and line.endswith(": raise data.num_workers")
    assert batches.take_wait_stats().steps == 0  # a new window

    # A loop slower than its input: the workers keep ahead, nothing to warn about.
    for step in range(10, 20):
      batches.get(step)
      time.sleep(0.09)
    stats = batches.take_wait_stats()
    assert stats.fraction < 0.3 and stats.total_s > 0.8
    assert prefetch.input_bound_warning(stats, "raise data.num_workers", threshold=0.3) is None
