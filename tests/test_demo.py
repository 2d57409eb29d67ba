"""The browser demo (demo.py, igpt/demo): its sampler, its server, and the page in Chromium.

The server tests talk HTTP to an in-process server of a tiny run; the browser test drives
Debian's headless Chromium through chromedriver's WebDriver HTTP API (skipped without them).
`python tests/test_demo.py --screenshot docs/demo.png --workdir RUN` remakes the docs'
screenshot with the same machinery (the tests never write docs/).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from igpt import config as config_lib
from igpt import model, palette, sampling, spec, trained
from igpt.demo import images as images_lib
from igpt.demo import sampler as sampler_lib
from igpt.demo import server as server_lib
from igpt.demo import session as session_lib
import train_helpers

DEMO_PY = os.path.join(train_helpers.REPO, "demo.py")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_BYTES, MAX_PIXELS = 64 << 10, 1_000_000  # small limits, so refusing is cheap to test


def _init(cfg):
  """Random params of `cfg` (jitted: eager Flax init takes seconds)."""
  return jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))


def _random_run(workdir: str) -> str:
  """A params-only run of the tests' tiny config (digits, 8x8, 16 grey levels), random weights
  with a non-zero head so samples vary: made in a second, where training takes many."""
  config = train_helpers.tiny_config()
  cfg = spec.model_config(config_lib.complete(config))
  params = _init(cfg)
  params["wtet"] = 0.5 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  centers = np.repeat(np.linspace(-1, 1, 16, dtype=np.float32)[:, None], 3, axis=1)
  trained.save_run(workdir, config, centers, params)
  return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return _random_run(str(tmp_path_factory.mktemp("demo_run")))


@contextlib.contextmanager
def serving(workdir: str, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
  """A warmed-up demo server of `workdir` on a free port, serving on a thread."""
  session = session_lib.Session(trained.load_run(workdir), max_batch=8)
  session.warm_up()
  server = server_lib.make_server(session, "127.0.0.1", 0, max_bytes, max_pixels)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(run_dir):
  with serving(run_dir) as s:
    yield s


# ---------------------------------------------------------------------------------------------
# HTTP helpers


def _call(server, method: str, path: str, body: bytes | None = None, headers=None):
  """(status, parsed JSON or raw bytes) of one request."""
  host, port = server.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=60)
  conn.request(method, path, body=body, headers=headers or {})
  response = conn.getresponse()
  data = response.read()
  conn.close()
  kind = response.getheader("Content-Type", "")
  return response.status, (json.loads(data) if kind.startswith("application/json") else data)


def _stream(server, request: dict, on_event=None) -> list[dict]:
  """The JSON-line events of one /api/sample request (on_event sees each as it comes)."""
  req = urllib.request.Request(server.url + "api/sample", data=json.dumps(request).encode(),
                               headers={"Content-Type": "application/json"})
  events = []
  with urllib.request.urlopen(req, timeout=120) as response:
    for line in response:
      events.append(json.loads(line))
      if on_event:
        on_event(events[-1])
  return events


def _pixels(b64: str, side: int = 8) -> np.ndarray:
  return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(side, side, 3)


def _final(events) -> np.ndarray:
  """uint8 [count, S, S, 3] of a finished stream."""
  assert events[-1]["type"] == "done", events[-1]
  return np.stack([_pixels(b) for b in events[-2]["images"]])


def _png(width: int, height: int, seed: int = 0) -> bytes:
  """A PNG of coloured blocks (a non-square picture, to be centre-cropped)."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
  image = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)[:height, :width]
  image = np.pad(image, ((0, height - image.shape[0]), (0, width - image.shape[1]), (0, 0)))
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  return out.getvalue()


def _flat_png(width: int, height: int) -> bytes:
  """A one-colour PNG: many pixels in few bytes."""
  out = io.BytesIO()
  Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
  return out.getvalue()


def _example(server, index: int = 0) -> list[int]:
  status, page = _call(server, "GET", f"/api/examples?start={index}&count=1")
  assert status == 200, page
  return page["tokens"][0]


# ---------------------------------------------------------------------------------------------
# The fixed-shape sampler


@pytest.mark.slow
def test_fixed_sampler_draws_what_sample_draws_and_compiles_once():
  # sample() compiles for each prompt length and settings: a small model keeps that quick.
  cfg = model.ModelConfig(num_layers=1, d_model=16, num_heads=2, seq_len=16, vocab_size=16)
  params = _init(cfg)
  params["wtet"] = 0.5 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  fixed = sampler_lib.FixedSampler(cfg, params, batch=4, chunk=4)
  full = np.random.default_rng(0).integers(0, 16, (4, 16)).astype(np.int32)
  cases = [(0, sampling.Settings(temperature=0.7, top_k=5)), (6, sampling.Settings(top_p=0.6)),
           (3, sampling.Settings(greedy=True, temperature=0)),
           (9, sampling.Settings(temperature=1.3, top_k=3, top_p=0.5))]
  # Drawn first: sample() compiles the same `prefill` for its own prompt lengths.
  wants = [sampling.sample(cfg, params, full[:, :num_prompt], jax.random.key(3), settings)
           for num_prompt, settings in cases]
  with _lowerings() as lowered:
    for (num_prompt, settings), want in zip(cases, wants):
      tokens = full.copy()
      tokens[:, num_prompt:] = 0
      steps = list(fixed.stream(tokens, num_prompt, 3, settings))
      np.testing.assert_array_equal(steps[-1][1], np.asarray(want))
      done = [d for d, _ in steps]
      assert done == [num_prompt] + list(range(num_prompt - num_prompt % 4 + 4, 17, 4)), done
  assert (lowered["prefill"], lowered["steps"]) == (1, 1), lowered


@contextlib.contextmanager
def _lowerings():
  """Counts the programs lowered for compiling in the block, by name ("steps" for
  "jit(steps)"): a new shape, dtype or placement of an input lowers (and compiles) again,
  even where nothing is traced again."""
  counts = {}

  def on_duration(event, duration_secs, fun_name="", **_):
    del duration_secs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      name = fun_name.removeprefix("jit(").removesuffix(")")
      counts[name] = counts.get(name, 0) + 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)


# ---------------------------------------------------------------------------------------------
# The server


@pytest.mark.slow
def test_completions_keep_the_prompt_stream_and_repeat_with_their_seed(server):
  tokens = _example(server, 5)
  prompt = palette.decode(np.asarray(tokens), server.session.model.palette, 8)
  request = {"tokens": tokens, "rows": 3, "count": 4, "seed": 11, "temperature": 0.9}
  first = _stream(server, request)
  kinds = [e["type"] for e in first]
  assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("progress") == 6, kinds
  progress = [e for e in first if e["type"] == "progress"]
  assert [e["done"] for e in progress] == [24, 32, 40, 48, 56, 64]
  # Partial pictures: the prompt, what is sampled so far, grey after.
  partial = np.stack([_pixels(b) for b in progress[1]["images"]])
  assert (partial[:, 4:] == 128).all()
  samples = _final(first)
  assert samples.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(samples[:, :3], np.broadcast_to(prompt[:3], (4, 3, 8, 3)))
  np.testing.assert_array_equal(_final(_stream(server, request)), samples)  # same seed
  assert (_final(_stream(server, {**request, "seed": 12})) != samples).any()
  # A row's draws do not depend on how many rows were asked for.
  np.testing.assert_array_equal(_final(_stream(server, {**request, "count": 2})), samples[:2])
  # The download is sample.py's grid: original, prompt, then the completions.
  status, png = _call(server, "GET", first[-1]["grid"])
  assert status == 200
  grid = np.asarray(Image.open(io.BytesIO(png)))
  want = server.session.picture(server.session.request(request), samples)
  np.testing.assert_array_equal(grid, want)


def test_unconditional_samples_and_no_recompiles_across_settings(server):
  tokens = _example(server, 0)
  requests = [{"mode": "unconditional", "count": 8, "seed": 1},
              {"tokens": tokens, "rows": 1, "count": 1, "temperature": 0.3, "top_k": 4},
              {"tokens": tokens, "rows": 7, "count": 5, "top_p": 0.5, "seed": 99},
              {"tokens": tokens, "rows": 0, "count": 3, "greedy": True},
              {"mode": "unconditional", "count": 2, "temperature": 1.7, "top_k": 16, "top_p": 0.9}]
  with _lowerings() as lowered:
    results = [_final(_stream(server, r)) for r in requests]
  assert lowered == {}, f"the sampler compiled again: {lowered}"
  assert [len(r) for r in results] == [8, 1, 5, 3, 2]
  assert len({r.tobytes() for r in results[0]}) > 1  # eight different images
  # Greedy draws are the same whatever the seed.
  again = _final(_stream(server, {**requests[3], "seed": 5}))
  np.testing.assert_array_equal(again, results[3])


def test_bad_uploads_get_a_clear_message_and_the_server_goes_on(server):
  big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
  noisy = io.BytesIO()
  Image.fromarray(big).save(noisy, format="PNG")  # random pixels: ~120 KB, over 64 KB
  cases = {
      "not an image": (b"GIF89a? no, just text", 400, "not an image"),
      "empty": (b"", 400, "the upload is empty"),
      "too many bytes": (noisy.getvalue(), 413, "the limit is 0.1 MB"),
      "too many pixels": (_flat_png(2000, 1000), 400, "2000x1000 pixels (2 megapixels); the limit "
                          "is 1 megapixels"),
      "truncated": (_png(40, 30)[:60], 400, "could not be decoded"),
  }
  for name, (body, status, message) in cases.items():
    got_status, got = _call(server, "POST", "/api/upload", body)
    assert (got_status, isinstance(got, dict)) == (status, True), (name, got_status, got)
    assert message in got["error"], (name, got)
    assert _call(server, "GET", "/api/info")[0] == 200, name  # still serving
  # A good upload of any size and shape: centre-cropped, resized, in the palette's colours.
  status, got = _call(server, "POST", "/api/upload", _png(37, 23, seed=4))
  assert status == 200, got
  assert len(got["tokens"]) == 64
  want = images_lib.read_upload(_png(37, 23, seed=4), 8)
  np.testing.assert_array_equal(
      _pixels(got["image"]), palette.quantize(want, server.session.model.palette))


def test_bad_requests_are_refused_with_their_reason(server):
  tokens = _example(server, 0)
  good = {"tokens": tokens, "rows": 4, "count": 2}
  cases = {
      "count 0": ({**good, "count": 0}, "count=0 must be between 1 and 8"),
      "count 9": ({**good, "count": 9}, "count=9 must be between 1 and 8 (--max_batch)"),
      "temperature": ({**good, "temperature": 0}, "temperature=0.0 must be > 0"),
      "top_p": ({**good, "top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
      "top_k": ({**good, "top_k": 17}, "top_k=17 exceeds the model's 16 tokens"),
      "rows": ({**good, "rows": 8}, "rows=8 must be between 0 and 7"),
      "seed": ({**good, "seed": "x"}, "seed must be an integer"),
      "short tokens": ({**good, "tokens": tokens[:10]}, "tokens must be the image's 64 tokens"),
      "token range": ({**good, "tokens": [16] + tokens[1:]}, "prompt_BxN[0, 0] = 16 is outside"),
      "mode": ({**good, "mode": "dream"}, "mode='dream' must be one of"),
  }
  for name, (body, message) in cases.items():
    status, got = _call(server, "POST", "/api/sample", json.dumps(body).encode())
    assert status == 400 and message in got["error"], (name, status, got)
  status, got = _call(server, "POST", "/api/sample", b"{not json")
  assert status == 400 and "not JSON" in got["error"]
  assert _call(server, "GET", "/api/nothing")[0] == 404
  assert _call(server, "GET", "/api/grid/123456.png")[0] == 404
  assert _final(_stream(server, good)).shape == (2, 8, 8, 3)  # and it still samples


def test_two_requests_at_once_take_turns(server, monkeypatch):
  # The first job waits on a gate inside the worker, so the second is surely queued behind it.
  gate, started = threading.Event(), threading.Event()
  real_stream = server.session.stream

  def gated(request, stop=lambda: False):
    if request.seed == 1:
      started.set()
      assert gate.wait(60)
    yield from real_stream(request, stop)

  monkeypatch.setattr(server.session, "stream", gated)
  tokens = _example(server, 2)
  first = {"tokens": tokens, "rows": 4, "count": 3, "seed": 1}
  second = {"mode": "unconditional", "count": 2, "seed": 2}
  results, queued = {}, threading.Event()

  def client(name, request, on_event=None):
    results[name] = _stream(server, request, on_event)

  threads = [threading.Thread(target=client, args=("first", first))]
  threads[0].start()
  assert started.wait(30)
  threads.append(threading.Thread(target=client, args=(
      "second", second, lambda e: e["type"] == "queued" and queued.set())))
  threads[1].start()
  assert queued.wait(30), "the second request was not told it waits"
  gate.set()
  for t in threads:
    t.join(60)
  assert results["second"][0] == {"type": "queued", "ahead": 1}
  monkeypatch.undo()
  # Each got its own images, the ones it gets alone.
  np.testing.assert_array_equal(_final(results["first"]), _final(_stream(server, first)))
  np.testing.assert_array_equal(_final(results["second"]), _final(_stream(server, second)))


def test_a_client_that_leaves_does_not_stop_the_server(server):
  host, port = server.server_address[:2]
  body = json.dumps({"mode": "unconditional", "count": 8}).encode()
  with socket.create_connection((host, port), timeout=30) as sock:
    sock.sendall(b"POST /api/sample HTTP/1.0\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert b"200" in sock.recv(64)
  # Gone mid-stream; the next client is served in full.
  assert _final(_stream(server, {"mode": "unconditional", "count": 1})).shape == (1, 8, 8, 3)


def test_the_page_is_served_and_fetches_nothing_from_elsewhere(server):
  status, html = _call(server, "GET", "/")
  assert status == 200 and b"<canvas id=\"preview\"" in html
  for name in server_lib.static_files():
    status, data = _call(server, "GET", name)
    assert status == 200, name
    assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", data), f"{name} links out"
  assert set(server_lib.static_files()) == {"/index.html", "/app.js", "/style.css"}
  host, port = server.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=30)
  conn.request("GET", "/")
  assert "default-src 'self'" in conn.getresponse().getheader("Content-Security-Policy")
  conn.close()
  pyproject = open(os.path.join(train_helpers.REPO, "pyproject.toml")).read()
  assert '"igpt.demo" = ["static/*"]' in pyproject  # shipped as package data


# ---------------------------------------------------------------------------------------------
# demo.py


@pytest.mark.slow
def test_demo_py_prints_its_address_and_serves_until_interrupted(run_dir, tmp_path):
  proc = subprocess.Popen([sys.executable, DEMO_PY, "--workdir", run_dir, "--port", "0",
                           "--max_batch", "2"], env=train_helpers.env(1), cwd=train_helpers.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert re.fullmatch(r"igpt demo: http://127\.0\.0\.1:\d+/ \(Ctrl-C to stop\)\n", line), (
        line, proc.stderr.read() if proc.poll() is not None else "")
    url = line.split()[2]
    info = json.load(urllib.request.urlopen(url + "api/info", timeout=30))
    assert (info["max_batch"], info["side"], info["examples"]) == (2, 8, 360)
  finally:
    proc.send_signal(2)  # Ctrl-C
    _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 130 and "interrupted: demo stopped" in stderr, stderr[-2000:]
  # Without Pillow: one line naming the extra.
  fake = tmp_path / "no_pil" / "PIL"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('no Pillow here')\n")
  env = train_helpers.env(1)
  env["PYTHONPATH"] = f"{fake.parent}{os.pathsep}{env['PYTHONPATH']}"
  proc = subprocess.run([sys.executable, DEMO_PY, "--workdir", run_dir], env=env,
                        cwd=train_helpers.REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      'error: the demo needs Pillow to read images: pip install -e ".[demo]"'], proc.stderr


# ---------------------------------------------------------------------------------------------
# The page in a real browser


class WebDriver:
  """Just enough of the W3C WebDriver protocol, spoken to chromedriver over HTTP."""

  ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

  def __init__(self, width: int = 1280, height: int = 900):
    port = train_helpers.free_port()
    self.base = f"http://127.0.0.1:{port}"
    self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
      try:
        if self._call("GET", "/status")["ready"]:
          break
      except (OSError, urllib.error.URLError):
        pass
      if time.monotonic() > deadline:
        self.proc.kill()
        raise RuntimeError("chromedriver did not start")
      time.sleep(0.1)
    options = {"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                            "--disable-dev-shm-usage",
                                            f"--window-size={width},{height}"]}
    try:
      session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
          "browserName": "chrome", "goog:chromeOptions": options}}})
    except BaseException:
      self.proc.kill()
      raise
    self.session = f"/session/{session['sessionId']}"

  def _call(self, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=120) as response:
        return json.load(response)["value"]
    except urllib.error.HTTPError as e:
      raise RuntimeError(f"webdriver {method} {path}: {e.read()[:2000]!r}") from None

  def do(self, method, path, body=None):
    return self._call(method, self.session + path, body)

  def get(self, url):
    self.do("POST", "/url", {"url": url})

  def find(self, css):
    return self.do("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

  def send_keys(self, css, text):
    self.do("POST", f"/element/{self.find(css)}/value", {"text": text})

  def script(self, js, *args):
    return self.do("POST", "/execute/sync", {"script": js, "args": list(args)})

  def wait_for(self, js, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      value = self.script(js)
      if value:
        return value
      time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {js}")

  def screenshot(self) -> bytes:
    return base64.b64decode(self.do("GET", "/screenshot"))

  def quit(self):
    try:
      self.do("DELETE", "")
    finally:
      self.proc.terminate()
      self.proc.wait(30)


def _browser():
  if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install -y chromium chromium-driver")
  return WebDriver()


_READ_SAMPLES = """
  return Array.from(document.querySelectorAll('#results figure.sample canvas')).map(
      c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data));"""


def _sample_in_page(driver, rows=None, seed=None, count=None, button="complete"):
  """Sets the controls, presses a button and returns the samples' RGB [n, S, S, 3] once done."""
  driver.script("""
    const [rows, seed, count] = arguments;
    const set = (id, v) => { if (v !== null) { const e = document.getElementById(id);
      e.value = v; e.dispatchEvent(new Event('input')); } };
    set('rows', rows); set('seed', seed); set('count', count);
    document.getElementById('results').dataset.state = 'idle';""", rows, seed, count)
  driver.script(f"document.getElementById('{button}').click();")
  state = driver.wait_for("const s = document.getElementById('results').dataset.state;"
                          "return ['done', 'error'].includes(s) && s;")
  assert state == "done", driver.script("return document.getElementById('error').textContent;")
  rgba = np.asarray(driver.script(_READ_SAMPLES), np.uint8)
  side = int(round((rgba.shape[1] // 4) ** 0.5))
  return rgba.reshape(len(rgba), side, side, 4)[..., :3]


def test_the_page_completes_an_upload_in_chromium(server, tmp_path):
  driver = _browser()
  try:
    driver.get(server.url)
    driver.wait_for("return document.body.dataset.ready === '1';")
    upload = tmp_path / "upload.png"
    upload.write_bytes(_png(50, 30, seed=7))
    driver.send_keys("#file", str(upload))
    driver.wait_for("return document.getElementById('picked').textContent.includes('upload.png');")
    want = palette.quantize(images_lib.read_upload(upload.read_bytes(), 8),
                            server.session.model.palette)
    shown = np.asarray(driver.script(
        "const c = document.getElementById('preview');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, 8, 8).data);"), np.uint8)
    np.testing.assert_array_equal(shown.reshape(8, 8, 4)[..., :3], want)
    samples = _sample_in_page(driver, rows=5, seed=3, count=3)
    assert samples.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(samples[:, :5], np.broadcast_to(want[:5], (3, 5, 8, 3)))
    assert (samples[:, 5:] != 128).any()  # sampled, not left grey
    np.testing.assert_array_equal(_sample_in_page(driver, seed=3), samples)  # same seed
    # What the server would send any client for the same request.
    tokens = palette.encode(want, server.session.model.palette).tolist()
    direct = _final(_stream(server, {"tokens": tokens, "rows": 5, "count": 3, "seed": 3}))
    np.testing.assert_array_equal(direct, samples)
    # A bad upload is said on the page, and the page goes on working.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a picture")
    driver.send_keys("#file", str(bad))
    message = driver.wait_for("const e = document.getElementById('error');"
                              "return !e.hidden && e.textContent;")
    assert "notes.png: the file is not an image" in message, message
    unconditional = _sample_in_page(driver, seed=1, count=2, button="unconditional")
    assert unconditional.shape == (2, 8, 8, 3)
  finally:
    driver.quit()


# ---------------------------------------------------------------------------------------------
# The docs' screenshot


def take_screenshot(workdir: str, out: str, example: int = 7, rows: int = 4, seed: int = 0):
  """docs/demo.png: the page completing a held-out image of `workdir`'s run, 8 times."""
  with serving(workdir, images_lib.MAX_UPLOAD_BYTES, images_lib.MAX_UPLOAD_PIXELS) as s:
    driver = WebDriver(width=1240, height=860)
    try:
      driver.get(s.url)
      driver.wait_for("return document.body.dataset.ready === '1';")
      driver.script(f"document.querySelector('#gallery canvas[data-index=\"{example}\"]').click();")
      _sample_in_page(driver, rows=rows, seed=seed, count=8)
      png = driver.screenshot()
    finally:
      driver.quit()
  # 256 colours keep it small (flat page colours and a 16-colour palette lose nothing seen).
  image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256, dither=Image.Dither.NONE)
  image.save(out, optimize=True)
  return os.path.getsize(out)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description="Remakes the demo's screenshot.")
  parser.add_argument("--screenshot", required=True, help="output PNG (docs/demo.png)")
  parser.add_argument("--workdir", required=True, help="a trained run, e.g. runs/tiny")
  args = parser.parse_args()
  if not shutil.which(CHROMEDRIVER):
    sys.exit(f"needs {CHROMEDRIVER}: apt-get install -y chromium chromium-driver")
  print(f"wrote {args.screenshot} ({take_screenshot(args.workdir, args.screenshot)} bytes)")
