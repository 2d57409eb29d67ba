"""The body of `sample.py`: load a model, pick prompts, sample, and write a PNG grid + tokens.

Completion (`mode="completion"`): images from a split of the run's data or from image files;
the top `prompt_rows` rows are kept and the rest is sampled, `completions_per_image` times.
Each grid row is the original, the prompt (unknown part grey), then the completions.
Unconditional (`mode="unconditional"`): `num_samples` images from nothing, in a grid.
Beside `<name>.png` goes `<name>.npy`: the sampled tokens ([images, completions, L] or
[samples, L]); the two are published together or not at all. The default name says where the
prompts came from (`output_name`).
"""

from __future__ import annotations

import hashlib
import math
import os
import time

import jax
import numpy as np
from absl import logging

from igpt import compile_cache, fileio, palette, pipeline, readers, run, sampling, storage, trained
from igpt.errors import MissingFileError, UserError
from igpt.pictures import TARGET_CELL_PX, completion_rows, grid

MODES = ("completion", "unconditional")


def settings_from(config) -> sampling.Settings:
  """The sampling controls of a sample config, checked."""
  return sampling.Settings(temperature=float(config.temperature), top_k=int(config.top_k),
                           top_p=float(config.top_p), greedy=bool(config.greedy)).check()


def check_config(config) -> None:
  """Rejects bad settings before any model is loaded."""
  if config.mode not in MODES:
    raise UserError(f"mode={config.mode!r} must be one of {list(MODES)}.")
  for name in ("num_samples", "completions_per_image", "batch_size"):
    if int(config[name]) < 1:
      raise UserError(f"{name}={config[name]} must be >= 1.")
  for name in ("prompt_rows", "first_image_index", "upscale_factor", "segment_positions"):
    if int(config[name]) < 0:
      raise UserError(f"{name}={config[name]} must be >= 0.")
  settings_from(config)


def load_model(source: trained.ModelSource) -> trained.TrainedModel:
  """The model to sample from: it needs a palette to turn its tokens into pixels."""
  source.check()
  if source.hf and not source.palette:
    raise UserError("--hf needs --palette (a [k, 3] .npy of colours in [-1, 1], like "
                    "kmeans_centers.npy).")
  m = source.load()
  if len(m.palette) < m.model_cfg.vocab_size:
    if source.palette:
      # A palette from outside that lacks colours is most likely another model's.
      raise UserError(f"the palette {source.palette} has {len(m.palette)} colours but the "
                      f"model has {m.model_cfg.vocab_size} tokens: use the palette it was "
                      "trained with.")
    # A run trained on a smaller palette (its training said so): its other tokens never
    # occurred, and they are never drawn.
    logging.info("the run's palette has %d colours for %d tokens: sampling only those.",
                 len(m.palette), m.model_cfg.vocab_size)
    m = m.within_palette()
  return m


def prompt_rows(config, side: int) -> int:
  """Rows kept from each image: config.prompt_rows, or the top half when it is 0."""
  rows = int(config.prompt_rows) or side // 2
  if rows >= side:
    raise UserError(f"prompt_rows={rows} leaves nothing to sample: the images have {side} rows "
                    f"(use at most {side - 1}).")
  return rows


def image_paths(config) -> list[str]:
  """The files of config.images (comma-separated files and folders), in order."""
  files = []
  for path in str(config.images).split(","):
    path = storage.local_copy(path)  # a bucket's images are read from a local copy
    if os.path.isdir(path):
      found = readers.image_files(path)
      if not found:
        raise UserError(f"images: the folder {path!r} holds no image files (looked for "
                        f"{', '.join(readers.IMAGE_EXTENSIONS)}).")
      files += found
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise MissingFileError(f"images: {path!r} is neither an image file nor a folder.")
  return files


def images_origin(files) -> str:
  """'images-<hash>': names prompts taken from these image files (a short hash of their
  absolute paths), so completions of other files do not overwrite them."""
  listing = "\n".join(os.path.abspath(f) for f in files)
  return "images-" + hashlib.sha256(listing.encode()).hexdigest()[:8]


def load_prompt_tokens(config, m: trained.TrainedModel) -> tuple[np.ndarray, str]:
  """(int32 [num_samples, side*side] tokens of the images to complete, where they came from
  for the output name): image files ('images-<hash>') or a split of the run's data (its
  name), encoded with the model's palette; a pre-tokenised split is read as it is."""
  first, count = int(config.first_image_index), int(config.num_samples)
  if config.images:
    files = image_paths(config)
    source = readers.FileSource(files, None, m.image_side, "image files", None)
    origin = images_origin(files[first:first + count])
  elif m.data is None:
    raise UserError("--hf has no training data to take prompts from: set --config.images "
                    "(files or folders) or --config.mode=unconditional.")
  else:
    source = readers.make_source(m.data, config.split, m.image_side)
    origin = str(config.split)
  if first + count > len(source):
    raise UserError(f"first_image_index={first} + num_samples={count} exceeds the "
                    f"{len(source)} images of {source.description}.")
  return pipeline.token_batch(source, m.palette, np.arange(first, first + count))["tokens"], origin


def output_name(config, step: int, origin: str = "") -> str:
  """config.name, or `<mode>[_<origin>]_step<step>_seed<seed>`: completions say where their
  prompts came from (`origin`), so a split's and image files' do not overwrite each other."""
  if config.name:
    return str(config.name)
  mode = f"{config.mode}_{origin}" if origin else str(config.mode)
  return f"{mode}_step{step}_seed{config.seed}"


class Progress:
  """Logs pixels sampled, tokens/s and ETA over all batches of a run."""

  def __init__(self, total_pixels: int, num_prompt: int):
    self.total, self.num_prompt = total_pixels, num_prompt
    self.t0 = time.perf_counter()
    self.last = -1

  def batch(self, base: int, num_images: int):
    """The sampler's callback for a batch of `num_images` real images after `base` pixels."""
    def report(done, length):
      del length
      pixels = base + (done - self.num_prompt) * num_images
      if pixels == self.last:  # a batch's start repeats the previous batch's end
        return
      self.last = pixels
      elapsed = time.perf_counter() - self.t0
      rate = pixels / elapsed if elapsed > 0 else 0.0
      eta = f"{(self.total - pixels) / rate:.0f}s" if rate else "?"
      logging.info("sampled %d/%d pixels | %.0f tokens/s | ETA %s", pixels, self.total, rate, eta)
    return report


def sample_all(m: trained.TrainedModel, prompts_BxN: np.ndarray, settings: sampling.Settings, seed: int,
               batch_size: int, segment_len: int | None) -> np.ndarray:
  """Tokens [B, L] for every prompt row (N may be 0), `batch_size` rows at a time.

  Batch i draws from `fold_in(key(seed), i)`; the last batch is padded to full size so the
  sampler compiles once. The batch is split over all devices (rounded up to fit them).
  """
  devices = jax.devices()
  total, num_prompt = prompts_BxN.shape
  batch_size = math.ceil(min(batch_size, total) / len(devices)) * len(devices)
  mesh = sampling.batch_mesh(devices) if len(devices) > 1 else None
  new_pixels = m.model_cfg.seq_len - num_prompt
  progress = Progress(total * new_pixels, num_prompt)
  out = []
  for i, start in enumerate(range(0, total, batch_size)):
    chunk = prompts_BxN[start:start + batch_size]
    padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0)))
    tokens = sampling.sample(m.model_cfg, m.params, padded, jax.random.fold_in(jax.random.key(seed), i),
                             settings, segment_len=segment_len, mesh=mesh,
                             progress=progress.batch(start * new_pixels, len(chunk)))
    out.append(np.asarray(tokens)[:len(chunk)])
  return np.concatenate(out)


def upscale_factor(config, side: int) -> int:
  return int(config.upscale_factor) or max(1, TARGET_CELL_PX // side)


def write_outputs(out_dir: str, name: str, picture: np.ndarray, tokens: np.ndarray) -> str:
  """Writes <name>.png and <name>.npy into out_dir; returns the PNG's path.

  Both are written beside their final names first and published as a pair: a failed write
  (a full disk, a kill mid-write) leaves the previous pair as it was, never a new picture
  beside old tokens.
  """
  from PIL import Image  # noqa: PLC0415

  png, npy = (storage.join(out_dir, f"{name}{ext}") for ext in (".png", ".npy"))
  with fileio.atomic_files([png, npy]) as (png_tmp, npy_tmp):
    Image.fromarray(picture).save(png_tmp, optimize=True)
    np.save(npy_tmp, tokens)
  return png


def main(config, source: trained.ModelSource, out_dir: str | None) -> str:
  """Samples the model of `source` as `config` says; returns the PNG's path."""
  check_config(config)
  compile_cache.enable(config.compile_cache_dir)
  with compile_cache.watch() as compiled:
    png = _sample(config, source, out_dir)
  logging.info("%s", compile_cache.summary(compiled))
  return png


def _sample(config, source: trained.ModelSource, out_dir: str | None) -> str:
  settings = settings_from(config)
  m = load_model(source)
  settings.check(m.model_cfg.vocab_size)
  segment_len = int(config.segment_positions) or None
  side, seq_len = m.image_side, m.model_cfg.seq_len
  upscale = upscale_factor(config, side)
  if config.mode == "completion":
    rows = prompt_rows(config, side)
    originals, origin = load_prompt_tokens(config, m)
    per_image = int(config.completions_per_image)
    prompts = np.repeat(originals[:, :rows * side], per_image, axis=0)
    logging.info("completing %d images x %d from their top %d of %d rows", len(originals),
                 per_image, rows, side)
    tokens = sample_all(m, prompts, settings, int(config.seed), int(config.batch_size),
                        segment_len).reshape(len(originals), per_image, seq_len)
    decoded = palette.decode(tokens, m.palette, side)
    quantised = palette.decode(originals, m.palette, side)
    picture = grid(completion_rows(quantised, decoded, rows), upscale)
  else:
    num, origin = int(config.num_samples), ""
    logging.info("drawing %d unconditional samples", num)
    tokens = sample_all(m, np.zeros((num, 0), np.int32), settings, int(config.seed),
                        int(config.batch_size), segment_len)
    decoded = palette.decode(tokens, m.palette, side)
    columns = int(config.grid_columns) or num
    picture = grid([list(decoded[i:i + columns]) for i in range(0, num, columns)], upscale)
  name = output_name(config, m.step, origin)
  out_dir = out_dir or (run.path(m.workdir, run.SAMPLES_DIR) if m.workdir else run.SAMPLES_DIR)
  png = write_outputs(out_dir, name, picture, tokens.astype(np.int16))
  logging.info("wrote %s and %s.npy", png, png[:-len(".png")])
  return png
