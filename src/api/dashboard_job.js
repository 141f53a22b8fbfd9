// The job detail: summary, the live chart, per-epoch, per-class and confusion tables, a
// regression's scatter of validation predictions, and the event stream (Server-Sent Events read
// with fetch, since EventSource cannot send the API key).

const detail = { id: null, ctrl: null, job: null, train: new Map(), val: new Map(), lastEvent: null, refreshTimer: null, drawQueued: false,
  tablesKey: null, scatterKey: null, legendKey: null };
const ENDED = ["succeeded", "failed", "cancelled"];

function selectJob(id) {
  if (detail.ctrl) detail.ctrl.abort();
  clearTimeout(detail.refreshTimer);
  Object.assign(detail, { id, ctrl: null, job: null, train: new Map(), val: new Map(), lastEvent: null, tablesKey: null, scatterKey: null });
  state.selected = id;
  for (const tr of $("jobs-table").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.job === id);
  $("job-detail").hidden = false;
  $("detail-title").textContent = "Job " + id;
  $("event-log").replaceChildren();
  $("scatter-box").hidden = true;
  renderTables();
  drawChart();
  loadJob(id);
  loadMetrics(id);
  followEvents(id);
}

async function loadJob(id) {
  try { const j = await api("/v1/jobs/" + encodeURIComponent(id)); if (id === detail.id) renderJob(j); }
  catch (e) { $("detail-summary").textContent = "Cannot load the job: " + e.message; }
}

/** Called by the job list poll with the selected job's latest state. */
function onJobListed(job) {
  if (!job || job.id !== detail.id) return;
  const was = detail.job && detail.job.status;
  renderJob(job);
  if (was !== job.status && ENDED.includes(job.status)) { loadMetrics(job.id); refreshModels().catch(() => {}); }
}

function renderJob(j) {
  detail.job = j;
  const badge = $("detail-status");
  badge.textContent = j.status;
  badge.className = "badge " + j.status;
  $("job-cancel").hidden = ENDED.includes(j.status);
  const p = j.progress || {}, m = j.metrics || {}, v = m.validation || {};
  const items = [
    ["Task", j.task], ["Base", j.base_model], ["Training data", datasetName(j.training_dataset)],
    ["Step", p.total_steps ? p.step + " / " + p.total_steps + " (epoch " + p.epoch + ")" : "–"],
    ["Examples/s", fmt(p.examples_per_second, 1)],
    ["Epochs", j.hyperparameters ? j.hyperparameters.epochs : "–"],
    ...metricKeys(j.task, v).map((k) => ["Val. " + metricName(k, j.task), fmtMetric(k, v[k])]),
  ];
  if (j.status === "succeeded" && typeof m.epoch === "number") items.push(["Kept epoch", m.epoch]);
  items.push(["Model", j.model || "–"]);
  for (const [k, val] of Object.entries(j.metadata || {})) items.push([k, val]);
  if (j.error) items.push(["Error", j.error.message]);
  $("detail-summary").replaceChildren(...items.map(([k, val]) => el("span", {}, k + ": ", el("b", {}, val))));
  // The tables' columns follow the task, their figures the kept epoch.
  if (tablesKey() !== detail.tablesKey) renderTables();
  renderScatter(j);
  queueDraw();
}

function datasetName(id) {
  const d = state.datasets.find((x) => x.id === id);
  return d ? d.name + " (" + id + ")" : id;
}

async function cancelJob() {
  if (!detail.id) return;
  try { renderJob(await api("/v1/jobs/" + encodeURIComponent(detail.id) + "/cancel", { method: "POST" })); }
  catch (e) { logLine("error", "cancel: " + e.message); }
}

/** The stored history: every training step (events carry every 25th) and every epoch. */
async function loadMetrics(id) {
  try {
    const m = await api("/v1/jobs/" + encodeURIComponent(id) + "/metrics");
    if (id !== detail.id) return;
    for (const t of m.train) detail.train.set(t.step, t.loss);
    for (const v of m.validation) detail.val.set(v.epoch, v);
    renderTables();
    queueDraw();
  } catch (_) { /* the stream still draws what it gets */ }
}

// A metrics event means a new epoch: fetch the dense step history too, once things settle.
function scheduleMetrics() {
  clearTimeout(detail.refreshTimer);
  const id = detail.id;
  detail.refreshTimer = setTimeout(() => loadMetrics(id), 400);
}

// --- the event stream ------------------------------------------------------------------------

function setStream(text) { $("stream-status").textContent = text; }

async function followEvents(id) {
  const ctrl = new AbortController();
  detail.ctrl = ctrl;
  const after = detail.lastEvent ? "?after=" + encodeURIComponent(detail.lastEvent) : "";
  setStream("connecting to the event stream…");
  try {
    const res = await fetch("/v1/jobs/" + encodeURIComponent(id) + "/events" + after,
      { headers: authHeaders({ Accept: "text/event-stream" }), signal: ctrl.signal, cache: "no-store" });
    if (res.status === 401) { onUnauthorized(); setStream("stream refused: API key"); return; }
    if (!res.ok) throw new Error("HTTP " + res.status);
    setStream("live");
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const ev = parseSse(block);
        if (ev && id === detail.id) onEvent(ev);
      }
    }
  } catch (e) {
    if (ctrl.signal.aborted) return;
    setStream("stream interrupted (" + e.message + "), retrying…");
    setTimeout(() => { if (detail.ctrl === ctrl) followEvents(id); }, 2000);
    return;
  }
  if (detail.ctrl !== ctrl) return;
  // The server ends the stream when the job ends; anything else was a dropped connection.
  await loadJob(id);
  if (detail.job && !ENDED.includes(detail.job.status)) { setTimeout(() => { if (detail.ctrl === ctrl) followEvents(id); }, 1000); return; }
  setStream("job ended");
  loadMetrics(id);
  refreshModels().catch(() => {});
  refreshJobs().catch(() => {});
}

/** One SSE block (lines of `field: value`) to the event's parsed JSON data, or null. */
function parseSse(block) {
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try { return JSON.parse(data.join("\n")); } catch (_) { return null; }
}

function onEvent(ev) {
  detail.lastEvent = ev.id;
  logLine(ev.level, ev.message, ev.created_at);
  const d = ev.data;
  if (ev.type === "metrics" && d) {
    detail.val.set(d.epoch, d);
    renderTables();
    queueDraw();
    scheduleMetrics();
  } else if (d && typeof d.step === "number" && typeof d.loss === "number") {
    detail.train.set(d.step, d.loss);
    if (detail.job) detail.job.progress = { epoch: d.epoch, step: d.step, total_steps: d.total_steps, examples_per_second: d.examples_per_second };
    if (detail.job) renderJob(detail.job); else queueDraw();
  } else if (/^job |cancel/.test(ev.message)) {
    loadJob(detail.id);
  }
}

function logLine(level, message, ts) {
  const log = $("event-log");
  const t = ts ? new Date(ts * 1000).toLocaleTimeString() : new Date().toLocaleTimeString();
  log.append(el("li", { class: level }, t + "  " + message));
  while (log.childElementCount > 300) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
}

// --- tables ------------------------------------------------------------------------------------

function tablesKey() { return detail.job ? [detail.job.task, detail.job.status, detail.job.metrics && detail.job.metrics.epoch].join(":") : ""; }

/** The figures of the selected job: its task's, else those its epochs hold (accuracy and macro-F1 before any). */
function jobMetricKeys(epochs) {
  const keys = metricKeys(detail.job && detail.job.task, ...epochs);
  return keys.length ? keys : TASK_METRICS.classification;
}

function renderTables() {
  detail.tablesKey = tablesKey();
  const task = detail.job && detail.job.task;
  const epochs = [...detail.val.values()].sort((a, b) => a.epoch - b.epoch);
  const keys = jobMetricKeys(epochs), th = (t) => el("th", { class: "num" }, t);
  $("epoch-table").tHead.replaceChildren(el("tr", {}, th("Epoch"), th("Step"), th("Train loss"), th("Val. loss"),
    keys.map((k) => th(capital(metricName(k, task))))));
  fillBody("epoch-table", epochs.map((v) => el("tr", {},
    el("td", { class: "num" }, v.epoch), el("td", { class: "num" }, v.step), el("td", { class: "num" }, fmt(v.train_loss)),
    el("td", { class: "num" }, fmt(v.loss)), keys.map((k) => el("td", { class: "num" }, fmtMetric(k, v[k]))))),
  "No epoch finished yet.", 4 + keys.length);
  // A regression, a reranker and pre-training have no classes: no per-class table, no confusion matrix.
  const classless = ["regression", "rerank", "mlm"].includes(task);
  $("class-tables").hidden = classless;
  if (classless) return;
  const tagger = task === "token_classification", withClasses = epochs.filter((v) => v.per_class);
  // The tables are of the epoch kept once the job has ended and its final metrics name it (while
  // it runs, its metrics follow the latest epoch), else of the last epoch.
  const m = detail.job && detail.job.metrics, ended = m && (detail.job.status === "succeeded" || m.stopped !== undefined);
  const kept = ended ? withClasses.find((v) => v.epoch === m.epoch) : undefined;
  const last = kept || withClasses[withClasses.length - 1];
  const which = kept ? "epoch " + kept.epoch + ", kept" : last ? "epoch " + last.epoch + ", the latest" : "the kept epoch";
  $("per-class-title").textContent = (tagger ? "Per entity type (" : "Per class (") + which + ")";
  $("per-class-table").tHead.rows[0].cells[0].textContent = tagger ? "Type" : "Label";
  $("confusion-title").textContent = tagger ? "Tag confusion, per word (rows: true, columns: predicted)" : "Confusion matrix (rows: true, columns: predicted)";
  const labels = last ? (last.labels || Object.keys(last.per_class)) : [];
  // A tagger's per_class is by entity type, its labels are the tags (of the confusion matrix).
  const rows = last ? (tagger ? Object.keys(last.per_class) : labels.filter((l) => last.per_class[l])) : [];
  fillBody("per-class-table", rows.map((l) => {
    const c = last.per_class[l];
    return el("tr", {}, el("td", {}, l), el("td", { class: "num" }, fmt(c.precision, 3)), el("td", { class: "num" }, fmt(c.recall, 3)),
      el("td", { class: "num" }, fmt(c.f1, 3)), el("td", { class: "num" }, c.support));
  }), last ? "No classes reported." : "Shown after the first epoch.", 5);
  renderConfusion(last && last.confusion_matrix, labels, last ? "No confusion matrix for " + (task || "this task") + "." : "Shown after the first epoch.");
}

function renderConfusion(cm, labels, emptyText) {
  const body = $("confusion-matrix").tBodies[0];
  if (!cm || !cm.length) { body.replaceChildren(el("tr", {}, el("td", { class: "empty" }, emptyText))); return; }
  const name = (i) => labels[i] !== undefined ? labels[i] : String(i);
  const head = el("tr", {}, el("th", { class: "corner", scope: "col" }, "true ↓ / predicted →"), ...cm[0].map((_, j) => el("th", { class: "num", scope: "col" }, name(j))));
  const rows = cm.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return el("tr", {}, el("th", { scope: "row" }, name(i)), ...row.map((n, j) => {
      const a = n / total, hue = i === j ? "26,127,69" : "180,35,24";
      // An empty off-diagonal cell is the good case: leave it unshaded.
      const style = n === 0 && i !== j ? "" : "background:rgba(" + hue + "," + (0.08 + 0.8 * a).toFixed(2) + ");" + (a > 0.55 ? "color:#fff" : "");
      return el("td", { class: "cell", style, title: n + " of " + total + " true " + name(i) }, n);
    }));
  });
  body.replaceChildren(head, ...rows);
}

// --- a regression's validation scatter -----------------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

/** The kept model's [true, predicted] validation pairs, true across and predicted up, with y = x. */
function renderScatter(j) {
  const raw = j.metrics && Array.isArray(j.metrics.validation_scatter) ? j.metrics.validation_scatter : [];
  const pts = raw.filter((p) => Array.isArray(p) && isFinite(p[0]) && isFinite(p[1]) && p[0] !== null && p[1] !== null);
  const key = j.id + ":" + pts.length;
  if (key === detail.scatterKey) return;
  detail.scatterKey = key;
  $("scatter-box").hidden = !pts.length;
  if (!pts.length) { $("validation-scatter").replaceChildren(); return; }
  // One range for both axes, so that the diagonal is y = x.
  let lo = Infinity, hi = -Infinity;
  for (const [a, b] of pts) { lo = Math.min(lo, a, b); hi = Math.max(hi, a, b); }
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.04; lo -= pad; hi += pad;
  const W = 320, H = 280, L = 46, R = 12, T = 10, B = 38, w = W - L - R, h = H - T - B;
  const X = (x) => (L + (w * (x - lo)) / (hi - lo)).toFixed(1), Y = (y) => (T + h - (h * (y - lo)) / (hi - lo)).toFixed(1);
  const step = niceStep(hi - lo, 4), digits = Math.max(0, Math.ceil(-Math.log10(step)));
  const parts = [svg("rect", { class: "frame", x: L, y: T, width: w, height: h })];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) {
    const label = t.toFixed(digits);
    parts.push(svg("line", { class: "grid", x1: X(t), x2: X(t), y1: T, y2: T + h }), svg("line", { class: "grid", x1: L, x2: L + w, y1: Y(t), y2: Y(t) }),
      svg("text", { x: X(t), y: T + h + 14, "text-anchor": "middle" }, label), svg("text", { x: L - 5, y: Y(t), "text-anchor": "end", "dominant-baseline": "middle" }, label));
  }
  parts.push(svg("line", { class: "diag", x1: X(lo), y1: Y(lo), x2: X(hi), y2: Y(hi) }));
  for (const [a, b] of pts) parts.push(svg("circle", { cx: X(a), cy: Y(b), r: 2.5 }, svg("title", {}, "true " + fmt(a, 3) + ", predicted " + fmt(b, 3))));
  parts.push(svg("text", { x: L + w / 2, y: H - 6, "text-anchor": "middle" }, "true"),
    svg("text", { x: 12, y: T + h / 2, "text-anchor": "middle", transform: "rotate(-90 12 " + (T + h / 2) + ")" }, "predicted"));
  $("validation-scatter").replaceChildren(svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "data-points": pts.length,
    "aria-label": "True against predicted values of " + pts.length + " validation examples" }, parts));
  $("scatter-note").textContent = pts.length + " validation examples; the dashed line is predicted = true.";
}

// --- the chart -----------------------------------------------------------------------------------

function queueDraw() {
  if (detail.drawQueued) return;
  detail.drawQueued = true;
  requestAnimationFrame(() => { detail.drawQueued = false; drawChart(); });
}

function niceStep(range, ticks) {
  const raw = range / ticks, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const n = raw / mag;
  return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
}

function drawChart() {
  const cv = $("loss-chart"), dpr = window.devicePixelRatio || 1;
  const W = cv.clientWidth || 600, H = cv.clientHeight || 280;
  cv.width = Math.round(W * dpr); cv.height = Math.round(H * dpr);
  const g = cv.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, W, H);
  const css = getComputedStyle(document.documentElement), color = (n) => css.getPropertyValue(n).trim();
  const train = [...detail.train.entries()].sort((a, b) => a[0] - b[0]);
  const val = [...detail.val.values()].filter((v) => typeof v.step === "number").sort((a, b) => a.step - b.step);
  cv.dataset.trainPoints = train.length;
  cv.dataset.valPoints = val.length;
  cv.dataset.points = train.length + val.length;
  const L = 52, R = 48, T = 14, B = 34, w = W - L - R, h = H - T - B;
  // The task's first two scores of at most 1 go on the right axis, from 0 (or below, for a correlation).
  const task = detail.job && detail.job.task, scores = jobMetricKeys(val).filter((k) => METRICS[k].unit).slice(0, 2);
  renderLegend(scores, task);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = color("--muted");
  if (!train.length && !val.length) {
    g.textAlign = "center";
    g.fillText(detail.job && ENDED.includes(detail.job.status) ? "No training steps recorded." : "Waiting for the first training step…", W / 2, H / 2);
    return;
  }
  const scored = val.flatMap((v) => scores.map((k) => v[k])).filter((x) => typeof x === "number" && isFinite(x));
  const y2Min = Math.max(-1, Math.min(0, Math.floor(4 * Math.min(0, ...scored)) / 4)), y2Step = 1 - y2Min > 1 ? 0.5 : 0.25;
  const total = (detail.job && detail.job.progress && detail.job.progress.total_steps) || 0;
  const xMax = Math.max(1, total, ...train.map((t) => t[0]), ...val.map((v) => v.step));
  const losses = train.map((t) => t[1]).concat(val.map((v) => v.loss)).filter(isFinite);
  const yMax = Math.max(1e-6, ...losses) * 1.08;
  const X = (s) => L + (w * s) / xMax, Y = (l) => T + h - (h * l) / yMax, Y2 = (p) => T + h - (h * (p - y2Min)) / (1 - y2Min);
  // Grid and axes: loss on the left, the 0–1 scores on the right.
  g.strokeStyle = "#e4e7ec"; g.lineWidth = 1; g.textAlign = "right"; g.textBaseline = "middle";
  const ys = niceStep(yMax, 5);
  for (let v = 0; v <= yMax + 1e-9; v += ys) {
    g.beginPath(); g.moveTo(L, Y(v)); g.lineTo(L + w, Y(v)); g.stroke();
    g.fillText(v.toFixed(ys < 0.1 ? 2 : 1), L - 6, Y(v));
  }
  g.textAlign = "left";
  if (scores.length) for (let p = y2Min; p <= 1.0001; p += y2Step) g.fillText(p.toFixed(2), L + w + 6, Y2(p));
  g.textAlign = "center"; g.textBaseline = "top";
  const xs = Math.max(1, niceStep(xMax, 6));
  for (let s = 0; s <= xMax; s += xs) g.fillText(String(Math.round(s)), X(s), T + h + 6);
  g.fillText("step", L + w / 2, T + h + 19);
  g.strokeStyle = "#9aa3b2"; g.strokeRect(L, T, w, h);
  g.save(); g.translate(12, T + h / 2); g.rotate(-Math.PI / 2); g.fillText("loss", 0, 0); g.restore();
  if (scores.length) {
    g.save(); g.translate(W - 8, T + h / 2); g.rotate(Math.PI / 2); g.fillText(scores.map((k) => metricName(k, task)).join(" / "), 0, 0); g.restore();
  }
  // Epoch ends.
  g.setLineDash([3, 4]); g.strokeStyle = "#c3c9d4";
  for (const v of val) { g.beginPath(); g.moveTo(X(v.step), T); g.lineTo(X(v.step), T + h); g.stroke(); }
  g.setLineDash([]);
  line(g, train.map(([s, l]) => [X(s), Y(l)]), color("--c-train"), 2, train.length <= 40 ? 2.5 : 0, false);
  line(g, val.map((v) => [X(v.step), Y(v.loss)]), color("--c-vloss"), 1.5, 4, true);
  scores.forEach((k, i) => {
    const has = val.filter((v) => typeof v[k] === "number" && isFinite(v[k]));
    line(g, has.map((v) => [X(v.step), Y2(v[k])]), color(SCORE_COLORS[i]), 1.5, 4, true);
  });
}

const SCORE_COLORS = ["--c-acc", "--c-f1"];

/** The legend: the losses, then the scores drawn (rebuilt only when they change). */
function renderLegend(scores, task) {
  const key = scores.join() + ":" + task;
  if (key === detail.legendKey) return;
  detail.legendKey = key;
  const item = (color, dot, text) => el("span", {}, el("i", { class: dot ? "dot" : null, style: "background:var(" + color + ")" }), text);
  $("chart-legend").replaceChildren(item("--c-train", false, "training loss (per step)"), item("--c-vloss", true, "validation loss"),
    ...scores.map((k, i) => item(SCORE_COLORS[i], true, "validation " + metricName(k, task) + " (right axis)")));
}

function line(g, pts, stroke, width, dot, dashed) {
  if (!pts.length) return;
  g.strokeStyle = stroke; g.fillStyle = stroke; g.lineWidth = width;
  g.setLineDash(dashed ? [5, 4] : []);
  g.beginPath();
  pts.forEach(([x, y], i) => (i ? g.lineTo(x, y) : g.moveTo(x, y)));
  g.stroke();
  g.setLineDash([]);
  if (dot) for (const [x, y] of pts) { g.beginPath(); g.arc(x, y, dot, 0, 2 * Math.PI); g.fill(); }
}

window.addEventListener("resize", () => { if (detail.id) queueDraw(); });
window.addEventListener("DOMContentLoaded", () => $("job-cancel").addEventListener("click", cancelJob));
