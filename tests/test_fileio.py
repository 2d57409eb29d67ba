"""igpt.fileio: a write either completes or leaves the old file, with no temp file behind."""

import os

import pytest

from igpt import fileio


def test_atomic_open_replaces_only_on_success(tmp_path):
  path = tmp_path / "sub" / "config.json"
  with fileio.atomic_open(path) as f:
    f.write("old")
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(path) as f:
      f.write("half")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old"
  assert os.listdir(path.parent) == ["config.json"]
  with fileio.atomic_open(path, "wb") as f:
    f.write(b"new")
  assert path.read_text() == "new"
