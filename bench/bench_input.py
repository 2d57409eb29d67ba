"""Benchmark of the training input: images/s of `pipeline.batch_at` vs prefetch workers.

  python bench/bench_input.py --cifar_dir /data/cifar-10-batches-py
  python bench/bench_input.py --cifar_dir /data/cifar-10-batches-py --tfds_name cifar10 \
      --workers 0,1,2,4 --batch_sizes 128,512 --runs 3

Palette-encoded training batches (`igpt.pipeline.batch_at`, 512-colour palette fitted on the
CIFAR images) made through `igpt.prefetch.Prefetcher` with each of `--workers` (0 = in the
loop, no threads), read by a loop that does nothing else, so the number is what the input
side can feed. Sources:
  cifar: the CIFAR "python version" files in `--cifar_dir` (decoded once, held in memory);
  png:   a temporary folder of `--num_pngs` PNG files written from the same images (decoded
         by Pillow on every read, labels from class subfolders), removed at the end;
  tfds:  `--tfds_name` in `--tfds_data_dir` (array_record), when given and already prepared.
`--sources` picks among them (all by default).
Per (source, batch, workers): one untimed warm-up run (it also fills the palette's colour
table for these images), then the median of `--runs` runs of `--images_per_run` images.
cpu/wall is this process's CPU seconds per wall second (above 1: threads ran at once, the GIL
let them); idle is the whole machine's idle CPU seconds per wall second (Linux /proc/stat), so
cpu/wall stuck near 1 with a core idle means the GIL, with none idle the neighbours. run%,
rq%, gil%: the worker threads' time on a CPU, runnable but waiting for a core (the
neighbours), and asleep, which here means waiting for the GIL (they never run out of work: the
loop takes batches as fast as they come), from /proc/self/task/*/schedstat. img/cpu-s is
images per CPU second, what an image costs whatever the core count.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import threading
import time

import numpy as np
from absl import app, flags
from PIL import Image

from igpt import config as igpt_config
from igpt import palette as palette_lib
from igpt import pipeline, prefetch, readers

_CIFAR_DIR = flags.DEFINE_string("cifar_dir", None, "cifar-10-batches-py folder (or its parent).")
_SOURCES = flags.DEFINE_list("sources", ["cifar", "png", "tfds"], "Sources to time.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "", "A prepared TFDS dataset to time too.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "Its data_dir (default: tfds's).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["128", "512"], "Batch sizes.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2", "4"], "Prefetch worker counts.")
_RUNS = flags.DEFINE_integer("runs", 3, "Timed runs per cell (after one warm-up).")
_IMAGES = flags.DEFINE_integer("images_per_run", 16384, "Images per run.")
_NUM_PNGS = flags.DEFINE_integer("num_pngs", 4096, "PNG files written for the png source.")
_PALETTE_PIXELS = flags.DEFINE_integer("palette_fit_pixels", 100_000, "Pixels to fit on.")
_SIDE = 32


def data_config(**fields):
  """A `data` section (as a run config's) with `fields` set; no validation carve."""
  cfg = igpt_config.data_section()
  cfg.update(dict(val_split="test", **fields))
  return cfg


def write_pngs(source: readers.ImageSource, folder: str, count: int) -> readers.ImageSource:
  """The first `count` images of `source` as <folder>/train/<label>/<i>.png, read back."""
  images, labels = source.get(np.arange(min(count, len(source))))
  for i, (image, label) in enumerate(zip(images, labels)):
    class_dir = os.path.join(folder, "train", str(label))
    os.makedirs(class_dir, exist_ok=True)
    Image.fromarray(image).save(os.path.join(class_dir, f"{i:06d}.png"))
  return readers.make_source(data_config(source="folder", path=folder), "train", _SIDE)


def tfds_source() -> readers.ImageSource | None:
  """--tfds_name's train split, or None (with a line saying why) when it is not prepared."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  builder = tfds.builder(_TFDS_NAME.value, data_dir=_TFDS_DATA_DIR.value or None)
  if not builder.is_prepared():
    print(f"tfds: {_TFDS_NAME.value} is not prepared in {builder.data_dir}; skipped.")
    return None
  cfg = data_config(source="tfds", name=_TFDS_NAME.value, data_dir=_TFDS_DATA_DIR.value)
  return readers.make_source(cfg, "train", _SIDE)


def machine_idle_s() -> float:
  """Idle CPU seconds of the whole machine since boot (nan where /proc/stat is missing)."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
  except OSError:
    return float("nan")
  return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")  # idle + iowait


def thread_schedstat(native_id: int) -> tuple[float, float]:
  """(seconds on a CPU, seconds runnable but waiting for one) of a thread of this process."""
  try:
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
      on_cpu, runnable = f.read().split()[:2]
  except OSError:
    return float("nan"), float("nan")
  return int(on_cpu) / 1e9, int(runnable) / 1e9


def time_run(make_batch, steps: int, num_workers: int) -> dict:
  """Seconds to get steps 0..steps-1 through a Prefetcher: wall, process CPU, machine idle,
  and the workers' time on a CPU, waiting for one, and asleep (the GIL, as they never run
  out of work)."""
  wall, cpu, idle = time.perf_counter(), time.process_time(), machine_idle_s()
  with prefetch.Prefetcher(make_batch, 0, steps, num_workers) as batches:
    for step in range(steps):
      batches.get(step)
    lived = time.perf_counter() - wall  # the workers started with the Prefetcher
    workers = [thread_schedstat(t.native_id) for t in threading.enumerate()
               if t.name.startswith("igpt-input")]
  out = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
         "idle": machine_idle_s() - idle, "on_cpu": 0.0, "runnable": 0.0, "asleep": 0.0}
  for on_cpu, runnable in workers:
    out["on_cpu"] += on_cpu
    out["runnable"] += runnable
    out["asleep"] += max(0.0, lived - on_cpu - runnable)
  return out


def time_source(name: str, source, palette) -> None:
  """Prints one row per (batch, workers)."""
  for batch in map(int, _BATCH_SIZES.value):
    steps = max(1, _IMAGES.value // batch)
    make = functools.partial(pipeline.batch_at, source, palette, batch_size=batch, seed=0)
    for workers in map(int, _WORKERS.value):
      time_run(lambda s: make(step=s), steps, workers)  # warm-up
      runs = [time_run(lambda s: make(step=s), steps, workers) for _ in range(_RUNS.value)]
      rates = [steps * batch / run["wall"] for run in runs]
      total = {key: sum(run[key] for run in runs) for key in runs[0]}
      thread_s = total["on_cpu"] + total["runnable"] + total["asleep"]
      shares = (" ".join(f"{100 * total[k] / thread_s:>5.0f}"
                         for k in ("on_cpu", "runnable", "asleep"))
                if thread_s else f"{'-':>5} {'-':>5} {'-':>5}")
      print(f"{name:<6} {batch:>5} {workers:>7} {statistics.median(rates):>9.0f} "
            f"{min(rates):>8.0f} {max(rates):>8.0f} {total['cpu'] / total['wall']:>8.2f} "
            f"{total['idle'] / total['wall']:>5.2f} {shares} "
            f"{steps * batch * len(runs) / total['cpu']:>11.0f}", flush=True)


def main(argv):
  del argv
  if not _CIFAR_DIR.value:
    raise app.UsageError("--cifar_dir is required (a cifar-10-batches-py folder).")
  cifar = readers.make_source(data_config(source="cifar", path=_CIFAR_DIR.value), "train", _SIDE)
  t0 = time.perf_counter()
  palette = palette_lib.fit_palette(pipeline.sample_pixels(cifar, _PALETTE_PIXELS.value, 0), 512, 0)
  print(f"{len(cifar)} CIFAR training images; {len(palette)}-colour palette fitted in "
        f"{time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; median of {_RUNS.value} runs of {_IMAGES.value} images")
  print(f"{'source':<6} {'batch':>5} {'workers':>7} {'img/s':>9} {'min':>8} {'max':>8} "
        f"{'cpu/wall':>8} {'idle':>5} {'run%':>5} {'rq%':>5} {'gil%':>5} {'img/cpu-s':>11}")
  if "cifar" in _SOURCES.value:
    time_source("cifar", cifar, palette)
  if "png" in _SOURCES.value:
    with tempfile.TemporaryDirectory() as folder:
      time_source("png", write_pngs(cifar, folder, _NUM_PNGS.value), palette)
  if "tfds" in _SOURCES.value and _TFDS_NAME.value:
    source = tfds_source()
    if source is not None:
      time_source("tfds", source, palette)
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
