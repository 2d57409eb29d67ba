"""Tests for igpt.readers and igpt.pipeline: every source, preprocessing, batching, clear errors.

All fixture data is written to tmp dirs at test time; TFDS runs on tfds.testing.mock_data.
"""

import gzip
import importlib.util
import os
import pickle
import struct
import tempfile
import zlib

import numpy as np
import pytest
from PIL import Image

from igpt import config as config_lib
from igpt import pipeline, readers
from igpt import palette
from igpt.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
GREY_PALETTE = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, 1)


@pytest.fixture(autouse=True)
def _tempdir_in_tmp_path(tmp_path, monkeypatch):
  """tfds (mock_data, dataset_info) leaves mkdtemp folders behind: keep them in tmp_path."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _cfg(**overrides):
  cfg = config_lib.base_config(num_layers=1, d_model=8, num_heads=1).data
  cfg.update(overrides)
  return cfg


def _random_images(n, h, w=None, c=3, seed=0):
  shape = (n, h, w or h) + ((c,) if c else ())
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Fixture writers


def _write_cifar(folder, name, images, labels, label_key=b"labels"):
  folder.mkdir(parents=True, exist_ok=True)
  record = {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
            label_key: [int(x) for x in labels], b"batch_label": b"fixture"}
  if label_key == b"fine_labels":
    record[b"coarse_labels"] = [int(x) // 5 for x in labels]
  with open(folder / name, "wb") as f:
    pickle.dump(record, f, protocol=2)


def _idx_bytes(array):
  magic = 0x800 + array.ndim
  return struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + \
      array.astype(np.uint8).tobytes()


def _write_idx(folder, prefix, images, labels, gz):
  folder.mkdir(parents=True, exist_ok=True)
  ext = ".gz" if gz else ""
  opener = gzip.open if gz else open
  paths = []
  for what, array, nd in (("images", images, 3), ("labels", labels, 1)):
    path = folder / f"{prefix}-{what}-idx{nd}-ubyte{ext}"
    with opener(path, "wb") as f:
      f.write(_idx_bytes(array))
    paths.append(path)
  return paths


def _write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_prepare_images_mixed_sizes_and_channels():
  rng = np.random.default_rng(0)
  items = [rng.integers(0, 256, (40, 64, 3), np.uint8),  # wide: centre crop 40x40
           rng.integers(0, 256, (16, 16), np.uint8),  # grey, enlarged
           rng.integers(0, 256, (32, 32, 4), np.uint8),  # RGBA: alpha dropped
           rng.integers(0, 256, (8, 8, 1), np.uint8)]
  out = readers.prepare_images(items, 8)
  assert out.shape == (4, 8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[2], np.rint(items[2][..., :3].reshape(
      8, 4, 8, 4, 3).astype(np.float32).mean((1, 3))))  # exact 4x4 area average
  np.testing.assert_array_equal(out[3], np.repeat(items[3], 3, -1))
  array = rng.integers(0, 256, (5, 40, 64), np.uint8)  # a grey, non-square batch
  np.testing.assert_array_equal(readers.prepare_images(array, 40), np.repeat(
      array[:, :, 12:52, None], 3, -1))
  with pytest.raises(ValueError, match="my images.*uint8"):
    readers.prepare_images(np.zeros((2, 8, 8, 3), np.float32), 8, origin="my images")
  with pytest.raises(ValueError, match="shape"):
    readers.prepare_images(np.zeros((2, 8, 8, 5), np.uint8), 8)


# ---------------------------------------------------------------------------------------------
# TFDS (mock data: no network, no TensorFlow)


def test_tfds_cifar10_mock(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(source="tfds", name="cifar10", data_dir=str(tmp_path), val_examples=5)
  with tfds.testing.mock_data(num_examples=21):
    train = readers.make_source(cfg, "train", 32)
    val = readers.make_source(cfg, "val", 32)
    test = readers.make_source(cfg, "test", 16)
    assert (len(train), len(val), len(test)) == (16, 5, 21)
    assert train.num_classes == 10
    images, labels = train.get([0, 3, 15])
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
    assert test.get([1])[0].shape == (1, 16, 16, 3)  # area resize 32 -> 16
    batch = pipeline.batch_at(train, GREY_PALETTE, step=3, batch_size=8, seed=0)
    assert batch["tokens"].shape == (8, 1024) and batch["label"].shape == (8,)


@pytest.mark.parametrize("name, native", [("fashion_mnist", 28), ("stl10", 96),
                                          ("imagenet_resized/32x32", 32)])
def test_tfds_other_datasets_mock(tmp_path, name, native):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(source="tfds", name=name, data_dir=str(tmp_path), val_split="", val_examples=2)
  with tfds.testing.mock_data(num_examples=6):
    source = readers.make_source(cfg, "train", 32)
    images, _ = source.get([0, 1])
    assert images.shape == (2, 32, 32, 3)
    if native == 28:  # grey -> RGB: three equal channels
      assert np.array_equal(images[..., 0], images[..., 2])


def test_tfds_unknown_name(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(source="tfds", name="cifar_10", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown TFDS dataset.*cifar_10.*cifar10"):
    readers.make_source(cfg, "train", 32)


def test_tfds_download_failure_is_explained(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def fail(*args, **kwargs):
    raise OSError("Temporary failure in name resolution")

  monkeypatch.setattr(tfds, "data_source", fail)
  cfg = _cfg(source="tfds", name="cifar10", data_dir=str(tmp_path))
  with pytest.raises(UserError) as e:
    readers.make_source(cfg, "test", 32)
  message = str(e.value)
  assert "cifar10" in message and str(tmp_path) in message
  assert "name resolution" in message and "pip install tensorflow" in message

  def missing_module(*args, **kwargs):
    raise ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")

  monkeypatch.setattr(tfds, "data_source", missing_module)
  with pytest.raises(UserError, match="pip install importlib_resources"):
    readers.make_source(cfg, "test", 32)

  def needs_tensorflow(*args, **kwargs):
    raise ModuleNotFoundError("In <Image> with name \"image\": No module named 'tensorflow'")

  monkeypatch.setattr(tfds, "data_source", needs_tensorflow)
  with pytest.raises(UserError, match="encodes images with TensorFlow"):
    readers.make_source(cfg, "test", 32)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="preparing a TFDS image dataset needs TensorFlow")
def test_tfds_real_array_record_files(tmp_path):
  """A locally built dataset, prepared as array_record and read back without mocks."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class IgptTinyImages(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(37), "test": self._generate_examples(11)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):  # images of different heights: centre-cropped, then resized
        yield i, {"image": rng.integers(0, 256, (20 + 4 * (i % 3), 20, 3), np.uint8),
                  "label": i % 3}

  cfg = _cfg(source="tfds", name="igpt_tiny_images", data_dir=str(tmp_path), val_examples=7)
  train, val, test = (readers.make_source(cfg, s, 16) for s in readers.SPLITS)
  assert (len(train), len(val), len(test), train.num_classes) == (30, 7, 11, 3)
  images, labels = train.get(np.arange(30))
  assert images.shape == (30, 16, 16, 3) and set(labels) == {0, 1, 2}
  cfg.test_split = "validation"
  with pytest.raises(ValueError, match="no split 'validation'"):
    readers.make_source(cfg, "test", 16)


# ---------------------------------------------------------------------------------------------
# CIFAR python pickles


def test_cifar10_pickles(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  parts = [(_random_images(n, 32, seed=n), np.arange(n) % 10) for n in (7, 5, 3)]
  for i, (images, labels) in enumerate(parts):
    _write_cifar(folder, f"data_batch_{i + 1}", images, labels)
  test_images = _random_images(9, 32, seed=99)
  _write_cifar(folder, "test_batch", test_images, np.arange(9) % 10)
  # data.path may name the batches folder or its parent.
  for path in (folder, tmp_path):
    cfg = _cfg(source="cifar", path=str(path), val_split="test")
    train = readers.make_source(cfg, "train", 32)
    assert len(train) == 15 and train.num_classes == 10
    images, labels = train.get(np.arange(15))
    np.testing.assert_array_equal(images, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(labels, np.concatenate([p[1] for p in parts]))
    test_source = readers.make_source(cfg, "test", 32)
    np.testing.assert_array_equal(test_source.get(np.arange(9))[0], test_images)
    assert len(readers.make_source(cfg, "val", 32)) == 9  # val_split = 'test'
  # Loaded splits are cached, but a rewritten file is read again.
  _write_cifar(folder, "test_batch", test_images[:2], [1, 2])
  assert len(readers.make_source(cfg, "test", 32)) == 2


def test_cifar100_pickles(tmp_path):
  folder = tmp_path / "cifar-100-python"
  images = _random_images(11, 32, seed=1)
  _write_cifar(folder, "train", images, np.arange(11) * 9, label_key=b"fine_labels")
  _write_cifar(folder, "test", images[:3], [99, 0, 1], label_key=b"fine_labels")
  (folder / "meta").write_bytes(b"")
  cfg = _cfg(source="cifar", path=str(folder), val_examples=4)
  train, val = readers.make_source(cfg, "train", 32), readers.make_source(cfg, "val", 32)
  assert (len(train), len(val), train.num_classes) == (7, 4, 100)
  test_images, test_labels = readers.make_source(cfg, "test", 8).get([0, 1, 2])
  assert test_images.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(test_labels, [99, 0, 1])


def test_cifar_bad_files(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  _write_cifar(folder, "data_batch_1", _random_images(4, 32), [0, 1, 2, 3])
  cfg = _cfg(source="cifar", path=str(folder))
  with pytest.raises(FileNotFoundError, match="test_batch"):
    readers.make_source(cfg, "test", 32)
  good = (folder / "data_batch_1").read_bytes()
  (folder / "test_batch").write_bytes(good[: len(good) // 2])
  with pytest.raises(ValueError, match="test_batch.*truncated"):
    readers.make_source(cfg, "test", 32)
  with open(folder / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(ValueError, match=r"test_batch.*\[N, 3072\]"):
    readers.make_source(cfg, "test", 32)
  with open(folder / "test_batch", "wb") as f:
    pickle.dump(os.system, f)  # a pickle that would call a function: refused, not run
  with pytest.raises(ValueError, match="test_batch.*refusing"):
    readers.make_source(cfg, "test", 32)
  with pytest.raises(FileNotFoundError, match="missing_dir.*not a folder"):
    readers.make_source(_cfg(source="cifar", path=str(tmp_path / "missing_dir")), "train", 32)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No CIFAR files in.*empty"):
    readers.make_source(_cfg(source="cifar", path=str(tmp_path / "empty")), "train", 32)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST format)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files(tmp_path, gz):
  images = _random_images(13, 28, c=None, seed=3)
  labels = np.arange(13) % 10
  _write_idx(tmp_path, "train", images, labels, gz)
  _write_idx(tmp_path, "t10k", images[:5], labels[:5], gz)
  cfg = _cfg(source="idx", path=str(tmp_path), val_examples=3)
  train = readers.make_source(cfg, "train", 28)
  assert len(train) == 10 and train.num_classes == 10
  test = readers.make_source(cfg, "test", 28)
  got, got_labels = test.get(np.arange(5))
  assert got.shape == (5, 28, 28, 3)
  np.testing.assert_array_equal(got, np.repeat(images[:5, ..., None], 3, -1))  # grey -> RGB
  np.testing.assert_array_equal(got_labels, labels[:5])
  # 28 -> 14 is an exact 2x2 area average; 28 -> 32 goes through Pillow.
  small = readers.make_source(cfg, "test", 14).get([0])[0][0, ..., 0]
  expected = np.rint(images[0].reshape(14, 2, 14, 2).mean((1, 3)))
  np.testing.assert_array_equal(small, expected)
  assert readers.make_source(cfg, "test", 32).get([0, 1])[0].shape == (2, 32, 32, 3)


def test_idx_bad_files(tmp_path):
  images, labels = _random_images(6, 28, c=None), np.arange(6)
  image_path, label_path = _write_idx(tmp_path, "train", images, labels, gz=False)
  cfg = _cfg(source="idx", path=str(tmp_path), val_split="test")
  raw = image_path.read_bytes()
  image_path.write_bytes(raw[:-10])
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
    readers.make_source(cfg, "train", 28)
  image_path.write_bytes(struct.pack(">I", 0x801) + raw[4:])
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic"):
    readers.make_source(cfg, "train", 28)
  image_path.write_bytes(raw)
  label_path.write_bytes(_idx_bytes(np.arange(5)))
  with pytest.raises(ValueError, match="train-images.*6 images.*train-labels.*5 labels"):
    readers.make_source(cfg, "train", 28)
  with pytest.raises(FileNotFoundError, match="t10k-images"):
    readers.make_source(cfg, "test", 28)
  # A truncated gzip stream.
  gz_dir = tmp_path / "gz"
  gz_images, _ = _write_idx(gz_dir, "train", images, labels, gz=True)
  gz_images.write_bytes(gz_images.read_bytes()[:-20])
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
    readers.make_source(_cfg(source="idx", path=str(gz_dir), val_split="test"), "train", 28)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason="apt-get install dataset-fashion-mnist for the real-data test")
def test_real_fashion_mnist():
  cfg = _cfg(source="idx", path=FASHION_MNIST_DIR)  # val carved: 5000 of the 60000
  train, val = readers.make_source(cfg, "train", 28), readers.make_source(cfg, "val", 28)
  test = readers.make_source(cfg, "test", 32)
  assert (len(train), len(val), len(test)) == (55_000, 5_000, 10_000)
  images, labels = test.get(np.arange(10_000))
  assert images.shape == (10_000, 32, 32, 3)
  assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
  assert 60 < images.mean() < 90  # mostly black background
  batch = pipeline.batch_at(train, GREY_PALETTE, step=0, batch_size=64, seed=0)
  assert batch["tokens"].shape == (64, 784)


# ---------------------------------------------------------------------------------------------
# Digits, folders, npz


def test_digits():
  from sklearn.datasets import load_digits
  cfg = _cfg(source="digits", val_examples=100)
  train, val, test = (readers.make_source(cfg, s, 8) for s in readers.SPLITS)
  assert (len(train), len(val), len(test)) == (1337, 100, 360)
  all_images = np.concatenate([s.get(np.arange(len(s)))[0] for s in (train, val, test)])
  expected = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
  # Together the three splits are exactly the 1797 digits, each once.
  assert sorted(map(bytes, all_images[..., 0])) == sorted(map(bytes, expected))
  assert readers.make_source(cfg, "test", 32).get([0])[0].shape == (1, 32, 32, 3)


def test_folder_of_pngs_with_class_subfolders(tmp_path):
  rng = np.random.default_rng(4)
  for split, classes in (("train", ("cat", "dog", "eel")), ("test", ("cat", "eel"))):
    for c in classes:
      for i in range(3):
        _write_png(tmp_path / split / c / f"{i}.png", rng.integers(0, 256, (12, 12, 3), np.uint8))
  grey = rng.integers(0, 256, (12, 20), np.uint8)  # grey and not square
  _write_png(tmp_path / "test" / "eel" / "grey.png", grey)
  cfg = _cfg(source="folder", path=str(tmp_path), val_examples=2)
  train, test = readers.make_source(cfg, "train", 12), readers.make_source(cfg, "test", 12)
  assert (len(train), len(test), train.num_classes, test.num_classes) == (7, 7, 3, 3)
  images, labels = test.get(np.arange(7))
  np.testing.assert_array_equal(labels, [0, 0, 0, 2, 2, 2, 2])  # 'eel' is class 2 in both
  np.testing.assert_array_equal(images[6], np.repeat(grey[:, 4:16, None], 3, -1))  # centre crop
  assert readers.make_source(cfg, "test", 6).get([0])[0].shape == (1, 6, 6, 3)


def test_flat_folder_is_unlabelled(tmp_path):
  for i in range(5):
    _write_png(tmp_path / f"{i}.png", _random_images(1, 16, seed=i)[0])
  cfg = _cfg(source="folder", path=str(tmp_path), val_examples=1)
  train = readers.make_source(cfg, "train", 16)
  assert len(train) == 4 and train.num_classes is None
  batch = pipeline.batch_at(train, GREY_PALETTE, step=0, batch_size=4, seed=0)
  np.testing.assert_array_equal(batch["label"], [-1] * 4)
  with pytest.raises(FileNotFoundError, match="'test' split"):
    readers.make_source(cfg, "test", 16)


def test_folder_bad_image(tmp_path):
  _write_png(tmp_path / "train" / "a.png", _random_images(1, 8)[0])
  (tmp_path / "train" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  source = readers.make_source(_cfg(source="folder", path=str(tmp_path), val_split="x"), "train", 8)
  assert source.get([0])[0].shape == (1, 8, 8, 3)
  with pytest.raises(ValueError, match="b.png"):
    source.get([1])


def _png_chunk(kind, data):
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_rgb16_png(path, rgb_HxWx3):
  """A 16-bit RGB PNG (Pillow cannot write one)."""
  h, w, _ = rgb_HxWx3.shape
  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb_HxWx3)
  header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                   + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


# Deep pixels and the 8-bit grey they must read as: the top 8 bits (value >> 8 for 16 bits).
_DEEP = np.array([[0, 255, 256, 0x7FFF], [0x8000, 0x80FF, 0xFF00, 0xFFFF],
                  [1, 0x0101, 0x1234, 0xABCD], [0xFEFF, 0x00FF, 0x4000, 0xC0DE]])
_DEEP_8BIT = np.array([[0, 0, 1, 127], [128, 128, 255, 255], [0, 1, 0x12, 0xAB],
                       [0xFE, 0, 0x40, 0xC0]], np.uint8)


def _save_deep(path, kind):
  """Writes _DEEP (or _DEEP_8BIT for the 8-bit kinds) as a `kind` image file."""
  if kind == "16-bit PNG":  # Pillow mode I;16
    Image.fromarray(_DEEP.astype(np.uint16)).save(path)
  elif kind == "16-bit big-endian TIFF":  # mode I;16B
    Image.fromarray(_DEEP.astype(">u2")).save(path.with_suffix(".tif"))
    return path.with_suffix(".tif")
  elif kind == "16-bit PGM":  # read back as mode I
    Image.fromarray(_DEEP.astype(np.uint16)).save(path.with_suffix(".pgm"))
    return path.with_suffix(".pgm")
  elif kind == "32-bit TIFF":  # mode I, values past 16 bits
    Image.fromarray((_DEEP.astype(np.int64) << 15).astype(np.int32)).save(path.with_suffix(".tif"))
    return path.with_suffix(".tif")
  elif kind == "16-bit RGB PNG":
    _write_rgb16_png(path, np.repeat(_DEEP[..., None], 3, -1))
  elif kind == "8-bit grey PNG":
    Image.fromarray(_DEEP_8BIT).save(path)
  elif kind == "8-bit RGBA PNG":
    Image.fromarray(np.stack([_DEEP_8BIT] * 3 + [np.full_like(_DEEP_8BIT, 9)], -1)).save(path)
  return path


@pytest.mark.parametrize("kind", ["16-bit PNG", "16-bit big-endian TIFF", "16-bit PGM",
                                  "32-bit TIFF", "16-bit RGB PNG", "8-bit grey PNG",
                                  "8-bit RGBA PNG"])
def test_deep_image_files_read_as_their_8_bit_grey(tmp_path, kind):
  path = _save_deep(tmp_path / "deep.png", kind)
  with Image.open(path) as im:
    assert im.mode == {"16-bit PNG": "I;16", "16-bit big-endian TIFF": "I;16B", "16-bit PGM": "I",
                       "32-bit TIFF": "I"}.get(kind, im.mode), im.mode  # the modes meant
  images = readers.FileSource([str(path)], None, 4, "deep", None).get([0])[0]
  np.testing.assert_array_equal(images[0], np.repeat(_DEEP_8BIT[..., None], 3, -1))


def test_8_bit_image_files_read_as_before(tmp_path):
  # The 8-bit path stays Pillow's own conversion to RGB, byte for byte.
  rng = np.random.default_rng(5)
  arrays = {"rgb.png": rng.integers(0, 256, (6, 6, 3), np.uint8),
            "grey.png": rng.integers(0, 256, (6, 6), np.uint8),
            "rgba.png": rng.integers(0, 256, (6, 6, 4), np.uint8)}
  for name, array in arrays.items():
    Image.fromarray(array).save(tmp_path / name)
  Image.fromarray(arrays["rgb.png"]).quantize(16).save(tmp_path / "palette.png")
  Image.fromarray(arrays["grey.png"] > 127).save(tmp_path / "bits.png")
  files = sorted(str(p) for p in tmp_path.glob("*.png"))
  got = readers.FileSource(files, None, 6, "8-bit", None).get(np.arange(len(files)))[0]
  for image, path in zip(got, files):
    with Image.open(path) as im:
      np.testing.assert_array_equal(image, np.asarray(im.convert("RGB")), err_msg=path)


def test_npz_sources(tmp_path):
  x_train, x_test = _random_images(10, 8, c=None), _random_images(4, 8, seed=1)
  np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=np.arange(10),
           x_test=x_test, y_test=np.arange(4))
  cfg = _cfg(source="folder", path=str(tmp_path / "mnist.npz"), val_examples=3)
  train, test = readers.make_source(cfg, "train", 8), readers.make_source(cfg, "test", 8)
  assert (len(train), len(test)) == (7, 4)
  np.testing.assert_array_equal(test.get(np.arange(4))[0], x_test)
  folder = tmp_path / "arrays"
  folder.mkdir()
  np.savez(folder / "train.npz", images=x_test, labels=[3, 2, 1, 0])
  np.savez(folder / "test.npz", x=x_train)  # no labels
  cfg = _cfg(source="folder", path=str(folder), val_split="test")
  assert readers.make_source(cfg, "train", 4).get([0])[1].tolist() == [3]
  assert readers.make_source(cfg, "test", 4).get([0])[1] is None


def test_npz_bad_files(tmp_path):
  np.savez(tmp_path / "float.npz", images=np.zeros((3, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="float.npz.*uint8"):
    readers.make_source(_cfg(source="folder", path=str(tmp_path / "float.npz")), "train", 8)
  np.savez(tmp_path / "nokey.npz", pictures=np.zeros((3, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="nokey.npz.*no image array"):
    readers.make_source(_cfg(source="folder", path=str(tmp_path / "nokey.npz")), "train", 8)
  (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 nope")
  with pytest.raises(ValueError, match="broken.npz"):
    readers.make_source(_cfg(source="folder", path=str(tmp_path / "broken.npz")), "train", 8)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    readers.make_source(_cfg(source="folder", path=str(tmp_path / "missing.npz")), "train", 8)


def test_bad_config():
  with pytest.raises(ValueError, match="data.source"):
    readers.make_source(_cfg(source="webdataset"), "train", 8)
  with pytest.raises(ValueError, match="split"):
    readers.make_source(_cfg(source="digits"), "validation", 8)
  with pytest.raises(ValueError, match="val_examples=5000"):
    readers.make_source(_cfg(source="digits"), "train", 8)  # 5000 > 1437 digits
  with pytest.raises(ValueError, match="data.path"):
    readers.make_source(_cfg(source="cifar", path=""), "train", 8)


# ---------------------------------------------------------------------------------------------
# Pre-tokenised files (openai_npy)


def _save_tokens(folder, tokens, tag="tr"):
  labels = np.eye(10, dtype=np.uint8)[np.arange(len(tokens)) % 10]
  np.save(folder / f"cifar10_{tag}X.npy", tokens)
  np.save(folder / f"cifar10_{tag}Y.npy", labels)


# A token file's bad values: (dtype, {(image, position): value}, what the message says).
BAD_TOKEN_FILES = {
    "512 in a 512-token file": (np.int16, {(2, 5): 512},
                                r"image 2 has a token outside \[0, 512\) \(min 7, max 512; 512 at "
                                r"position 5\)"),
    "-1 as int16": (np.int16, {(1, 0): -1}, r"image 1 .*min -1, max 7; -1 at position 0"),
    "-1 as int32": (np.int32, {(3, 15): -1, (4, 2): 600}, r"image 3 .*-1 at position 15"),
    "-1 stored unsigned": (np.uint16, {(0, 7): 65535}, r"image 0 .*65535 at position 7"),
    "far out as int64": (np.int64, {(4, 9): 2 ** 40}, rf"image 4 .*{2 ** 40} at position 9"),
}


@pytest.mark.parametrize("eager", [True, False], ids=["checked when opened", "checked per batch"])
@pytest.mark.parametrize("case", BAD_TOKEN_FILES)
def test_token_files_outside_the_vocabulary_are_refused(tmp_path, monkeypatch, case, eager):
  dtype, values, match = BAD_TOKEN_FILES[case]
  tokens = np.full((5, 16), 7, dtype)
  for at, value in values.items():
    tokens[at] = value
  _save_tokens(tmp_path, tokens)
  if not eager:
    monkeypatch.setattr(readers.openai_npy, "_EAGER_CHECK_BYTES", 0)
  cfg = _cfg(source="openai_npy", path=str(tmp_path), name="cifar10", val_split="train")
  with pytest.raises(UserError, match=match) as info:
    source = readers.make_source(cfg, "train", 4)
    assert not eager, "a small file is checked whole when opened"
    good = [i for i in range(5) if i not in {row for row, _ in values}]
    pipeline.token_batch(source, None, good)  # how training reads the tokens
    pipeline.token_batch(source, None, np.arange(5))
  message = str(info.value)
  assert "cifar10_trX.npy" in message and "download.py" in message, message
  assert "palette indices 0..511" in message, message


def test_token_files_with_a_start_column_are_explained(tmp_path):
  _save_tokens(tmp_path, np.concatenate([np.full((5, 1), 512), np.zeros((5, 16))], 1).astype(int))
  with pytest.raises(UserError, match=r"17 tokens per image is not a square image .*one more "
                     r"than 4x4, so drop the first column"):
    readers.token_source(str(tmp_path), "cifar10", "train")


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.int64])
def test_token_files_at_the_vocabulary_edges_are_read_exactly(tmp_path, dtype):
  tokens = np.tile(np.array([0, 511], dtype), (5, 8))
  _save_tokens(tmp_path, tokens)
  source = readers.token_source(str(tmp_path), "cifar10", "train")
  batch = pipeline.token_batch(readers.subset(source, [4, 0], "two"), None, np.arange(2))
  assert batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["tokens"], tokens[[4, 0]])


# ---------------------------------------------------------------------------------------------
# Batching


def _id_source(n=50, side=4):
  """An in-memory source whose label is the example index."""
  return readers.ArraySource(_random_images(n, side, seed=n), np.arange(n), side, "ids")


def test_train_val_disjoint():
  source = _id_source(50)
  train, val = readers._carve(source, 10, "ids")  # pylint: disable=protected-access
  train_ids = train.get(np.arange(len(train)))[1]
  val_ids = val.get(np.arange(len(val)))[1]
  assert len(val_ids) == 10 and not set(train_ids) & set(val_ids)
  assert sorted(np.concatenate([train_ids, val_ids])) == list(range(50))
  again = readers._carve(_id_source(50), 10, "ids")[1]  # pylint: disable=protected-access
  np.testing.assert_array_equal(again.get(np.arange(10))[1], val_ids)  # fixed seed


def test_batch_at_is_deterministic_and_covers_epochs():
  source = _id_source(40)
  a = pipeline.batch_at(source, GREY_PALETTE, step=7, batch_size=8, seed=3)
  b = pipeline.batch_at(source, GREY_PALETTE, step=7, batch_size=8, seed=3)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert a["tokens"].shape == (8, 16) and a["tokens"].dtype == np.int32
  # Five steps of 8 are one epoch: every example exactly once, in a seed-dependent order.
  epoch = np.concatenate([pipeline.batch_at(source, GREY_PALETTE, s, 8, 3)["label"] for s in range(5)])
  assert sorted(epoch) == list(range(40)) and list(epoch) != list(range(40))
  np.testing.assert_array_equal(epoch, np.random.default_rng((3, 0)).permutation(40))
  next_epoch = np.concatenate([pipeline.batch_at(source, GREY_PALETTE, s, 8, 3)["label"]
                               for s in range(5, 10)])
  np.testing.assert_array_equal(next_epoch, np.random.default_rng((3, 1)).permutation(40))
  # A batch that spans an epoch boundary (40 is not a multiple of 12).
  spanning = pipeline.batch_at(source, GREY_PALETTE, step=3, batch_size=12, seed=3)["label"]
  stream = np.concatenate([np.random.default_rng((3, e)).permutation(40) for e in (0, 1)])
  np.testing.assert_array_equal(spanning, stream[36:48])
  other_seed = pipeline.batch_at(source, GREY_PALETTE, step=7, batch_size=8, seed=4)["label"]
  assert list(other_seed) != list(a["label"])
  # Tokens are the palette encoding of the images.
  images = pipeline.image_batch_at(source, step=7, batch_size=8, seed=3)["image"]
  np.testing.assert_array_equal(a["tokens"], palette.encode(images, GREY_PALETTE))


@pytest.mark.parametrize("count", [2, 4])
def test_process_shares_concatenate_to_global_batch(count):
  source = _id_source(30)
  full = pipeline.batch_at(source, GREY_PALETTE, step=5, batch_size=8, seed=1)
  shares = [pipeline.batch_at(source, GREY_PALETTE, 5, 8, 1, process_index=i, process_count=count)
            for i in range(count)]
  assert all(s["tokens"].shape == (8 // count, 16) for s in shares)
  for key in ("tokens", "label"):
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), full[key])
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    pipeline.batch_at(source, GREY_PALETTE, 0, 8, 1, process_index=0, process_count=3)


def test_eval_batches_in_order_with_mask():
  source = _id_source(10)
  batches = list(pipeline.eval_batches(source, GREY_PALETTE, batch_size=4, num_batches=None))
  assert len(batches) == 3
  labels = np.concatenate([b["label"] for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])  # wraps to pad
  np.testing.assert_array_equal(masks, [1] * 10 + [0, 0])
  assert len(list(pipeline.eval_batches(source, GREY_PALETTE, 4, num_batches=2))) == 2
  shares = [next(pipeline.eval_batches(source, GREY_PALETTE, 4, 1, i, 2)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([s["label"] for s in shares]), [0, 1, 2, 3])


def test_sample_pixels():
  source = _id_source(30, side=8)
  pixels = pipeline.sample_pixels(source, 5000, seed=0)
  assert pixels.shape == (5000, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, pipeline.sample_pixels(source, 5000, seed=0))
  assert not np.array_equal(pixels, pipeline.sample_pixels(source, 5000, seed=1))
  all_colours = set(map(bytes, source.get(np.arange(30))[0].reshape(-1, 3)))
  assert set(map(bytes, pixels)) <= all_colours
  centers = palette.fit_palette(pixels, k=32)
  assert centers.shape == (32, 3)
