"""An S3-protocol server on localhost for the object-storage tests: moto in server mode.

`S3Server()` starts it in a subprocess with one bucket; `env` holds the standard variables
that point the AWS clients (s3fs through botocore) at it, with dummy credentials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

BUCKET = "igpt-test"


def available() -> str | None:
  """None if the server and s3fs can be used here, else why not."""
  for module in ("moto.server", "s3fs", "boto3"):
    try:
      __import__(module)
    except ImportError:
      return f"{module.split('.')[0]} is not installed (pip install -e '.[test]')"
  return None


class S3Server:
  """moto's S3 (in memory) with bucket BUCKET; `stop()` ends it."""

  def __init__(self):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
      try:
        socket.create_connection(("127.0.0.1", self.port), 0.2).close()
        break
      except OSError:
        if self.proc.poll() is not None or time.time() > deadline:
          raise RuntimeError("moto's S3 server did not start")
        time.sleep(0.1)
    self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3  # noqa: PLC0415
    boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(
                     Bucket=BUCKET)

  def apply(self) -> None:
    """Points this process's clients at the server."""
    os.environ.update(self.env)

  def stop(self) -> None:
    self.proc.kill()
    self.proc.wait()
