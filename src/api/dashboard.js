"use strict";
// The dashboard's core: API calls with the key, the lists (datasets, jobs, models), upload, the
// start-job form and predict. The job detail (chart, tables, event stream) is dashboard_job.js.

const KEY_STORE = "finetuned.apiKey";
const $ = (id) => document.getElementById(id);
const state = { key: localStorage.getItem(KEY_STORE) || "", authOk: false, jobs: [], models: [], datasets: [], selected: null };

/** Builds an element; children are nodes or strings (always inserted as text, never as HTML). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

function fmt(x, digits = 4) { return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–"; }
function when(ts) {
  if (!ts) return "–";
  const t = new Date(ts * 1000);
  // Today's jobs by time alone, to keep the jobs table narrow.
  return t.toDateString() === new Date().toDateString()
    ? t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : t.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}
function setMsg(id, text, kind) { const m = $(id); m.textContent = text; m.className = "msg" + (kind ? " " + kind : ""); }
function fillBody(table, rows, emptyText, cols) {
  const body = $(table).tBodies[0];
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: cols, class: "empty" }, emptyText))]));
}

/** An API error: the server's envelope message, or what went wrong on the way. */
class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

/** `fetch` of a `/v1` path with the key; returns the parsed JSON or throws ApiError. */
async function api(path, opts = {}) {
  const res = await fetch(path, Object.assign({}, opts, { headers: authHeaders(opts.headers) }));
  let body = null;
  try { body = await res.json(); } catch (_) { /* an empty or non-JSON body: reported below */ }
  if (res.status === 401) { onUnauthorized(); }
  if (!res.ok) {
    const e = body && body.error;
    throw new ApiError(res.status, e ? e.message : "HTTP " + res.status, e && e.code);
  }
  return body;
}

function onUnauthorized() {
  state.authOk = false;
  const s = $("key-status");
  s.textContent = state.key ? "The API key was refused: enter the right one." : "This server needs an API key: enter it.";
  s.className = "bad";
  $("api-key").focus();
}

async function connect() {
  try {
    const info = await api("/v1/info");
    state.authOk = true;
    $("key-status").textContent = state.key ? "Connected with the API key." : "Connected (no key needed).";
    $("key-status").className = "";
    $("server-info").textContent = "v" + info.version + " · " + info.device;
    await refreshAll();
  } catch (e) {
    if (e.status !== 401) { $("key-status").textContent = "Cannot reach the server: " + e.message; $("key-status").className = "bad"; }
  }
}

async function refreshAll() { await Promise.all([refreshDatasets(), refreshModels(), refreshJobs()]); }

// --- datasets ------------------------------------------------------------------------------

async function refreshDatasets() {
  const list = await api("/v1/datasets?limit=100");
  state.datasets = list.data;
  fillBody("datasets-table", list.data.map((d) => el("tr", {},
    el("td", {}, d.name, el("span", { class: "sub mono" }, d.id)), el("td", { class: "num" }, d.rows),
    el("td", { class: "wrap" }, Object.entries(d.labels).map(([l, n]) => l + " (" + n + ")").join(", ") || "unlabeled"))),
  "No datasets yet: upload one above.", 3);
  fillSelect("job-dataset", list.data.map((d) => [d.id, d.name + " · " + d.rows + " rows"]), null);
  fillSelect("job-validation", list.data.map((d) => [d.id, d.name + " · " + d.rows + " rows"]), "hold out 10 % of the training data");
}

/** Refills a select, keeping the chosen value when it is still offered. */
function fillSelect(id, options, noneLabel) {
  const s = $(id), keep = s.value;
  const opts = options.map(([value, label]) => el("option", { value }, label));
  if (noneLabel) opts.unshift(el("option", { value: "" }, noneLabel));
  s.replaceChildren(...opts);
  if (options.some(([v]) => v === keep)) s.value = keep;
}

function contentTypeOf(file) {
  const n = file.name.toLowerCase();
  if (n.endsWith(".csv") || file.type === "text/csv") return "text/csv";
  return "application/x-ndjson";
}

async function upload(ev) {
  ev.preventDefault();
  const file = $("dataset-file").files[0];
  if (!file) { setMsg("upload-status", "Choose a file first.", "bad"); return; }
  const name = $("dataset-name").value.trim() || file.name.replace(/\.[^.]+$/, "");
  $("dataset-upload").disabled = true;
  setMsg("upload-status", "Uploading " + file.name + "…");
  try {
    const d = await api("/v1/datasets?name=" + encodeURIComponent(name), {
      method: "POST", headers: { "Content-Type": contentTypeOf(file) }, body: file,
    });
    setMsg("upload-status", "Stored " + d.id + ": " + d.rows + " rows, labels " + (Object.keys(d.labels).join(", ") || "none") + ".", "ok");
    await refreshDatasets();
    $("job-dataset").value = d.id;
  } catch (e) {
    setMsg("upload-status", "Upload refused: " + e.message, "bad");
  } finally {
    $("dataset-upload").disabled = false;
  }
}

// --- jobs ----------------------------------------------------------------------------------

async function startJob(ev) {
  ev.preventDefault();
  const num = (id) => { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); };
  const body = {
    base_model: $("job-base").value,
    training_dataset: $("job-dataset").value,
    validation_dataset: $("job-validation").value || undefined,
    task: $("job-task").value,
    model_name: $("job-name").value.trim() || undefined,
    hyperparameters: {
      epochs: $("job-epochs-auto").checked ? "auto" : num("job-epochs"), learning_rate: num("job-lr"),
      batch_size: num("job-batch"), max_seq_len: num("job-maxlen"), method: $("job-method").value,
      lora_r: $("job-method").value === "lora" ? num("job-lora-r") : undefined,
    },
  };
  $("job-start").disabled = true;
  try {
    const job = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    setMsg("job-status", "Queued " + job.id + ".", "ok");
    await refreshJobs();
    selectJob(job.id);
  } catch (e) {
    setMsg("job-status", "Not started: " + e.message, "bad");
  } finally {
    $("job-start").disabled = false;
  }
}

function progressCell(j) {
  const p = j.progress;
  if (!p || !p.total_steps) return el("td", {}, j.status === "queued" ? "waiting" : "–");
  const pct = Math.min(100, Math.round((100 * p.step) / p.total_steps));
  return el("td", { title: "epoch " + p.epoch + ", step " + p.step + " of " + p.total_steps },
    el("span", { class: "progress" }, el("span", { style: "width:" + pct + "%" })), pct + " %");
}

async function refreshJobs() {
  const list = await api("/v1/jobs?limit=50");
  state.jobs = list.data;
  fillBody("jobs-table", list.data.map((j) => {
    const acc = j.metrics && j.metrics.validation ? j.metrics.validation.accuracy : undefined;
    return el("tr", { class: "clickable" + (j.id === state.selected ? " selected" : ""), "data-job": j.id, tabindex: 0,
      onclick: () => selectJob(j.id), onkeydown: (e) => { if (e.key === "Enter") selectJob(j.id); } },
    el("td", { class: "mono" }, j.id), el("td", {}, el("span", { class: "badge " + j.status, "data-testid": "job-status" }, j.status)),
    el("td", {}, j.base_model, el("span", { class: "sub" }, j.task)), progressCell(j), el("td", { class: "num" }, fmt(acc, 3)),
    el("td", { class: "mono" }, j.model || "–"), el("td", {}, when(j.created_at)));
  }), "No jobs yet.", 7);
  if (typeof onJobListed === "function") onJobListed(list.data.find((j) => j.id === state.selected));
}

// --- models and predict --------------------------------------------------------------------

async function refreshModels() {
  const list = await api("/v1/models");
  state.models = list.data;
  const classifiers = list.data.filter((m) => m.kind === "classifier");
  fillBody("models-table", list.data.map((m) => {
    const acc = m.metrics && m.metrics.validation ? m.metrics.validation.accuracy : undefined;
    return el("tr", { "data-model": m.id },
      el("td", { class: "mono" }, m.id, el("span", { class: "sub" }, m.kind)), el("td", { class: "wrap" }, m.labels.join(", ") || "–"),
      el("td", { class: "num" }, fmt(acc, 3)),
      el("td", {}, m.kind === "classifier" ? el("button", { type: "button", class: "secondary", "aria-label": "Try " + m.id, onclick: () => tryModel(m.id) }, "Try") : ""));
  }), "No models.", 4);
  fillSelect("job-base", list.data.map((m) => [m.id, m.id + (m.kind === "classifier" ? " (classifier)" : "")]), null);
  fillSelect("predict-model", classifiers.map((m) => [m.id, m.id + " · " + m.labels.join("/")]), null);
}

function tryModel(id) {
  $("predict-model").value = id;
  $("predict-input").focus();
}

async function predict(ev) {
  ev.preventDefault();
  const model = $("predict-model").value;
  const inputs = $("predict-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (!model) { setMsg("predict-status", "No classifier yet: train one first.", "bad"); return; }
  if (!inputs.length) { setMsg("predict-status", "Type some text first.", "bad"); return; }
  $("predict-run").disabled = true;
  setMsg("predict-status", "Scoring…");
  try {
    const r = await api("/v1/models/" + encodeURIComponent(model) + "/predict", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ inputs }),
    });
    setMsg("predict-status", "Model " + r.model + ":", "ok");
    $("predict-result").replaceChildren(...r.predictions.flatMap((preds, i) => [
      el("div", { class: "pred-input" }, "“" + inputs[i] + "”"),
      ...preds.map((p) => el("div", { class: "pred-row", "data-label": p.label },
        el("span", {}, p.label), el("span", { class: "pred-bar" }, el("span", { style: "width:" + (100 * Math.max(0, Math.min(1, p.score))).toFixed(1) + "%" })),
        el("span", { class: "num mono" }, p.score.toFixed(4)))),
    ]));
  } catch (e) {
    setMsg("predict-status", "Predict failed: " + e.message, "bad");
    $("predict-result").replaceChildren();
  } finally {
    $("predict-run").disabled = false;
  }
}

// --- wiring ----------------------------------------------------------------------------------

function saveKey(ev) {
  ev.preventDefault();
  state.key = $("api-key").value.trim();
  if (state.key) localStorage.setItem(KEY_STORE, state.key); else localStorage.removeItem(KEY_STORE);
  connect().then(() => { if (state.selected) selectJob(state.selected); });
}

async function poll() {
  if (state.authOk && !document.hidden) {
    try {
      await refreshJobs();
      // Models and datasets change rarely (a job ending, another client's upload): refresh less often.
      if (++state.ticks % 4 === 0) await Promise.all([refreshModels(), refreshDatasets()]);
    } catch (_) { /* shown by the next successful or refused call */ }
  }
  setTimeout(poll, 3000);
}

window.addEventListener("DOMContentLoaded", () => {
  state.ticks = 0;
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", saveKey);
  $("upload-form").addEventListener("submit", upload);
  $("job-form").addEventListener("submit", startJob);
  // The rank applies to LoRA only; an epoch count only when epochs are not chosen by validation.
  $("job-method").addEventListener("change", () => { $("job-lora-r").disabled = $("job-method").value !== "lora"; });
  $("job-epochs-auto").addEventListener("change", () => { $("job-epochs").disabled = $("job-epochs-auto").checked; });
  $("predict-form").addEventListener("submit", predict);
  connect();
  setTimeout(poll, 3000);
});
