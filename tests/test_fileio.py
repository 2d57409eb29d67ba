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


def _write_pair(paths, contents):
  with fileio.atomic_files(paths) as temps:
    for tmp, data in zip(temps, contents):
      with open(tmp, "wb") as f:
        f.write(data)


def _fail_on_call(function, number):
  """`function`, except that its call `number` (1-based) raises OSError."""
  calls = []
  def wrapper(*args, **kwargs):
    calls.append(args)
    if len(calls) == number:
      raise OSError(5, "injected failure")
    return function(*args, **kwargs)
  return wrapper


def _no_links(*args, **kwargs):
  raise OSError(1, "hard links not supported here")


# Where a write of the pair can fail: (patches of the os module, failure inside the block).
PAIR_FAILURES = {
    "first file half-written": ({}, "first"),
    "between the two files": ({}, "second"),
    "flush to disk": ({"fsync": lambda real: _fail_on_call(real, 2)}, None),
    "first rename": ({"replace": lambda real: _fail_on_call(real, 1)}, None),
    "second rename": ({"replace": lambda real: _fail_on_call(real, 2)}, None),
    "second rename, no hard links": ({"replace": lambda real: _fail_on_call(real, 2),
                                      "link": lambda real: _no_links}, None),
}


@pytest.mark.parametrize("had_old", [True, False], ids=["old pair", "no old pair"])
@pytest.mark.parametrize("case", PAIR_FAILURES)
def test_atomic_files_publish_all_or_nothing(tmp_path, monkeypatch, case, had_old):
  paths = [tmp_path / "out" / "grid.png", tmp_path / "out" / "grid.npy"]
  if had_old:
    _write_pair(paths, [b"old picture", b"old tokens"])
  else:
    os.makedirs(paths[0].parent)
  patches, fail_in_block = PAIR_FAILURES[case]
  for name, make in patches.items():
    monkeypatch.setattr(os, name, make(getattr(os, name)))
  with pytest.raises(OSError):
    with fileio.atomic_files(paths) as temps:
      assert [os.path.dirname(t) for t in temps] == [str(paths[0].parent)] * 2
      assert [os.path.splitext(t)[1] for t in temps] == [".png", ".npy"]  # writers see the kind
      for tmp, data, which in zip(temps, [b"new picture", b"new tokens"], ["first", "second"]):
        with open(tmp, "wb") as f:
          f.write(data[:4])
          if fail_in_block == which:
            raise OSError(28, "No space left on device")
          f.write(data[4:])
  monkeypatch.undo()
  if had_old:
    assert [p.read_bytes() for p in paths] == [b"old picture", b"old tokens"]
    assert sorted(os.listdir(paths[0].parent)) == ["grid.npy", "grid.png"]
  else:
    assert os.listdir(paths[0].parent) == []


def test_atomic_files_replace_all_and_keep_the_permissions(tmp_path):
  paths = [tmp_path / "a.png", tmp_path / "a.npy"]
  _write_pair(paths, [b"1", b"2"])
  _write_pair(paths, [b"new 1", b"new 2"])
  assert [p.read_bytes() for p in paths] == [b"new 1", b"new 2"]
  assert sorted(os.listdir(tmp_path)) == ["a.npy", "a.png"]  # no temps, no old copies
  umask = os.umask(0o022)
  os.umask(umask)
  assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in paths)


def test_atomic_files_interrupted_block_leaves_nothing(tmp_path):
  path = tmp_path / "x.npy"
  with pytest.raises(KeyboardInterrupt):
    with fileio.atomic_files([path]) as (tmp,):
      open(tmp, "wb").close()
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []
