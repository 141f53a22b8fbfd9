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

// --- validation figures by task --------------------------------------------------------------

/** Each validation figure: its name, its digits, and whether it is a score of at most 1 (the chart's right axis). */
const METRICS = {
  accuracy: { name: "accuracy", unit: true }, macro_f1: { name: "macro-F1", unit: true },
  spearman: { name: "Spearman", unit: true }, pearson: { name: "Pearson", unit: true }, mse: { name: "MSE" },
  ndcg_at_10: { name: "NDCG@10", unit: true }, mrr_at_10: { name: "MRR@10", unit: true },
  f1: { name: "entity F1", unit: true }, precision: { name: "precision", unit: true }, recall: { name: "recall", unit: true },
  perplexity: { name: "perplexity", digits: 2 }, embedding_similarity: { name: "embedding similarity", unit: true },
};
/** Each task's headline figures, its main one first. */
const TASK_METRICS = {
  classification: ["accuracy", "macro_f1"], multi_label_classification: ["accuracy", "macro_f1"],
  regression: ["spearman", "pearson", "mse"], rerank: ["ndcg_at_10", "mrr_at_10", "accuracy"],
  token_classification: ["f1", "precision", "recall", "accuracy", "macro_f1"], mlm: ["perplexity", "embedding_similarity"],
};
/** Where the task is unknown: the main figure is the first of these that the metrics hold. */
const MAIN_ORDER = ["spearman", "ndcg_at_10", "f1", "accuracy", "perplexity"];

function metricName(key, task) { return key === "accuracy" && task === "token_classification" ? "word accuracy" : METRICS[key].name; }
function fmtMetric(key, x) { return fmt(x, METRICS[key].digits || 4); }
const capital = (s) => s.charAt(0).toUpperCase() + s.slice(1);

/** The figures of a job or model of `task`: its task's, else those that one of `reports` holds. */
function metricKeys(task, ...reports) {
  if (TASK_METRICS[task]) return TASK_METRICS[task];
  return Object.keys(METRICS).filter((k) => reports.some((v) => v && typeof v[k] === "number"));
}

/** A jobs or models table cell: the main validation figure of `metrics` (of `task`), named below it. */
function mainFigureCell(task, metrics) {
  const v = (metrics && metrics.validation) || {};
  const key = (TASK_METRICS[task] ? [TASK_METRICS[task][0]] : MAIN_ORDER).find((k) => typeof v[k] === "number");
  if (!key) return el("td", { class: "num" }, "–");
  const name = metricName(key, task);
  return el("td", { class: "num", title: "validation " + name }, fmt(v[key], METRICS[key].digits || 3), el("span", { class: "sub" }, name));
}

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
    return el("tr", { class: "clickable" + (j.id === state.selected ? " selected" : ""), "data-job": j.id, tabindex: 0,
      onclick: () => selectJob(j.id), onkeydown: (e) => { if (e.key === "Enter") selectJob(j.id); } },
    el("td", { class: "mono" }, j.id), el("td", {}, el("span", { class: "badge " + j.status, "data-testid": "job-status" }, j.status)),
    el("td", {}, j.base_model, el("span", { class: "sub" }, j.task)), progressCell(j), mainFigureCell(j.task, j.metrics),
    el("td", { class: "mono" }, j.model || "–"), el("td", {}, when(j.created_at)));
  }), "No jobs yet.", 7);
  if (typeof onJobListed === "function") onJobListed(list.data.find((j) => j.id === state.selected));
}

// --- models and predict --------------------------------------------------------------------

async function refreshModels() {
  const list = await api("/v1/models");
  state.models = list.data;
  const classifiers = list.data.filter((m) => m.kind === "classifier");
  fillBody("models-table", list.data.map((m) => el("tr", { "data-model": m.id },
    el("td", { class: "mono" }, m.id, el("span", { class: "sub" }, m.task || m.kind)),
    el("td", { class: "wrap" }, m.labels.join(", ") || "–"), mainFigureCell(m.task, m.metrics),
    el("td", {}, m.kind === "classifier" ? el("button", { type: "button", class: "secondary", "aria-label": "Try " + m.id, onclick: () => tryModel(m.id) }, "Try") : ""))),
  "No models.", 4);
  fillSelect("job-base", list.data.map((m) => [m.id, m.id + (m.kind === "classifier" ? " (classifier)" : "")]), null);
  fillSelect("predict-model", classifiers.map(modelOption), null);
  updatePredictForm();
}

/** A tagger's entity types from its tags (B-PER, I-PER → PER). */
function entityTypes(tags) { return [...new Set(tags.filter((t) => t !== "O").map((t) => t.replace(/^[BIESL]-/, "")))]; }

function modelOption(m) {
  const t = m.task || "classification";
  const what = t === "regression" || t === "rerank" ? t : t === "token_classification" ? "tags " + entityTypes(m.labels).join("/") : m.labels.join("/");
  return [m.id, m.id + " · " + what];
}

function modelTask(id) { const m = state.models.find((x) => x.id === id); return (m && m.task) || "classification"; }

/** The predict form of each task: what the text box holds, whether a second text or a query goes with it. */
const PREDICT_FORMS = {
  classification: { input: "Text (one input per line)", pair: true, run: "Predict", hint: "Each text's labels, most likely first." },
  regression: { input: "Text (one input per line)", pair: true, run: "Predict", hint: "A regression: one number per text (or pair)." },
  rerank: { input: "Texts to rank (one per line)", query: true, run: "Rerank", hint: "A reranker: the texts ordered by relevance to the query, best first." },
  token_classification: { input: "Text to tag (one per line)", run: "Find entities", hint: "A token classifier: the entities found in each text." },
};
PREDICT_FORMS.multi_label_classification = Object.assign({}, PREDICT_FORMS.classification, { hint: "Multi-label: each label's own probability." });

function predictForm(task) { return PREDICT_FORMS[task] || PREDICT_FORMS.classification; }

/** Fits the predict form to the chosen model's task; a result of another task is cleared. */
function updatePredictForm() {
  const task = modelTask($("predict-model").value), f = predictForm(task);
  $("predict-input-label").textContent = f.input;
  $("predict-hint").textContent = $("predict-model").value ? f.hint : "";
  $("predict-query-box").hidden = !f.query;
  $("predict-pair-box").hidden = !f.pair;
  $("predict-run").textContent = f.run;
  if (state.predictTask !== task) {
    state.predictTask = task;
    $("predict-result").replaceChildren();
    setMsg("predict-status", "");
  }
}

function tryModel(id) {
  $("predict-model").value = id;
  updatePredictForm();
  $(predictForm(modelTask(id)).query ? "predict-query" : "predict-input").focus();
}

async function predict(ev) {
  ev.preventDefault();
  const model = $("predict-model").value, task = modelTask(model), f = predictForm(task);
  const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
  const texts = lines("predict-input");
  if (!model) { setMsg("predict-status", "No classifier yet: train one first.", "bad"); return; }
  if (!texts.length) { setMsg("predict-status", "Type some text first.", "bad"); return; }
  let path = "/predict", body;
  if (f.query) {
    const query = $("predict-query").value.trim();
    if (!query) { setMsg("predict-status", "Type a query first.", "bad"); return; }
    path = "/rerank";
    body = { query, texts, return_text: true };
  } else {
    const seconds = f.pair ? lines("predict-pair") : [];
    if (seconds.length && seconds.length !== texts.length) {
      setMsg("predict-status", "Pairs go line by line: " + texts.length + " text(s) but " + seconds.length + " second text(s).", "bad");
      return;
    }
    body = { inputs: seconds.length ? texts.map((text, i) => ({ text, text_pair: seconds[i] })) : texts };
  }
  $("predict-run").disabled = true;
  setMsg("predict-status", f.query ? "Ranking…" : "Scoring…");
  try {
    const r = await api("/v1/models/" + encodeURIComponent(model) + path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    setMsg("predict-status", "Model " + r.model + ":", "ok");
    $("predict-result").replaceChildren(...(Array.isArray(r.results) ? r.results.map((x, k) => rankedRow(x, k, texts))
      : r.predictions.flatMap((p, i) => predictionRows(p, body.inputs[i], task))));
  } catch (e) {
    setMsg("predict-status", (f.query ? "Rerank" : "Predict") + " failed: " + e.message, "bad");
    $("predict-result").replaceChildren();
  } finally {
    $("predict-run").disabled = false;
  }
}

function scoreBar(score) {
  return el("span", { class: "pred-bar" }, el("span", { style: "width:" + (100 * Math.max(0, Math.min(1, score))).toFixed(1) + "%" }));
}

/** One input's answer: its labels' scores, its number (a one-output model) or its entities. */
function predictionRows(p, input, task) {
  const text = typeof input === "string" ? input : input.text;
  if (task === "token_classification" && Array.isArray(p)) {
    return [el("div", { class: "pred-input" }, p.length + (p.length === 1 ? " entity" : " entities")), taggedText(text, p)];
  }
  const head = el("div", { class: "pred-input" }, "“" + text + "”" + (typeof input === "string" ? "" : " + “" + input.text_pair + "”"));
  if (Array.isArray(p)) {
    return [head, ...p.map((x) => el("div", { class: "pred-row", "data-label": x.label },
      el("span", {}, x.label), scoreBar(x.score), el("span", { class: "num mono" }, fmt(x.score, 4))))];
  }
  const score = p && p.score;
  return [head, el("div", { class: "pred-row", "data-score": score }, el("span", {}, "score"), el("span", {}), el("span", { class: "num mono" }, fmt(score, 4)))];
}

/** A reranker's result: its rank, text, relevance. */
function rankedRow(x, k, texts) {
  const text = typeof x.text === "string" ? x.text : texts[x.index];
  return el("div", { class: "pred-row rank-row", "data-index": x.index },
    el("span", { class: "mono" }, "#" + (k + 1)), el("span", { class: "text" }, text), scoreBar(x.score), el("span", { class: "num mono" }, fmt(x.score, 4)));
}

/** `text` with each entity in a <mark>; offsets count Unicode scalar values, as Array.from splits. */
function taggedText(text, entities) {
  const chars = Array.from(text), out = [];
  let at = 0;
  const sorted = entities.filter((e) => Number.isInteger(e.start) && Number.isInteger(e.end)).sort((a, b) => a.start - b.start);
  for (const e of sorted) {
    const start = Math.min(e.start, chars.length), end = Math.min(e.end, chars.length);
    if (start < at || end <= start) continue; // overlapping or empty: the text shows once
    const kind = e.entity_group || e.entity || "?";
    if (start > at) out.push(chars.slice(at, start).join(""));
    out.push(el("mark", { class: "ent ent-" + hashOf(kind) % 6, "data-entity": kind, title: kind + " · score " + fmt(e.score, 3) },
      chars.slice(start, end).join(""), el("small", {}, kind)));
    at = end;
  }
  if (at < chars.length) out.push(chars.slice(at).join(""));
  return el("div", { class: "tagged" }, out);
}

function hashOf(s) { let h = 0; for (const c of s) h = (h * 31 + c.codePointAt(0)) >>> 0; return h; }

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
  $("predict-model").addEventListener("change", updatePredictForm);
  connect();
  setTimeout(poll, 3000);
});
