// The demo page: pick or upload an image, set the rows kept and the sampling controls, and
// watch the completions arrive from /api/sample (JSON lines) as the model samples them.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, image: null, start: 0, controller: null };
const PAGE = 24; // held-out images per gallery page

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function status(text) { $("status").textContent = text; }

function megabytes(n) { return `${+(n / 1048576).toPrecision(3)} MB`; }

// Paints raw RGB pixels (base64, row-major) into a canvas of the model's size, exactly.
function paint(canvas, b64) {
  const side = state.info.side;
  canvas.width = canvas.height = side;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(side, side);
  const bytes = atob(b64);
  for (let i = 0, j = 0; i < bytes.length; i += 3, j += 4) {
    image.data[j] = bytes.charCodeAt(i);
    image.data[j + 1] = bytes.charCodeAt(i + 1);
    image.data[j + 2] = bytes.charCodeAt(i + 2);
    image.data[j + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

async function fetchJson(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error(`the demo server does not answer (${e.message}); is it still running?`);
  }
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok || body.error) throw new Error(body.error || response.statusText);
  return body;
}

// --- the image ---------------------------------------------------------------------------

function pick(image) {
  state.image = image;
  paint($("preview"), image.pixels);
  $("picked").textContent = image.label;
  $("complete").disabled = false;
  for (const c of $("gallery").children) c.classList.toggle("picked", c.dataset.index === String(image.index));
  showCut();
}

function showCut() {
  // The slider runs 0..side so its thumb sits at the cut; at least one row is sampled.
  const side = state.info.side, rows = Math.min(Number($("rows").value), side - 1);
  $("rows").value = rows;
  $("rows-out").textContent = rows;
  $("cut").style.height = `${(100 * (side - rows)) / side}%`;
}

async function loadExamples(start) {
  const total = state.info.examples;
  if (!total) return;
  start = Math.max(0, Math.min(start, total - 1));
  const page = await fetchJson(`/api/examples?start=${start}&count=${PAGE}`);
  state.start = start;
  const gallery = $("gallery");
  gallery.replaceChildren();
  page.images.forEach((pixels, i) => {
    const canvas = document.createElement("canvas");
    const image = { tokens: page.tokens[i], pixels, index: start + i,
                    label: `${state.info.split} image #${start + i}` };
    paint(canvas, pixels);
    canvas.dataset.index = start + i;
    canvas.title = image.label;
    canvas.addEventListener("click", () => pick(image));
    gallery.append(canvas);
  });
  $("examples-label").textContent =
    `${state.info.split} images ${start}\u2013${start + page.images.length - 1} of ${total}`;
  $("prev").disabled = start === 0;
  $("next").disabled = start + PAGE >= total;
  if (!state.image) pick({ tokens: page.tokens[0], pixels: page.images[0], index: start,
                           label: `${state.info.split} image #${start}` });
}

async function upload(file) {
  showError("");
  if (!file) return;
  if (file.size > state.info.max_upload_bytes) {
    showError(`${file.name} is ${megabytes(file.size)}; the limit is ` +
              `${megabytes(state.info.max_upload_bytes)}.`);
    return;
  }
  status(`reading ${file.name}\u2026`);
  try {
    const got = await fetchJson("/api/upload", { method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream" } });
    pick({ tokens: got.tokens, pixels: got.image, index: null, label: `upload: ${file.name}` });
    status("image ready");
  } catch (e) {
    showError(`${file.name}: ${e.message}`);
    status("idle");
  }
}

// --- sampling ----------------------------------------------------------------------------

function settings(mode) {
  return {
    mode, count: Number($("count").value), rows: Number($("rows").value),
    temperature: Number($("temperature").value), top_k: Number($("top_k").value || 0),
    top_p: Number($("top_p").value), greedy: $("greedy").checked,
    seed: Number($("seed").value || 0),
    tokens: mode === "completion" ? state.image.tokens : undefined,
  };
}

function figure(role, label) {
  const fig = document.createElement("figure");
  fig.className = role;
  const canvas = document.createElement("canvas");
  const caption = document.createElement("figcaption");
  caption.textContent = label;
  fig.append(canvas, caption);
  $("results").append(fig);
  return canvas;
}

function begin(request, event) {
  const results = $("results");
  results.replaceChildren();
  results.dataset.job = event.job;
  results.dataset.state = "running";
  if (request.mode === "completion") {
    paint(figure("original", "original"), state.image.pixels);
    const prompt = figure("prompt", `top ${event.rows} rows`);
    paint(prompt, state.image.pixels);
    const ctx = prompt.getContext("2d"), side = state.info.side;
    ctx.fillStyle = "rgb(128,128,128)";
    ctx.fillRect(0, event.rows, side, side - event.rows);
  }
  return Array.from({ length: event.count }, (_, i) => figure("sample", `#${i + 1}`));
}

async function run(mode) {
  if (state.controller) state.controller.abort();
  const controller = (state.controller = new AbortController());
  const request = settings(mode);
  showError("");
  $("download").hidden = true;
  $("results").dataset.state = "queued";
  $("stop").disabled = false;
  status("sending\u2026");
  let canvases = [];
  try {
    const response = await fetch("/api/sample", { method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(request) });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || `${response.status} ${response.statusText}`);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", finished = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
        if (event.type === "queued") {
          status(`waiting: ${event.ahead} job${event.ahead === 1 ? "" : "s"} ahead`);
        } else if (event.type === "start") {
          canvases = begin(request, event);
        } else if (event.type === "progress") {
          event.images.forEach((pixels, i) => paint(canvases[i], pixels));
          status(`sampled ${event.done} of ${event.total} pixels`);
        } else if (event.type === "done") {
          finished = true;
          $("results").dataset.state = "done";
          $("download").href = event.grid;
          $("download").hidden = false;
          status(`done in ${event.seconds.toFixed(2)} s (${Math.round(event.pixels_per_s)} pixels/s)`);
        } else if (event.type === "error") {
          throw new Error(event.message);
        }
      }
    }
    if (!finished) throw new Error("the stream ended early: did the server stop?");
  } catch (e) {
    if (e.name === "AbortError") {
      status("stopped");
      $("results").dataset.state = "stopped";
    } else {
      showError(e.message);
      status("failed");
      $("results").dataset.state = "error";
    }
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      $("stop").disabled = true;
    }
  }
}

// --- wiring ------------------------------------------------------------------------------

function wire() {
  for (const id of ["count", "temperature", "top_p"]) {
    const show = () => { $(`${id}-out`).textContent = id === "count" ? $(id).value : Number($(id).value).toFixed(2); };
    $(id).addEventListener("input", show);
    show();
  }
  $("rows").addEventListener("input", showCut);
  const setRowsFrom = (e) => {
    const box = $("preview").getBoundingClientRect(), side = state.info.side;
    const rows = Math.round(((e.clientY - box.top) / box.height) * side);
    $("rows").value = Math.max(0, Math.min(side - 1, rows));
    showCut();
  };
  $("preview").addEventListener("pointerdown", (e) => {
    setRowsFrom(e);
    const move = (m) => setRowsFrom(m);
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", () => window.removeEventListener("pointermove", move), { once: true });
  });
  $("file").addEventListener("change", () => upload($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(e.dataTransfer.files[0]);
  });
  $("prev").addEventListener("click", () => loadExamples(state.start - PAGE).catch((e) => showError(e.message)));
  $("next").addEventListener("click", () => loadExamples(state.start + PAGE).catch((e) => showError(e.message)));
  $("reseed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e6); });
  $("complete").addEventListener("click", () => run("completion"));
  $("unconditional").addEventListener("click", () => run("unconditional"));
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
}

async function main() {
  wire();
  try {
    state.info = await fetchJson("/api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  const info = state.info;
  $("model").textContent = `${info.model} \u00b7 ${info.side}x${info.side} pixels \u00b7 ${info.colours} colours`;
  $("side").textContent = info.side;
  $("rows").max = info.side;
  $("rows").value = Math.floor(info.side / 2);
  $("count").max = info.max_batch;
  $("count").value = Math.min(4, info.max_batch);
  $("count").dispatchEvent(new Event("input"));
  $("top_k").max = info.colours;
  $("limits").textContent = `any image Pillow reads, up to ${megabytes(info.max_upload_bytes)} ` +
    `and ${+(info.max_upload_pixels / 1e6).toPrecision(3)} megapixels; centre-cropped and resized to ${info.side}x${info.side}`;
  const blank = $("preview").getContext("2d");
  $("preview").width = $("preview").height = info.side;
  blank.fillStyle = "#888";
  blank.fillRect(0, 0, info.side, info.side);
  showCut();
  if (info.examples) {
    $("examples").hidden = false;
    await loadExamples(0).catch((e) => showError(e.message));
  }
  document.body.dataset.ready = "1";
}

main();
