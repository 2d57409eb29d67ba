"""One loaded model as the demo serves it: its held-out images, requests checked, sampling.

A request completes one image (its top `rows` rows kept) `count` times, or draws `count`
images from nothing. Every request runs on the same `FixedSampler` (`max_batch` rows,
settings traced), so nothing compiles after the warm-up. Row i of a request draws the same
tokens whatever `count` is: the noise of a row depends on the seed and its place only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator

import numpy as np
from absl import logging

from igpt import config as config_lib
from igpt import palette, pipeline, readers, sampling, trained
from igpt.demo import images as images_lib
from igpt.demo.sampler import FixedSampler
from igpt.errors import UserError
from igpt.pictures import PROMPT_GREY, TARGET_CELL_PX, completion_rows, grid

SPLIT = "test"  # held-out images to complete: never trained on
PUSHES_PER_IMAGE = 16  # about this many partial pictures per sampled image
MAX_SEED = 2 ** 31 - 1


@dataclasses.dataclass(frozen=True)
class Request:
  """What to sample: checked by `Session.request`."""

  tokens: np.ndarray | None  # int32 [L] of the image to complete; None: unconditional
  rows: int  # rows kept from the top of that image
  count: int  # completions (or unconditional images)
  settings: sampling.Settings
  seed: int

  @property
  def num_prompt(self) -> int:
    return 0 if self.tokens is None else self.rows * math.isqrt(len(self.tokens))


def _number(body: dict, name: str, kind, default):
  value = body.get(name, default)
  if kind is int and isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
    raise UserError(f"{name} must be a{'n integer' if kind is int else ' number'}; got "
                    f"{value!r}.")
  return kind(value)


class Session:
  """The model, its sampler and held-out images, for the server's whole life."""

  def __init__(self, loaded: trained.TrainedModel, max_batch: int = 8):
    if max_batch < 1:
      raise UserError(f"--max_batch={max_batch} must be >= 1.")
    if loaded.palette is None:
      raise UserError("the demo shows pixels: the model needs a palette (--palette).")
    self.model, self.max_batch = loaded, int(max_batch)
    self.side, self.length = loaded.image_side, loaded.model_cfg.seq_len
    rows_per_push = max(1, math.ceil(self.side / PUSHES_PER_IMAGE))
    self.sampler = FixedSampler(loaded.model_cfg, loaded.params, self.max_batch, rows_per_push * self.side)
    self.examples = self._held_out(loaded)

  @staticmethod
  def _held_out(loaded: trained.TrainedModel):
    """The run's test split, as sample.py reads prompts (None when there is none)."""
    if loaded.data is None:
      return None
    try:
      return readers.make_source(loaded.data, SPLIT, loaded.image_side)
    except (UserError, OSError) as e:  # the data is not on this machine: uploads still work
      logging.warning("no held-out images (%s split of the run's data): %s", SPLIT, e)
      return None

  def warm_up(self) -> float:
    """Compiles the sampler (one chunk of an unconditional batch); returns the seconds."""
    t0 = time.perf_counter()
    request = Request(None, 0, 1, sampling.Settings(), 0)
    for i, _ in enumerate(self.stream(request)):
      if i == 1:
        break
    return time.perf_counter() - t0

  def info(self) -> dict:
    """What the page needs to know of the model."""
    return {"model": self.model.description, "side": self.side, "positions": self.length,
            "colours": len(self.model.palette), "max_batch": self.max_batch,
            "examples": len(self.examples) if self.examples is not None else 0, "split": SPLIT}

  # -- images -----------------------------------------------------------------------------

  def decode(self, tokens_NxL: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] in the palette's colours."""
    return palette.decode(tokens_NxL, self.model.palette, self.side)

  def example_tokens(self, start: int, count: int) -> np.ndarray:
    """int32 [n, L] of held-out images [start, start + count) (fewer at the end)."""
    if self.examples is None:
      raise UserError("this model has no held-out images to pick from: upload one.")
    stop = min(start + count, len(self.examples))
    if not 0 <= start < stop:
      raise UserError(f"held-out images are numbered 0 to {len(self.examples) - 1}; asked "
                      f"for {start}.")
    return pipeline.token_batch(self.examples, self.model.palette, np.arange(start, stop))["tokens"]

  def upload_tokens(self, data: bytes, max_bytes: int = images_lib.MAX_UPLOAD_BYTES,
                    max_pixels: int = images_lib.MAX_UPLOAD_PIXELS) -> np.ndarray:
    """int32 [L] of an uploaded image file, resized to the model's side."""
    image = images_lib.read_upload(data, self.side, max_bytes, max_pixels)
    return palette.encode(image, self.model.palette)

  # -- requests -----------------------------------------------------------------------------

  def request(self, body: dict) -> Request:
    """A Request from the page's JSON; a UserError naming the first bad field."""
    if not isinstance(body, dict):
      raise UserError("a sampling request is a JSON object.")
    mode = body.get("mode", "completion")
    if mode not in config_lib.SAMPLE_MODES:
      raise UserError(f"mode={mode!r} must be one of {list(config_lib.SAMPLE_MODES)}.")
    count = _number(body, "count", int, 4)
    if not 1 <= count <= self.max_batch:
      raise UserError(f"count={count} must be between 1 and {self.max_batch} (--max_batch).")
    seed = _number(body, "seed", int, 0)
    if not 0 <= seed <= MAX_SEED:
      raise UserError(f"seed={seed} must be between 0 and {MAX_SEED}.")
    greedy = body.get("greedy", False)
    if not isinstance(greedy, bool):
      raise UserError(f"greedy must be true or false; got {greedy!r}.")
    settings = sampling.Settings(temperature=_number(body, "temperature", float, 1.0),
                                 top_k=_number(body, "top_k", int, 0),
                                 top_p=_number(body, "top_p", float, 1.0),
                                 greedy=greedy).check(self.model.model_cfg.vocab_size)
    if mode == "unconditional":
      return Request(None, 0, count, settings, seed)
    rows = _number(body, "rows", int, self.side // 2)
    if not 0 <= rows < self.side:
      raise UserError(f"rows={rows} must be between 0 and {self.side - 1}: the image has "
                      f"{self.side} rows and at least one is sampled.")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != self.length or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens):
      raise UserError(f"tokens must be the image's {self.length} tokens (a list of integers); "
                      "pick or upload an image first.")
    tokens = np.asarray(tokens, np.int64)
    sampling.check_prompt(tokens[None], self.model.model_cfg.vocab_size)
    return Request(tokens.astype(np.int32), rows, count, settings, seed)

  def stream(self, request: Request,
             stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (positions done, uint8 [count, S, S, 3]) as the sampler goes: the positions
    not sampled yet grey. The last has every position."""
    prompt_L = request.tokens if request.tokens is not None else np.zeros(self.length, np.int32)
    num_prompt = request.num_prompt
    tokens_BxL = np.tile(prompt_L[None], (self.max_batch, 1))
    tokens_BxL[:, num_prompt:] = 0
    for done, sampled_BxL in self.sampler.stream(tokens_BxL, num_prompt, request.seed,
                                                 request.settings, stop):
      pictures = self.decode(sampled_BxL[:request.count]).reshape(request.count, self.length, 3)
      pictures[:, done:] = PROMPT_GREY
      yield done, pictures.reshape(request.count, self.side, self.side, 3)

  def picture(self, request: Request, samples_NxSxSx3: np.ndarray) -> np.ndarray:
    """The grid sample.py writes: original, prompt and completions in a row; or the samples."""
    upscale = max(1, TARGET_CELL_PX // self.side)
    if request.tokens is None:
      return grid([list(samples_NxSxSx3)], upscale)
    original = self.decode(request.tokens[None])
    return grid(completion_rows(original, [list(samples_NxSxSx3)], request.rows), upscale)
