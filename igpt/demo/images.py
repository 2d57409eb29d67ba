"""Pictures in and out of the demo: uploads read into model-sized images, pixels for the page.

An upload (any format Pillow reads) is refused early when it is empty, over the byte limit,
or over the pixel limit (read from its header, before it is decoded); otherwise it is made
RGB, centre-cropped to a square and resized to the model's side like every image source
(`igpt.readers.prepare_images`).
"""

from __future__ import annotations

import base64
import io

import numpy as np

from igpt import readers
from igpt.errors import UserError

MAX_UPLOAD_BYTES = 20 << 20  # a large phone photo
MAX_UPLOAD_PIXELS = 50_000_000  # 50 megapixels: 150 MB once decoded


def _megabytes(n: int) -> str:
  return f"{n / (1 << 20):.1f} MB"


def check_size(num_bytes: int, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
  """A UserError for an empty upload or one over `max_bytes` (checked before it is read)."""
  if not num_bytes:
    raise UserError("the upload is empty: choose an image file (PNG, JPEG, ...).")
  if num_bytes > max_bytes:
    raise UserError(f"the file is {_megabytes(num_bytes)}; the limit is "
                    f"{_megabytes(max_bytes)}.")


def read_upload(data: bytes, side: int, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_UPLOAD_PIXELS) -> np.ndarray:
  """uint8 [side, side, 3] of an uploaded image file's bytes; a UserError saying what is
  wrong with it otherwise."""
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415  (the demo's one optional need)

  check_size(len(data), max_bytes)
  try:
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size
      if width * height > max_pixels:
        raise UserError(f"the image is {width}x{height} pixels ({width * height / 1e6:.0f} "
                        f"megapixels); the limit is {max_pixels / 1e6:.0f} megapixels.")
      rgb = readers.decoded_image(im)  # as image files are read
  except UnidentifiedImageError:
    raise UserError("the file is not an image Pillow can read (try PNG or JPEG).") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UserError(f"the image could not be decoded (truncated or damaged?): {e}") from None
  if not rgb.size:
    raise UserError("the image has no pixels.")
  return readers.prepare_images([rgb], side, origin="the upload")[0]


def pixels_b64(images_NxSxSx3: np.ndarray) -> list[str]:
  """Each image's raw RGB bytes (row-major) in base64: what the page paints, pixel exact."""
  return [base64.b64encode(np.ascontiguousarray(im, np.uint8).tobytes()).decode("ascii")
          for im in images_NxSxSx3]


def png_bytes(picture_HxWx3: np.ndarray) -> bytes:
  from PIL import Image  # noqa: PLC0415

  out = io.BytesIO()
  Image.fromarray(picture_HxWx3).save(out, format="PNG", optimize=True)
  return out.getvalue()
