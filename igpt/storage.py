"""Paths that may be local or in object storage (`gs://bucket/...`, `s3://bucket/...`).

Local paths go to `os` unchanged. URLs go to fsspec (gcsfs for `gs://`, s3fs for
`s3://`: the `[gcs]` and `[s3]` extras), which finds credentials and endpoints the standard
way: Google's default credentials and `STORAGE_EMULATOR_HOST`; AWS's credential chain and
`AWS_ENDPOINT_URL`. An object store has no rename, append or lock, and a "folder" is only a
common prefix; an object is written whole by one PUT, so `write_bytes` is atomic there.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import posixpath
import shutil

from igpt.errors import MissingDependencyError, UserError

SCHEMES = {"gs://": ("gcsfs", "gcs"), "s3://": ("s3fs", "s3")}


class StorageError(UserError):
  """An object store refused a request (no bucket, no credentials, no permission)."""


def is_remote(path) -> bool:
  """Whether `path` is an object-store URL."""
  return isinstance(path, str) and path.startswith(tuple(SCHEMES))


def absolute(path) -> str:
  """An absolute local path (`~` expanded), or the URL as given (without a trailing /)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def check_run_store(url) -> None:
  """Refuses a run folder in a store where Orbax keeps no checkpoints (all but GCS)."""
  url = os.fspath(url)
  if is_remote(url) and not url.startswith("gs://"):
    raise StorageError(
        f"{url}: run folders in S3 are not supported yet (Orbax cannot write checkpoints "
        "there); use a gs:// bucket or a folder mounted from S3 (e.g. mountpoint-s3). Data, "
        "palettes, images and transformers folders may be s3:// URLs.")


def join(base, *names) -> str:
  base = os.fspath(base)
  return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def basename(path) -> str:
  return posixpath.basename(os.fspath(path).rstrip("/"))


def dirname(path) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str):
  package, protocol = SCHEMES[scheme]
  try:
    import fsspec  # noqa: PLC0415
    __import__(package)
  except ImportError as e:
    extra = "gcs" if protocol == "gcs" else "s3"
    raise MissingDependencyError(
        f"{scheme} paths need {package}: pip install -e \".[{extra}]\"") from e
  # fsspec logs each read-ahead cache it makes at INFO, and the traceback of each failed
  # read-ahead at ERROR before raising it; gcsfs warns of its bucket-type probe. absl would
  # print them all; the raised errors say what matters.
  logging.getLogger("fsspec").setLevel(logging.CRITICAL)
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  # No listings cache: other processes (Orbax, other hosts) write the same bucket.
  return fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True)


def _fs(url: str):
  return _filesystem(next(s for s in SCHEMES if url.startswith(s)))


def _forget_listings(url: str) -> None:
  """Drops `url` from the listings cache of every other client instance of its store: Orbax
  lists checkpoints through etils' own cached instance, which would otherwise still show a
  folder moved or deleted here."""
  cls = type(_fs(url))
  for instance in list(getattr(cls, "_cache", {}).values()):
    instance.invalidate_cache(url.split("://", 1)[1])


@contextlib.contextmanager
def _named(url: str, doing: str):
  """Turns a store's refusal into one line naming the URL and what to do."""
  try:
    yield
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
    if doing == "read":
      raise  # the caller says which file it needed
    raise StorageError(describe(e, url, doing)) from e
  except MissingDependencyError:
    raise
  except Exception as e:  # noqa: BLE001  (each client has its own exception types)
    raise StorageError(describe(e, url, doing)) from e


def describe(e: BaseException, url: str, doing: str = "use") -> str:
  """One line for a store's error on `url`."""
  text = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
  low = text.lower()
  if "credential" in low or "401" in low or "unauthenticated" in low:
    fix = ("no usable credentials: run `gcloud auth application-default login` (or set "
           "GOOGLE_APPLICATION_CREDENTIALS; AWS_* for s3://)")
  elif "403" in low or "forbidden" in low or "permission" in low or "access denied" in low:
    fix = "permission denied: give this account write access to the bucket, or use another"
  elif "bucket" in low and ("not" in low or "404" in low):
    fix = "the bucket does not exist: create it, or fix the URL"
  else:
    fix = text
  return f"cannot {doing} {url}: {fix}."


# ------------------------------------------------------------------------------ queries


def bucket(url: str) -> str:
  """`gs://name` of a URL."""
  scheme, rest = url.split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


def check_bucket(url: str) -> None:
  """Raises a StorageError naming `url` if its bucket is not there (or cannot be seen)."""
  root = bucket(url)
  with _named(url, "use"):
    found = _fs(url).exists(root.split("://", 1)[1])
  if not found:
    raise StorageError(f"cannot use {url}: the bucket {root} does not exist (or this account "
                       f"cannot see it); create it (gcloud storage buckets create {root}) or "
                       "fix the URL.")


def _ask(path, local, remote: str) -> bool:
  """`local(path)` on a disk, the store client's method `remote` for a URL."""
  path = os.fspath(path)
  if not is_remote(path):
    return local(path)
  with _named(path, "read"):
    return getattr(_fs(path), remote)(path)


def exists(path) -> bool:
  return _ask(path, os.path.exists, "exists")


def isdir(path) -> bool:
  return _ask(path, os.path.isdir, "isdir")


def isfile(path) -> bool:
  return _ask(path, os.path.isfile, "isfile")


def listdir(path) -> list[str]:
  """The names directly inside folder `path` (an object-store prefix lists its children)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.listdir(path)
  with _named(path, "list"):
    entries = _fs(path).ls(path, detail=False)
  prefix = path.split("://", 1)[1].rstrip("/") + "/"
  return sorted({e[len(prefix):].split("/")[0] for e in entries if e.startswith(prefix)} - {""})


# ------------------------------------------------------------------------------ reading, writing


def read_bytes(path) -> bytes:
  path = os.fspath(path)
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  with _named(path, "read"):
    return _fs(path).cat_file(path)


def read_text(path) -> str:
  return read_bytes(path).decode()


def open_read(path, mode: str = "rb"):
  """A file object to read (a local file, or an object read whole into memory)."""
  path = os.fspath(path)
  if not is_remote(path):
    return open(path, mode)
  data = read_bytes(path)
  return io.StringIO(data.decode()) if "b" not in mode else io.BytesIO(data)


def write_bytes(path, data: bytes) -> None:
  """Writes an object in one PUT (remote only; local writes go through igpt.fileio)."""
  path = os.fspath(path)
  with _named(path, "write"):
    _fs(path).pipe_file(path, bytes(data))
  _forget_listings(path)


def upload(local_path: str, url: str) -> None:
  """Copies a local file to `url` as one object."""
  with open(local_path, "rb") as f:
    write_bytes(url, f.read())


def upload_tree(local_dir: str, url: str) -> None:
  """Copies every file under a local folder to the same names under `url`."""
  for root, _, names in os.walk(local_dir):
    for name in names:
      local = os.path.join(root, name)
      upload(local, join(url, *os.path.relpath(local, local_dir).split(os.sep)))


def makedirs(path) -> None:
  """Creates a local folder and its parents; nothing to do for a URL (prefixes need none)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  path = os.fspath(path)
  if not is_remote(path):
    os.remove(path)
    return
  with _named(path, "delete"):
    _fs(path).rm_file(path)
  _forget_listings(path)


def rmtree(path) -> None:
  """Removes a folder and all it holds; a missing one is not an error."""
  path = os.fspath(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  with _named(path, "delete"):
    if _fs(path).exists(path):
      _fs(path).rm(path, recursive=True)
  _forget_listings(path)


def move_tree(src, dst) -> None:
  """Renames a folder: one rename on a disk; a copy of each object, then the deletes, on a
  store (so a kill leaves the source whole)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src):
    os.rename(src, dst)
    return
  with _named(src, "move"):
    fs = _fs(src)
    fs.copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
    fs.rm(src, recursive=True)
  _forget_listings(src)
  _forget_listings(dst)


def user_cache_dir(name: str) -> str:
  """`$XDG_CACHE_HOME/igpt/<name>`, else `~/.cache/igpt/<name>`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "igpt", name)


def local_copy(path, cache_dir: str | None = None) -> str:
  """`path` itself if local; else a copy of the remote file or folder under `cache_dir`
  (default: the user cache's `remote/`), downloaded once and reused while each object's
  size and version (generation / ETag) are unchanged, for readers that need files on a disk."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  cache_dir = cache_dir or user_cache_dir("remote")
  fs = _fs(path)
  target = os.path.join(cache_dir, path.replace("://", "/", 1).rstrip("/"))
  with _named(path, "read"):
    if fs.isdir(path):
      for remote in fs.find(path):
        rel = remote[len(path.split("://", 1)[1].rstrip("/")) + 1:]
        # The versions live beside the folder, not in it, where a reader would see them.
        _fetch(fs, remote, os.path.join(target, rel),
               os.path.join(f"{target}.igpt-versions", rel))
      return target
    _fetch(fs, path.split("://", 1)[1], target, f"{target}.igpt-version")
  return target


def _version(info: dict) -> str:
  """What changes when an object is rewritten (GCS: generation; S3: ETag), with its size."""
  tag = next((info[k] for k in ("generation", "ETag", "etag", "md5Hash", "mtime") if info.get(k)),
             "")
  return f"{info.get('size')} {tag}"


def _fetch(fs, remote: str, local: str, stamp: str) -> None:
  version = _version(fs.info(remote))
  if os.path.isfile(local) and os.path.isfile(stamp):
    with open(stamp) as f:
      if f.read() == version:
        return
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.part"
  fs.get_file(remote, tmp)
  os.replace(tmp, local)
  os.makedirs(os.path.dirname(stamp), exist_ok=True)
  with open(f"{stamp}.part", "w") as f:
    f.write(version)
  os.replace(f"{stamp}.part", stamp)
