"""Tests for igpt.palette: fitting, files, encode/decode against brute force."""

import numpy as np
import pytest

from igpt import palette


def _unit(rgb):
  return np.asarray(rgb, np.float64) / 127.5 - 1


def _brute_distances(images, centers):
  """Squared distances [pixels, k] in float64, straight from the definition."""
  x = _unit(images.reshape(-1, 3))
  return ((x[:, None, :] - centers.astype(np.float64)[None]) ** 2).sum(-1)


# ---------------------------------------------------------------------------------------------
# fit_palette


def test_fit_caps_k_at_distinct_colours():
  colours = np.array([[0, 0, 0], [255, 255, 255], [10, 20, 30], [200, 0, 100]], np.uint8)
  pixels = colours[np.random.default_rng(0).integers(0, 4, 1000)]
  centers = palette.fit_palette(pixels, k=512)
  assert centers.shape == (4, 3) and centers.dtype == np.float32
  expected = _unit(colours)
  assert np.allclose(np.sort(centers, axis=0), np.sort(expected, axis=0), atol=1e-6)


def test_fit_deterministic_in_range():
  pixels = np.random.default_rng(1).integers(0, 256, (20000, 3), dtype=np.uint8)
  a = palette.fit_palette(pixels, k=64, seed=0)
  b = palette.fit_palette(pixels, k=64, seed=0)
  c = palette.fit_palette(pixels, k=64, seed=1)
  assert a.shape == (64, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.min() >= -1 and a.max() <= 1
  assert len(np.unique(a, axis=0)) == 64  # no duplicate centres


def test_fit_recovers_clusters():
  rng = np.random.default_rng(2)
  truth = rng.choice(np.arange(16, 240, 28), size=(8, 3))  # well separated colours
  truth = np.unique(truth, axis=0)
  labels = rng.integers(0, len(truth), 30000)
  pixels = np.clip(truth[labels] + rng.normal(0, 3, (30000, 3)), 0, 255).astype(np.uint8)
  centers = palette.fit_palette(pixels, k=len(truth), seed=0)
  rgb = 127.5 * (centers + 1)
  # Every true colour has a fitted centre within 2 levels, and vice versa.
  d = np.linalg.norm(truth[:, None] - rgb[None], axis=-1)
  assert d.min(axis=1).max() < 2 and d.min(axis=0).max() < 2


def test_fit_weights_duplicate_pixels():
  pixels = np.array([[0, 0, 0]] * 3 + [[255, 255, 255]], np.uint8)
  centers = palette.fit_palette(pixels, k=1)
  np.testing.assert_allclose(centers, [[-0.5, -0.5, -0.5]], atol=1e-6)  # mean of 3 x -1, 1 x 1


def test_fit_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    palette.fit_palette(np.zeros((10, 3), np.float32))
  with pytest.raises(ValueError, match="palette size"):
    palette.fit_palette(np.zeros((10, 3), np.uint8), k=0)


# ---------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trip(tmp_path):
  centers = np.random.default_rng(3).uniform(-1, 1, (512, 3)).astype(np.float32)
  path = tmp_path / "sub" / "kmeans_centers.npy"
  palette.save_palette(path, centers)
  np.testing.assert_array_equal(palette.load_palette(path), centers)
  assert [p.name for p in path.parent.iterdir()] == ["kmeans_centers.npy"]  # no temp left over
  np.save(tmp_path / "f64.npy", centers.astype(np.float64))  # OpenAI-style float64 also loads
  assert palette.load_palette(tmp_path / "f64.npy").dtype == np.float32


@pytest.mark.parametrize("array, message", [
    (np.zeros((512, 4), np.float32), "shape"),
    (np.zeros((512,), np.float32), "shape"),
    (np.zeros((512, 3), np.int32), "dtype"),
    (np.full((512, 3), 200.0, np.float32), r"\[-1, 1\]"),
    (np.full((4, 3), np.nan, np.float32), "NaN"),
])
def test_load_rejects_bad_arrays(tmp_path, array, message):
  path = tmp_path / "bad.npy"
  np.save(path, array)
  with pytest.raises(ValueError, match=message) as e:
    palette.load_palette(path)
  assert str(path) in str(e.value)


def test_load_rejects_missing_and_garbage_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="fit_palette") as e:
    palette.load_palette(tmp_path / "nope.npy")
  assert "nope.npy" in str(e.value)
  garbage = tmp_path / "garbage.npy"
  garbage.write_bytes(b"not a numpy file")
  with pytest.raises(ValueError, match="garbage.npy"):
    palette.load_palette(garbage)
  good = tmp_path / "good.npy"
  palette.save_palette(good, np.zeros((512, 3), np.float32))
  truncated = tmp_path / "truncated.npy"
  truncated.write_bytes(good.read_bytes()[:-100])
  with pytest.raises(ValueError, match="truncated.npy"):
    palette.load_palette(truncated)


# ---------------------------------------------------------------------------------------------
# encode / decode


@pytest.mark.parametrize("k", [1, 7, 100, 512])
def test_encode_matches_brute_force(k):
  rng = np.random.default_rng(k)
  centers = rng.uniform(-1, 1, (k, 3)).astype(np.float32)
  images = rng.integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
  tokens = palette.encode(images, centers)
  assert tokens.shape == (3, 2, 64) and tokens.dtype == np.int32
  d = _brute_distances(images, centers)
  chosen = d[np.arange(len(d)), tokens.reshape(-1)]
  # Float32 round-off may break a near-tie differently: compare distances, not indices.
  np.testing.assert_allclose(chosen, d.min(axis=1), atol=1e-5)
  assert np.mean(tokens.reshape(-1) == d.argmin(axis=1)) > 0.99


def test_encode_keeps_palettes_apart():
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  for _ in range(2):  # cached lookup tables must not leak between palettes
    for k in (16, 17, 18):
      centers = rng.uniform(-1, 1, (k, 3)).astype(np.float32)
      tokens = palette.encode(images, centers)
      d = _brute_distances(images, centers)
      np.testing.assert_allclose(d[np.arange(len(d)), tokens.reshape(-1)], d.min(1), atol=1e-5)


def test_encode_single_image_and_bad_input():
  centers = np.array([[-1, -1, -1], [1, 1, 1]], np.float32)
  image = np.zeros((4, 4, 3), np.uint8)
  image[0, 1] = 255
  tokens = palette.encode(image, centers)
  assert tokens.shape == (16,)
  assert tokens[1] == 1 and tokens.sum() == 1  # raster order
  assert palette.encode(np.zeros((0, 4, 4, 3), np.uint8), centers).shape == (0, 16)
  with pytest.raises(ValueError, match="uint8"):
    palette.encode(image.astype(np.float32), centers)
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    palette.encode(image, centers * 255)


def test_decode_formula_and_shape():
  centers = np.array([[-1, -1, -1], [1, 1, 1], [0, 0.5, -0.5]], np.float32)
  tokens = np.array([[0, 1, 2, 2], [1, 1, 0, 0]])
  images = palette.decode(tokens, centers)
  assert images.shape == (2, 2, 2, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[0, 0, 1], [255, 255, 255])
  np.testing.assert_array_equal(images[0, 1, 0], np.rint(127.5 * (centers[2] + 1)))
  with pytest.raises(ValueError, match="tokens must lie"):
    palette.decode(np.array([[3, 0, 0, 0]]), centers)
  with pytest.raises(ValueError, match="side"):
    palette.decode(np.zeros((1, 5), np.int32), centers)


def test_round_trips():
  rng = np.random.default_rng(6)
  centers = rng.uniform(-1, 1, (64, 3)).astype(np.float32)
  images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  quantised = palette.decode(palette.encode(images, centers), centers)
  # The quantised image is the nearest palette colour of each pixel.
  d = _brute_distances(images, centers)
  rgb = palette.centers_to_rgb(centers)
  nearest_d = d.min(1)
  got_d = d[np.arange(len(d)), palette.encode(images, centers).reshape(-1)]
  np.testing.assert_allclose(got_d, nearest_d, atol=1e-5)
  assert np.mean(np.all(quantised.reshape(-1, 3) == rgb[d.argmin(1)], -1)) > 0.99
  np.testing.assert_array_equal(palette.quantize(images, centers), quantised)
  # A palette of exactly representable distinct colours: tokens survive decode -> encode.
  colours = np.unique(rng.integers(0, 256, (300, 3)), axis=0).astype(np.uint8)
  exact = (colours / 127.5 - 1).astype(np.float32)
  tokens = rng.integers(0, len(exact), (7, 36)).astype(np.int32)
  np.testing.assert_array_equal(palette.encode(palette.decode(tokens, exact), exact), tokens)


def test_fit_then_encode_whole_batch_fast_enough():
  """A smoke check on the real path: fit 64 colours on 200k pixels, encode 512 images."""
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (512, 16, 16, 3), dtype=np.uint8)
  centers = palette.fit_palette(images.reshape(-1, 3)[:200_000], k=64, num_iters=10)
  tokens = palette.encode(images, centers)
  assert tokens.shape == (512, 256) and tokens.max() < 64
