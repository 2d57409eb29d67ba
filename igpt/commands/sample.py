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
import os

import numpy as np
from absl import logging

from igpt import cli, compile_cache, fileio, palette, pipeline, readers, run, sampling, storage
from igpt import config as config_lib
from igpt import trained
from igpt.errors import MissingFileError, UserError
from igpt.pictures import TARGET_CELL_PX, completion_rows, grid

_FLAGS = {}


def define_flags() -> None:
  """--config (sampling settings), the model flags and --out."""
  _FLAGS.update(cli.define_model_command_flags(
      config_lib.SAMPLE_CONFIG_FILE, "Sampling settings (configs/sample.py).", "sample from",
      "<workdir>/samples"))


def main(argv) -> None:
  """Samples as the flags say; a mistake is one `error:` line (see igpt.cli)."""
  del argv
  cli.run_main(lambda: sample_images(_FLAGS["config"].value, _FLAGS["model"].source(),
                                     _FLAGS["out"].value))


def settings_from(config) -> sampling.Settings:
  """The sampling controls of a sample config, checked."""
  return sampling.Settings(temperature=float(config.temperature), top_k=int(config.top_k),
                           top_p=float(config.top_p), greedy=bool(config.greedy)).check()


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


def load_prompt_tokens(config, loaded: trained.TrainedModel) -> tuple[np.ndarray, str]:
  """(int32 [num_samples, side*side] tokens of the images to complete, where they came from
  for the output name): image files ('images-<hash>') or a split of the run's data (its
  name), encoded with the model's palette; a pre-tokenised split is read as it is."""
  first, count = int(config.first_image_index), int(config.num_samples)
  if config.images:
    files = image_paths(config)
    source = readers.FileSource(files, None, loaded.image_side, "image files", None)
    origin = images_origin(files[first:first + count])
  elif loaded.data is None:
    raise UserError("--hf has no training data to take prompts from: set --config.images "
                    "(files or folders) or --config.mode=unconditional.")
  else:
    source = readers.make_source(loaded.data, config.split, loaded.image_side)
    origin = str(config.split)
  if first + count > len(source):
    raise UserError(f"first_image_index={first} + num_samples={count} exceeds the "
                    f"{len(source)} images of {source.description}.")
  indices = np.arange(first, first + count)
  return pipeline.token_batch(source, loaded.palette, indices)["tokens"], origin


def output_name(config, step: int, origin: str = "") -> str:
  """config.name, or `<mode>[_<origin>]_step<step>_seed<seed>`: completions say where their
  prompts came from (`origin`), so a split's and image files' do not overwrite each other."""
  if config.name:
    return str(config.name)
  mode = f"{config.mode}_{origin}" if origin else str(config.mode)
  return f"{mode}_step{step}_seed{config.seed}"


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


def sample_images(config, source: trained.ModelSource, out_dir: str | None) -> str:
  """Samples the model of `source` as `config` (configs/sample.py) says; returns the PNG's
  path."""
  config_lib.check_sample_settings(config)
  settings = settings_from(config)
  compile_cache.enable(config.compile_cache_dir)
  with compile_cache.watch() as compiled:
    loaded = trained.load_for_sampling(source)
    logging.info("sampling %s", loaded.description)
    settings.check(loaded.model_cfg.vocab_size)
    side, seq_len = loaded.image_side, loaded.model_cfg.seq_len
    if config.mode == "completion":
      rows = prompt_rows(config, side)
      originals, origin = load_prompt_tokens(config, loaded)
      per_image = int(config.completions_per_image)
      prompts = np.repeat(originals[:, :rows * side], per_image, axis=0)
      logging.info("completing %d images x %d from their top %d of %d rows", len(originals),
                   per_image, rows, side)
    else:
      origin, prompts = "", np.zeros((int(config.num_samples), 0), np.int32)
      logging.info("drawing %d unconditional samples", len(prompts))
    tokens = sampling.sample_many(loaded.model_cfg, loaded.params, prompts, settings,
                                  int(config.seed), int(config.batch_size),
                                  int(config.segment_positions) or None)
    decoded = palette.decode(tokens, loaded.palette, side)
    if config.mode == "completion":
      tokens = tokens.reshape(len(originals), per_image, seq_len)
      quantised = palette.decode(originals, loaded.palette, side)
      completions = decoded.reshape(tokens.shape[:2] + decoded.shape[1:])
      rows_of_images = completion_rows(quantised, completions, rows)
    else:
      columns = int(config.grid_columns) or len(decoded)
      rows_of_images = [list(decoded[i:i + columns]) for i in range(0, len(decoded), columns)]
    picture = grid(rows_of_images, upscale_factor(config, side))
  logging.info("%s", compile_cache.summary(compiled))
  out_dir = out_dir or (run.path(loaded.workdir, run.SAMPLES_DIR) if loaded.workdir
                        else run.SAMPLES_DIR)
  png = write_outputs(out_dir, output_name(config, loaded.step, origin), picture,
                      tokens.astype(np.int16))
  logging.info("wrote %s and %s.npy", png, png[:-len(".png")])
  return png
