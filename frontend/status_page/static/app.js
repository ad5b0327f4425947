"use strict";
// The status page: polls /api/status once a second and draws it. No framework, no build step.

const TOKEN = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let jobsShape = "";      // names, states and order of the jobs the table was built for

function withToken(url) {
  return TOKEN ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : url;
}

function clock(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(s).padStart(2, "0");
}

const number = (x, digits) => (x === null || x === undefined || !isFinite(x) ? "–" : Number(x).toFixed(digits));
const rate = (x) => (x === null || x === undefined || !isFinite(x) ? "–" : Number(x).toExponential(2));
const baseName = (path) => (path ? String(path).split(/[\\/]/).pop() : "");

function el(tag, attributes, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function post(path, body) {
  const answer = await fetch(withToken(path), {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const data = await answer.json();
  if (!answer.ok) alert(data.error || "refused");
  await poll(false);
}

// ------------------------------------------------------------------ header and the running job
function drawSummary(view) {
  const status = view.status, jobs = status.jobs || [];
  const running = jobs.find((job) => job.state === "running");
  $("title").textContent = view.mode === "queue" ? "Queue: " + baseName(view.folder)
    : "Training: " + ((jobs[0] && (jobs[0].output_name || jobs[0].name)) || baseName(view.folder));
  if (!view.found) {
    $("summary").textContent = "Waiting for the first status from the " + (view.mode === "queue" ? "queue" : "training") + "…";
    return running;
  }
  const done = jobs.filter((job) => ["complete", "failed", "stopped"].includes(job.state)).length;
  const parts = [status.state === "finished" ? "Finished" : status.state === "stopping" ? "Stopping" : "Running",
                 done + " of " + jobs.length + " job(s) done"];
  if (status.state !== "finished" && status.eta_seconds !== null && status.eta_seconds !== undefined)
    parts.push("all done in about " + clock(status.eta_seconds));
  const age = view.now - status.updated;
  const ago = age < 60 ? Math.max(0, Math.round(age)) + " s" : clock(age);
  parts.push(age > 90 && status.state !== "finished" ? "no update for " + ago + "!" : "updated " + ago + " ago");
  $("summary").textContent = parts.join(" · ");
  return running;
}

function drawControls(view, running) {
  const active = view.mode === "queue" && view.found && view.status.state !== "finished";
  $("controls").hidden = !active;
  if (!active) return;
  const requested = view.control && view.control.stop_after_current;
  const button = $("stop-button");
  button.textContent = requested ? "Keep going after this job" : "Stop after this job";
  button.classList.toggle("requested", Boolean(requested));
  button.dataset.requested = requested ? "1" : "0";
  $("stop-note").textContent = requested
    ? "The queue stops when " + (running ? running.name : "the running job") + " ends; waiting jobs stay queued."
    : "";
}

function drawCurrent(job) {
  $("current-name").textContent = job ? job.name : "No job is running";
  const step = job && job.step, total = job && job.total_steps;
  const share = step && total ? Math.min(1, step / total) : 0;
  $("progress-bar").style.width = (share * 100).toFixed(1) + "%";
  $("progress-bar").dataset.step = step || 0;
  $("progress-text").textContent = !job ? "" : step === null || step === undefined ? "starting (loading the model, caching)…"
    : "step " + step + " of " + (total || "?") + " (" + Math.floor(share * 100) + "%)" + (job.epoch ? " · epoch " + job.epoch : "");
  const numbers = $("numbers");
  numbers.replaceChildren();
  if (!job) return;
  const items = [["loss", number(job.loss, 4)], ["learning rate", rate(job.lr)], ["speed", number(job.it_per_s, 2) + " it/s"],
                 ["time left", clock(job.eta_seconds)], ["last saved", baseName(job.last_saved) || "–"]];
  for (const [name, value] of items) {
    const item = el("div");
    item.append(el("dt", {}, name), el("dd", {}, value));
    numbers.append(item);
  }
}

// ------------------------------------------------------------------ curves
function smooth(values) {
  // an exponential moving average without the pull towards the first value (as TensorBoard's)
  const keep = Math.min(0.95, 1 - 4 / Math.max(values.length, 8));
  let level = 0, weight = 0;
  return values.map((v) => {
    if (v === null || !isFinite(v)) return weight ? level / weight : null;
    level = keep * level + (1 - keep) * v;
    weight = keep * weight + (1 - keep);
    return level / weight;
  });
}

function drawChart(svg, xs, series) {
  const W = 600, H = 170, left = 58, right = 10, top = 10, bottom = 22;
  svg.replaceChildren();
  const ys = series.flatMap((s) => s.values).filter((v) => v !== null && isFinite(v));
  if (!xs.length || !ys.length) {
    svg.append(text("no data yet", W / 2, H / 2, "middle"));
    return;
  }
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => left + ((x - x0) / (x1 - x0 || 1)) * (W - left - right);
  const sy = (y) => H - bottom - ((y - y0) / (y1 - y0)) * (H - top - bottom);
  svg.append(line(left, top, left, H - bottom), line(left, H - bottom, W - right, H - bottom));
  const label = Math.abs(y1) < 0.01 ? (v) => v.toExponential(1) : (v) => v.toPrecision(3);
  svg.append(text(label(y1), left - 4, top + 8, "end"), text(label(y0), left - 4, H - bottom, "end"),
             text(String(x0), left, H - 6, "start"), text("step " + x1, W - right, H - 6, "end"));
  for (const s of series) {
    let d = "";
    s.values.forEach((v, i) => {
      if (v === null || !isFinite(v)) return;
      d += (d ? "L" : "M") + sx(xs[i]).toFixed(1) + "," + sy(v).toFixed(1);
    });
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", d);
    path.setAttribute("class", s.kind);
    svg.append(path);
  }
}

function line(x1, y1, x2, y2) {
  const node = document.createElementNS(SVG, "line");
  Object.entries({x1, y1, x2, y2, class: "axis"}).forEach(([k, v]) => node.setAttribute(k, v));
  return node;
}

function text(content, x, y, anchor) {
  const node = document.createElementNS(SVG, "text");
  node.setAttribute("x", x);
  node.setAttribute("y", y);
  node.setAttribute("text-anchor", anchor);
  node.textContent = content;
  return node;
}

function drawCurves(curve) {
  const steps = (curve && curve.step) || [];
  const loss = (curve && curve.loss) || [];
  drawChart($("loss-chart"), steps, [{values: loss, kind: "raw"}, {values: smooth(loss), kind: "line"}]);
  drawChart($("lr-chart"), steps, [{values: (curve && curve.lr) || [], kind: "lr"}]);
}

// ------------------------------------------------------------------ samples, jobs, log
function drawSamples(jobs, running) {
  const source = running && running.sample_urls && running.sample_urls.length ? running
    : [...jobs].reverse().find((job) => job.sample_urls && job.sample_urls.length);
  const urls = source ? source.sample_urls : [];
  const box = $("samples");
  if (box.dataset.shown === urls.join("|")) return;
  box.dataset.shown = urls.join("|");
  $("samples-of").textContent = source ? "of " + source.name : "";
  box.replaceChildren(...(urls.length ? urls.map((url) => {
    const image = el("img", {src: withToken(url), alt: "sample " + baseName(decodeURIComponent(url)), loading: "lazy"});
    image.addEventListener("click", () => openViewer(image.src));
    return image;
  }) : [el("span", {class: "hint"}, "none yet")]));
}

function openViewer(src) {
  $("viewer").querySelector("img").src = src;
  $("viewer").hidden = false;
}

function progressOf(job) {
  if (job.state === "running") return job.step === null || job.step === undefined ? "starting…"
    : job.step + " / " + (job.total_steps || "?") + " steps";
  const parts = [];
  if (job.seconds) parts.push(clock(job.seconds));
  if (job.retried) parts.push("retried: " + job.retried);
  if (job.reason) parts.push(job.reason);
  if (job.state === "waiting" && job.total_steps) parts.push(job.total_steps + " steps");
  return parts.join(" · ");
}

function drawJobs(view) {
  const jobs = view.status.jobs || [];
  const waiting = jobs.filter((job) => job.state === "waiting").map((job) => job.name);
  const canMove = view.mode === "queue" && view.status.state !== "finished";
  const shape = JSON.stringify([jobs.map((job) => [job.name, job.state]), canMove]);
  const body = $("jobs").tBodies[0];
  if (shape !== jobsShape) {
    jobsShape = shape;
    body.replaceChildren(...jobs.map((job, index) => jobRow(job, index, waiting, canMove)));
  }
  for (const job of jobs) {
    const row = body.querySelector(`tr[data-name="${CSS.escape(job.name)}"]`);
    if (!row) continue;
    row.querySelector(".progress").textContent = progressOf(job);
    row.querySelector(".output").textContent = job.output_name || baseName(job.last_saved) || "";
  }
}

function jobRow(job, index, waiting, canMove) {
  const row = el("tr", {"data-name": job.name, "data-state": job.state});
  const state = el("td");
  state.append(el("span", {class: "state " + job.state}, job.state));
  row.append(el("td", {}, String(index + 1)), el("td", {}, job.name), state, el("td", {class: "progress"}),
             el("td", {class: "output"}));
  const order = el("td", {class: "order"});
  const place = waiting.indexOf(job.name);
  if (canMove && place >= 0) {
    const up = el("button", {type: "button", class: "move-up", title: "run earlier"}, "▲");
    const down = el("button", {type: "button", class: "move-down", title: "run later"}, "▼");
    up.disabled = place === 0;
    down.disabled = place === waiting.length - 1;
    up.addEventListener("click", () => post("/api/move", {name: job.name, delta: -1}));
    down.addEventListener("click", () => post("/api/move", {name: job.name, delta: 1}));
    order.append(up, down);
  }
  row.append(order);
  return row;
}

function drawLog(status, jobs, running) {
  const log = $("log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  const textNow = (status.log_tail || []).join("\n");
  if (log.textContent !== textNow) {
    log.textContent = textNow;
    if (atBottom) log.scrollTop = log.scrollHeight;
  }
  const source = running || [...jobs].reverse().find((job) => job.log_url);
  const link = $("log-link");
  link.hidden = !(source && source.log_url);
  if (!link.hidden) link.href = withToken(source.log_url);
}

// ------------------------------------------------------------------ polling
function draw(view) {
  const jobs = view.status.jobs || [];
  const running = drawSummary(view);
  drawControls(view, running);
  const shown = running || [...jobs].reverse().find((job) => job.step !== null && job.step !== undefined) || null;
  drawCurrent(shown);
  drawCurves(view.status.curve);
  drawSamples(jobs, running);
  drawJobs(view);
  drawLog(view.status, jobs, running);
  document.body.dataset.state = view.found ? view.status.state : "waiting";
}

async function poll(again = true) {
  try {
    const answer = await fetch(withToken("/api/status"), {cache: "no-store"});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    draw(await answer.json());
    $("connection").textContent = "";
  } catch (error) {
    $("connection").textContent = "No answer from the training process (" + error.message +
      "): it has ended, or this computer cannot reach it. The last state is shown.";
  }
  if (again) setTimeout(poll, 1000);
}

$("stop-button").addEventListener("click", () => {
  post("/api/stop", {stop: $("stop-button").dataset.requested !== "1"});
});
$("viewer").addEventListener("click", () => { $("viewer").hidden = true; });
document.addEventListener("keydown", (event) => { if (event.key === "Escape") $("viewer").hidden = true; });
poll();
