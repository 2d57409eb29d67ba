"""The demo's local web server: the page, its JSON API, and one sampling worker.

    GET  /                      the page (static/index.html; its script and style beside it)
    GET  /api/info              the model: side, colours, max batch, held-out images
    GET  /api/examples?start=&count=   held-out images: tokens and pixels
    POST /api/upload            an image file's bytes -> its tokens and pixels (model-sized)
    POST /api/sample            a request (JSON) -> JSON lines: queued, start, progress..., done
    GET  /api/grid/<job>.png    a finished job's picture

Python's ThreadingHTTPServer answers each connection on its own thread; sampling runs on one
worker thread, a job at a time in arrival order, so a second tab waits its turn (told how
many jobs are ahead) and never interleaves with the first. A client that goes away cancels
its job. Mistakes (a bad upload, a bad setting) are answered with {"error": message}; the
server keeps running. Nothing on the page is fetched from elsewhere.
"""

from __future__ import annotations

import collections
import importlib.resources
import itertools
import json
import queue
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from absl import logging

from igpt import compile_cache, trained
from igpt.demo import images as images_lib
from igpt.demo.session import Request, Session
from igpt.errors import UserError

MAX_JSON_BYTES = 1 << 20  # a request: a few settings and at most a 64x64 image's tokens
MAX_DRAIN_BYTES = 256 << 20  # read (and drop) an oversized upload up to this, to answer it
MAX_EXAMPLES = 64  # held-out images per /api/examples answer
KEPT_PICTURES = 32  # finished jobs whose picture can still be downloaded
POLL_S = 0.5  # how often a waiting connection checks its place in the queue

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# The page may load only its own files: no fonts, scripts or trackers from elsewhere.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'")


def static_files() -> dict[str, bytes]:
  """{'/index.html': bytes, ...}: the page's files, shipped as package data."""
  folder = importlib.resources.files("igpt.demo").joinpath("static")
  return {f"/{f.name}": f.read_bytes() for f in folder.iterdir()
          if f.is_file() and "." + f.name.rpartition(".")[2] in _TYPES}


class HttpError(Exception):
  def __init__(self, status: HTTPStatus, message: str):
    super().__init__(message)
    self.status = status


# ---------------------------------------------------------------------------------------------
# The sampling worker


class Job:
  """One request on its way through the worker; `events` carries what the client is sent."""

  _ids = itertools.count(1)

  def __init__(self, request: Request):
    self.id, self.request = next(Job._ids), request
    self.events: queue.Queue = queue.Queue()
    self.cancelled = threading.Event()
    self.started = False


class Worker:
  """Runs jobs one at a time, in order, on one thread (the compiled sampler is shared)."""

  def __init__(self, session: Session):
    self.session = session
    self._jobs: queue.Queue = queue.Queue()
    self._waiting: collections.deque = collections.deque()
    self._lock = threading.Lock()
    self._pictures: collections.OrderedDict = collections.OrderedDict()
    threading.Thread(target=self._loop, name="demo-sampler", daemon=True).start()

  def submit(self, request: Request) -> Job:
    job = Job(request)
    with self._lock:
      self._waiting.append(job)
    self._jobs.put(job)
    return job

  def ahead(self, job: Job) -> int:
    """How many jobs run before `job` (the running one included)."""
    with self._lock:
      return self._waiting.index(job) if job in self._waiting else 0

  def picture(self, job_id: int) -> bytes | None:
    with self._lock:
      return self._pictures.get(job_id)

  def events(self, job: Job):
    """The job's events for its client, with its place in the queue while it waits."""
    told = self.ahead(job)
    if told:
      yield {"type": "queued", "ahead": told}
    while True:
      try:
        event = job.events.get(timeout=POLL_S)
      except queue.Empty:
        ahead = self.ahead(job)
        if not job.started and ahead != told:
          told = ahead
          yield {"type": "queued", "ahead": ahead}
        continue
      if event is None:
        return
      yield event

  def _loop(self):
    while True:
      job = self._jobs.get()
      try:
        if not job.cancelled.is_set():
          self._run(job)
      except UserError as e:
        job.events.put({"type": "error", "message": str(e)})
      except Exception as e:  # noqa: BLE001  (a bug: said on the page, logged, worker lives)
        logging.error("sampling job %d failed:\n%s", job.id, traceback.format_exc())
        job.events.put({"type": "error", "message": f"internal error: {type(e).__name__}: {e}"})
      finally:
        with self._lock:
          self._waiting.remove(job)
        job.events.put(None)

  def _run(self, job: Job):
    request, session = job.request, self.session
    job.started = True
    job.events.put({"type": "start", "job": job.id, "count": request.count,
                    "rows": request.rows if request.tokens is not None else 0,
                    "total": session.length})
    t0, last = time.perf_counter(), None
    for done, pictures in session.stream(request, job.cancelled.is_set):
      job.events.put({"type": "progress", "done": done, "total": session.length,
                      "images": images_lib.pixels_b64(pictures)})
      last = pictures
    if job.cancelled.is_set():
      logging.info("job %d cancelled: its client went away", job.id)
      return
    seconds = time.perf_counter() - t0
    png = images_lib.png_bytes(session.picture(request, last))
    with self._lock:
      self._pictures[job.id] = png
      while len(self._pictures) > KEPT_PICTURES:
        self._pictures.popitem(last=False)
    sampled = request.count * (session.length - request.num_prompt)
    logging.info("job %d: %d images, %d pixels in %.2fs", job.id, request.count, sampled, seconds)
    job.events.put({"type": "done", "job": job.id, "grid": f"/api/grid/{job.id}.png",
                    "seconds": round(seconds, 3), "pixels_per_s": round(sampled / seconds, 1)})


# ---------------------------------------------------------------------------------------------
# HTTP


class DemoServer(ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, address, session: Session, max_upload_bytes: int, max_upload_pixels: int):
    super().__init__(address, Handler)
    self.session, self.worker = session, Worker(session)
    self.max_upload_bytes, self.max_upload_pixels = max_upload_bytes, max_upload_pixels
    self.files = static_files()

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
  server: DemoServer
  server_version = "igpt-demo"

  def log_message(self, format, *args):  # noqa: A002  (http.server's name)
    logging.debug("%s %s", self.address_string(), format % args)

  # -- answers ------------------------------------------------------------------------------

  def _send(self, status, body: bytes, content_type: str, headers=()):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    for name, value in headers:
      self.send_header(name, value)
    self.end_headers()
    self.wfile.write(body)

  def _json(self, value, status=HTTPStatus.OK):
    self._send(status, json.dumps(value).encode(), "application/json")

  def _guarded(self, route):
    """Runs a route; its mistakes become {"error": ...} answers, a bug a 500 (logged)."""
    try:
      route()
    except HttpError as e:
      self._json({"error": str(e)}, e.status)
    except UserError as e:
      self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client left
    except Exception as e:  # noqa: BLE001  (the server must keep serving)
      logging.error("%s %s failed:\n%s", self.command, self.path, traceback.format_exc())
      self._json({"error": f"internal error: {type(e).__name__}: {e}"},
                 HTTPStatus.INTERNAL_SERVER_ERROR)

  # -- requests -----------------------------------------------------------------------------

  def do_GET(self):  # noqa: N802
    self._guarded(self._get)

  def do_POST(self):  # noqa: N802
    self._guarded(self._post)

  def _get(self):
    url = urlsplit(self.path)
    path = "/index.html" if url.path == "/" else url.path
    if path in self.server.files:
      kind = _TYPES["." + path.rpartition(".")[2]]
      self._send(HTTPStatus.OK, self.server.files[path], kind,
                 [("Content-Security-Policy", _CSP)])
    elif path == "/api/info":
      self._json({**self.server.session.info(), "max_upload_bytes": self.server.max_upload_bytes,
                  "max_upload_pixels": self.server.max_upload_pixels})
    elif path == "/api/examples":
      self._examples(parse_qs(url.query))
    elif path.startswith("/api/grid/") and path.endswith(".png"):
      self._grid(path[len("/api/grid/"):-len(".png")])
    else:
      raise HttpError(HTTPStatus.NOT_FOUND, f"nothing at {url.path}")

  def _post(self):
    path = urlsplit(self.path).path
    if path == "/api/upload":
      self._upload()
    elif path == "/api/sample":
      self._sample()
    else:
      raise HttpError(HTTPStatus.NOT_FOUND, f"nothing to post to at {path}")

  def _body(self, limit: int, what: str) -> bytes:
    """The request's body, refused (after reading it, so the client hears why) past `limit`."""
    try:
      length = int(self.headers.get("Content-Length", ""))
    except ValueError:
      raise HttpError(HTTPStatus.LENGTH_REQUIRED, f"the {what} has no Content-Length.") from None
    if length > limit:
      remaining = min(length, MAX_DRAIN_BYTES)
      while remaining > 0:
        got = self.rfile.read(min(1 << 20, remaining))
        if not got:
          break
        remaining -= len(got)
      self.close_connection = True
      try:
        images_lib.check_size(length, limit)
      except UserError as e:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{what}: {e}") from None
    return self.rfile.read(length) if length > 0 else b""

  def _examples(self, query):
    try:
      start, count = (int(query.get(name, [default])[0]) for name, default in
                      (("start", 0), ("count", 24)))
    except ValueError:
      raise UserError("start and count must be integers.") from None
    session = self.server.session
    tokens = session.example_tokens(start, max(1, min(count, MAX_EXAMPLES)))
    self._json({"start": start, "total": len(session.examples), "tokens": tokens.tolist(),
                "images": images_lib.pixels_b64(session.decode(tokens))})

  def _upload(self):
    data = self._body(self.server.max_upload_bytes, "the upload")
    session = self.server.session
    tokens = session.upload_tokens(data, self.server.max_upload_bytes,
                                   self.server.max_upload_pixels)
    self._json({"tokens": tokens.tolist(), "image": images_lib.pixels_b64(
        session.decode(tokens[None]))[0]})

  def _grid(self, job_id: str):
    png = self.server.worker.picture(int(job_id)) if job_id.isdigit() else None
    if png is None:
      raise HttpError(HTTPStatus.NOT_FOUND, f"no picture for job {job_id} (only the last "
                      f"{KEPT_PICTURES} are kept): sample again.")
    self._send(HTTPStatus.OK, png, "image/png",
               [("Content-Disposition", f'attachment; filename="igpt_demo_{job_id}.png"')])

  def _sample(self):
    try:
      body = json.loads(self._body(MAX_JSON_BYTES, "the request"))
    except json.JSONDecodeError as e:
      raise UserError(f"the request is not JSON: {e}") from None
    request = self.server.session.request(body)
    job = self.server.worker.submit(request)
    self.send_response(HTTPStatus.OK)
    self.send_header("Content-Type", "application/x-ndjson")
    self.send_header("Cache-Control", "no-store")
    self.end_headers()
    self.close_connection = True  # the stream ends when the connection does
    try:
      for event in self.server.worker.events(job):
        self.wfile.write((json.dumps(event) + "\n").encode())
    except (BrokenPipeError, ConnectionResetError):
      job.cancelled.set()


def make_server(session: Session, host: str = "127.0.0.1", port: int = 8000,
                max_upload_bytes: int = images_lib.MAX_UPLOAD_BYTES,
                max_upload_pixels: int = images_lib.MAX_UPLOAD_PIXELS) -> DemoServer:
  """A server for `session` listening on host:port (0: a free port); not serving yet."""
  try:
    return DemoServer((host, port), session, max_upload_bytes, max_upload_pixels)
  except OSError as e:
    raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server "
                    "there? --port 0 picks a free port).") from None


def main(source: trained.ModelSource, host: str, port: int, max_batch: int) -> None:
  """Loads the model once, compiles its sampler, prints the address and serves until Ctrl-C."""
  if not 0 <= port <= 65535:
    raise UserError(f"--port={port} must be in [0, 65535] (0: a free port).")
  compile_cache.enable("")  # a restart loads the compiled sampler instead of compiling it
  session = Session(trained.load_for_sampling(source), max_batch)
  logging.info("compiled the sampler in %.1fs", session.warm_up())
  server = make_server(session, host, port)
  print(f"igpt demo: {server.url} (Ctrl-C to stop)", flush=True)
  try:
    server.serve_forever()
  finally:
    server.server_close()
