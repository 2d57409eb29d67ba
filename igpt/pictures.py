"""Pictures a person looks at: images laid out in a grid, upscaled so small images show."""

from __future__ import annotations

import numpy as np

GAP_PX = 2  # between grid cells, in output pixels
TARGET_CELL_PX = 128  # a default upscale: about this many output pixels per image side
PROMPT_GREY = 128  # the unknown part of a completion's prompt


def grid(rows_of_images, upscale: int) -> np.ndarray:
  """uint8 image of equal-size uint8 images laid out row by row (rows may be ragged)."""
  side = rows_of_images[0][0].shape[0]
  cell = side * upscale
  columns = max(len(r) for r in rows_of_images)
  height = len(rows_of_images) * (cell + GAP_PX) + GAP_PX
  width = columns * (cell + GAP_PX) + GAP_PX
  out = np.full((height, width, 3), 255, np.uint8)
  for i, row in enumerate(rows_of_images):
    for j, image in enumerate(row):
      big = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
      top, left = GAP_PX + i * (cell + GAP_PX), GAP_PX + j * (cell + GAP_PX)
      out[top:top + cell, left:left + cell] = big
  return out


def completion_rows(originals, completions, prompt_rows: int) -> list:
  """Grid rows for image completion: per image its original, its prompt (the rows from
  `prompt_rows` down grey), then its completions (`completions[i]`: a sequence of images)."""
  rows = []
  for original, done in zip(originals, completions):
    prompt = original.copy()
    prompt[prompt_rows:] = PROMPT_GREY
    rows.append([original, prompt, *done])
  return rows
