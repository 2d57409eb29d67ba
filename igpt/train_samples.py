"""What a model draws during training: a fixed-seed picture made every train.sample_every_steps.

Each picture holds `train.sample_num_images` unconditional samples in its first row, then, for
as many held-out images (the first of the validation split), the original, the top half kept
as a prompt (the rest grey) and two completions. The seed and the prompts never change, so the
pictures of one run differ only by what the model has learnt.
"""

from __future__ import annotations

import jax
import numpy as np

from igpt import model, palette, pipeline, sampling
from igpt.model import ModelConfig
from igpt.pictures import TARGET_CELL_PX, completion_rows, grid

COMPLETIONS_PER_IMAGE = 2


class TrainingSamples:
  """`picture(params)` -> uint8 [H, W, 3]: the run's fixed sample grid for these params."""

  def __init__(self, model_cfg: ModelConfig, centers: np.ndarray, val_source, num_images: int,
               seed: int):
    self.cfg, self.centers, self.num_images = model_cfg, centers, num_images
    self.side = model_cfg.image_side
    prompt_len = (self.side // 2) * self.side
    count = min(num_images, len(val_source))
    self.originals_BxL = pipeline.token_batch(val_source, centers, np.arange(count))["tokens"]
    self.prompts_BxN = np.repeat(self.originals_BxL[:, :prompt_len], COMPLETIONS_PER_IMAGE,
                                 axis=0)
    self.rng = jax.random.key(seed)

  def _images(self, tokens_BxL) -> np.ndarray:
    return palette.decode(np.asarray(tokens_BxL), self.centers, self.side)

  def picture(self, params) -> np.ndarray:
    """Unconditional samples, then one row per held-out image: original, prompt, completions."""
    # Only tokens the palette can show are drawn (all of them, unless it has fewer colours).
    cfg, params = model.restrict_vocab(self.cfg, params, min(len(self.centers),
                                                             self.cfg.vocab_size))
    free = sampling.sample(cfg, params, None, jax.random.fold_in(self.rng, 0),
                           batch_size=self.num_images)
    completed = sampling.sample(cfg, params, self.prompts_BxN, jax.random.fold_in(self.rng, 1))
    originals = self._images(self.originals_BxL)
    completions = self._images(completed).reshape(len(originals), COMPLETIONS_PER_IMAGE,
                                                  self.side, self.side, 3)
    rows = [list(self._images(free))] + completion_rows(originals, completions, self.side // 2)
    return grid(rows, max(1, TARGET_CELL_PX // self.side // 2))
