#!/usr/bin/env python3
"""Helper of bench/scale.sh (standard library only).

  scale_jobs.py model DIR              the tiny random BERT of tests/common/mod.rs, as DIR/{config.json,
                                       tokenizer.json,model.safetensors} (same vocabulary, shapes, init)
  scale_jobs.py toy N                  the fixture's N toy rows as JSONL, on stdout
  scale_jobs.py jobs ...               uploads the toy set, queues N jobs at once, waits for all, and
                                       reads the workers' JSON logs and /proc: one run's figures as JSON
  scale_jobs.py train ...              queues one job and waits (a classifier for the predict runs)
  scale_jobs.py dbcost ...             a worker's database time per job, from its sqlx statement log
  scale_jobs.py report OUT             the tables, from OUT/raw/*.json
"""
import argparse, glob, http.client, json, math, os, random, re, statistics, struct, sys, time
from datetime import datetime
from urllib.parse import urlparse

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "ugly"]
NEUTRAL = ["the", "movie", "film", "was", "a", "plot", "it", "really"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL


# ---------------------------------------------------------------- the tiny model (tests/common)

def tiny_config():
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(VOCAB),
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "initializer_range": 0.02}


def tokenizer_json():
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(SPECIAL)]
    tok = lambda t, ty: {"SpecialToken": {"id": t, "type_id": ty}}
    seq = lambda s, ty: {"Sequence": {"id": s, "type_id": ty}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [tok("[CLS]", 0), seq("A", 0), tok("[SEP]", 0)],
                           "pair": [tok("[CLS]", 0), seq("A", 0), tok("[SEP]", 0), seq("B", 1), tok("[SEP]", 1)],
                           "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                                              "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(VOCAB)}, "unk_token": "[UNK]"},
    }


def encoder_params(c):
    """src/model/encoder/bert.rs `encoder_params`, plus the pooler (as `tiny_weights` adds it)."""
    h, i = c["hidden_size"], c["intermediate_size"]
    out = [("embeddings.word_embeddings.weight", [c["vocab_size"], h]),
           ("embeddings.position_embeddings.weight", [c["max_position_embeddings"], h]),
           ("embeddings.token_type_embeddings.weight", [c["type_vocab_size"], h]),
           ("embeddings.LayerNorm.weight", [h]), ("embeddings.LayerNorm.bias", [h])]
    for l in range(c["num_hidden_layers"]):
        for part, w, b in [("attention.self.query", [h, h], h), ("attention.self.key", [h, h], h),
                           ("attention.self.value", [h, h], h), ("attention.output.dense", [h, h], h),
                           ("attention.output.LayerNorm", [h], h), ("intermediate.dense", [i, h], i),
                           ("output.dense", [h, i], h), ("output.LayerNorm", [h], h)]:
            out.append((f"encoder.layer.{l}.{part}.weight", w))
            out.append((f"encoder.layer.{l}.{part}.bias", [b]))
    return out + [("pooler.dense.weight", [h, h]), ("pooler.dense.bias", [h])]


def init(name, shape, c, rng):
    """src/model/encoder/params.rs `init`: LayerNorm 1/0, biases 0, weights N(0, initializer_range)."""
    n = math.prod(shape)
    if "LayerNorm.weight" in name:
        return [1.0] * n
    if name.endswith(".bias") or "LayerNorm" in name:
        return [0.0] * n
    w = [rng.gauss(0.0, c["initializer_range"]) for _ in range(n)]
    if "word_embeddings" in name:  # the padding row starts at zero
        h = shape[1]
        w[c["pad_token_id"] * h:(c["pad_token_id"] + 1) * h] = [0.0] * h
    return w


def write_safetensors(path, tensors):
    """safetensors: u64 LE header length, JSON header (padded to 8 bytes), raw LE f32 data."""
    header, blobs, offset = {}, [], 0
    for name, shape, values in tensors:
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def cmd_model(a):
    os.makedirs(a.dir, exist_ok=True)
    c = tiny_config()
    rng = random.Random(7)
    json.dump(c, open(os.path.join(a.dir, "config.json"), "w"), indent=2)
    json.dump(tokenizer_json(), open(os.path.join(a.dir, "tokenizer.json"), "w"))
    write_safetensors(os.path.join(a.dir, "model.safetensors"),
                      [(n, s, init(n, s, c, rng)) for n, s in encoder_params(c)])


def toy_rows(n):
    """tests/common/mod.rs `toy_rows`."""
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = POSITIVE if pos else NEGATIVE
        text = f"{NEUTRAL[i % len(NEUTRAL)]} {words[i % len(words)]} {NEUTRAL[(i // 3) % len(NEUTRAL)]} {words[(i // 2) % len(words)]}"
        rows.append({"text": text, "label": "pos" if pos else "neg"})
    return rows


def toy_jsonl(n):
    return "".join(json.dumps(r) + "\n" for r in toy_rows(n))


def cmd_toy(a):
    sys.stdout.write(toy_jsonl(a.n))


# ---------------------------------------------------------------- HTTP

class Api:
    def __init__(self, url):
        u = urlparse(url)
        self.host, self.port = u.hostname, u.port
        self.conn = None

    def call(self, method, path, body=None, ctype="application/json"):
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                headers = {}
                if body is not None:
                    if not isinstance(body, (bytes, str)):
                        body = json.dumps(body)
                    headers["content-type"] = ctype
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                if r.status >= 400:
                    raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")
                return json.loads(data) if data else None
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)


def hyper(epochs, batch):
    # tests/scale.rs's tiny job
    return {"epochs": epochs, "batch_size": batch, "learning_rate": 2e-3, "seed": 3}


def all_jobs(api):
    out, after = [], None
    while True:
        page = api.call("GET", "/v1/jobs?limit=1000" + (f"&after={after}" if after else ""))
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["data"][-1]["id"]


def wait_all(api, ids, timeout, poll=0.05):
    """Waits until no job is queued or running (two one-row queries a poll, so that watching costs
    the API next to nothing), then reads every job once. Returns ({status: count} of `ids`, time, jobs)."""
    deadline = time.time() + timeout
    while True:
        # queued first: a job queued after this answer could only come from a requeue
        if not api.call("GET", "/v1/jobs?status=queued&limit=1")["data"] and \
                not api.call("GET", "/v1/jobs?status=running&limit=1")["data"]:
            break
        if time.time() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {len(ids)} jobs")
        time.sleep(poll)
    t = time.time()
    jobs = all_jobs(api)
    want = set(ids)
    counts = {}
    for j in jobs:
        if j["id"] in want:
            counts[j["status"]] = counts.get(j["status"], 0) + 1
    return counts, t, jobs


# ---------------------------------------------------------------- /proc

def proc_stat():
    """(busy, total) jiffies of all CPUs together (busy: all but idle and iowait)."""
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f[:8]]
    return sum(v) - v[3] - v[4], sum(v)


def proc_cpu(pid):
    """utime + stime of a process in seconds (None once it is gone)."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


# ---------------------------------------------------------------- worker logs (--log-format json)

def ts(s):
    # RFC 3339 with up to 9 fractional digits and Z: keep microseconds
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s)
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}").timestamp()


def log_lines(path):
    for line in open(path, errors="replace"):
        line = line.strip()
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                pass


def job_of(rec):
    span = rec.get("span") or {}
    if "job_id" in span:
        return span["job_id"]
    for s in rec.get("spans") or []:
        if "job_id" in s:
            return s["job_id"]
    return None


def worker_timeline(path):
    """[(job, started, succeeded)] of one worker, in order, from its `job started` / `job succeeded` lines."""
    started, out = {}, []
    for r in log_lines(path):
        msg = (r.get("fields") or {}).get("message")
        if msg == "job started":
            started[job_of(r)] = ts(r["timestamp"])
        elif msg == "job succeeded":
            j = job_of(r)
            if j in started:
                out.append((j, started[j], ts(r["timestamp"])))
    return out


def med(v):
    return statistics.median(v) if v else float("nan")


def cmd_jobs(a):
    api = Api(a.url)
    ds = api.call("POST", "/v1/datasets", toy_jsonl(a.rows), "application/x-ndjson")
    pids = dict(p.split(":") for p in a.pids.split(",")) if a.pids else {}
    cpu0 = {k: proc_cpu(int(v)) for k, v in pids.items()}
    busy0, total0 = proc_stat()
    t0 = time.time()
    ids = []
    for _ in range(a.n):
        body = {"base_model": a.base, "training_dataset": ds["id"], "hyperparameters": hyper(a.epochs, a.batch)}
        ids.append(api.call("POST", "/v1/jobs", body)["id"])
    t_submitted = time.time()
    counts, t_seen, _ = wait_all(api, ids, a.timeout)
    busy1, total1 = proc_stat()
    cpu1 = {k: proc_cpu(int(v)) for k, v in pids.items()}
    time.sleep(0.3)  # the workers' last log lines
    timelines = {os.path.basename(p): worker_timeline(p) for p in a.logs.split(",")} if a.logs else {}
    ends = [s for tl in timelines.values() for (_, _, s) in tl]
    starts = [b for tl in timelines.values() for (_, b, _) in tl]
    t_end = max(ends) if ends and len(ends) == a.n else t_seen
    job_ms = [(s - b) * 1e3 for tl in timelines.values() for (_, b, s) in tl]
    gap_ms = [(tl[i + 1][1] - tl[i][2]) * 1e3 for tl in timelines.values() for i in range(len(tl) - 1)]
    ncpu = os.cpu_count()
    wall = t_end - t0
    out = {
        "engine": a.engine, "workers": a.workers, "round": a.round, "n": a.n, "statuses": counts,
        "seconds": wall, "jobs_per_min": 60 * counts.get("succeeded", 0) / wall,
        "submit_seconds": t_submitted - t0, "first_start_after_s": (min(starts) - t0) if starts else None,
        "end_from": "worker logs" if t_end != t_seen else "poll", "poll_lag_s": t_seen - t_end,
        "job_ms_median": med(job_ms), "gap_ms_median": med(gap_ms),
        "jobs_per_worker": {k: len(v) for k, v in timelines.items()},
        "cpus": ncpu, "cores_busy": ncpu * (busy1 - busy0) / max(1, total1 - total0),
        "process_cpu_s": {k: (cpu1[k] - cpu0[k]) if cpu0[k] is not None and cpu1[k] is not None else None for k in pids},
    }
    json.dump(out, open(a.out, "w"), indent=1)
    print(f"  {a.engine:8} workers={a.workers} round={a.round}: {out['jobs_per_min']:.1f} jobs/min "
          f"({counts}), job {out['job_ms_median']:.0f} ms, gap {out['gap_ms_median']:.1f} ms, "
          f"cores busy {out['cores_busy']:.2f}/{ncpu}")


def cmd_train(a):
    api = Api(a.url)
    ds = api.call("POST", "/v1/datasets", toy_jsonl(a.rows), "application/x-ndjson")
    body = {"base_model": a.base, "training_dataset": ds["id"], "model_name": a.name,
            "hyperparameters": hyper(a.epochs, a.batch)}
    job = api.call("POST", "/v1/jobs", body)
    counts, _, jobs = wait_all(api, [job["id"]], a.timeout, 0.2)
    if counts.get("succeeded") != 1:
        raise SystemExit(f"training {a.name} failed: {[j for j in jobs if j['id'] == job['id']]}")
    models = [m["id"] for m in api.call("GET", "/v1/models")["data"]]
    assert a.name in models, models


def cmd_long(a):
    """A job long enough for many lease renewals, cancelled after `seconds` (epochs stop at 100)."""
    api = Api(a.url)
    ds = api.call("POST", "/v1/datasets", toy_jsonl(4096), "application/x-ndjson")
    job = api.call("POST", "/v1/jobs", {"base_model": a.base, "training_dataset": ds["id"], "hyperparameters": hyper(100, 4)})
    time.sleep(a.seconds)
    api.call("POST", f"/v1/jobs/{job['id']}/cancel")
    counts, _, _ = wait_all(api, [job["id"]], 120, 0.2)
    if counts.get("cancelled") != 1:
        raise SystemExit(f"the long job ended {counts}, not cancelled: it was not long enough")


# ---------------------------------------------------------------- database time per job (sqlx::query=debug)

def classify(sql, rows_returned):
    s = " ".join(sql.split()).lower()
    if "update jobs set status = 'running'" in s:
        return "claim" if rows_returned else "idle_poll"  # Postgres: one statement, empty when idle
    if s.startswith("select id, status, worker from jobs where status = 'queued'"):
        return "claim" if rows_returned else "idle_poll"
    if s.startswith("update jobs set lease_expires_at") or s.startswith("select status from jobs where id"):
        return "lease"
    return None


def cmd_dbcost(a):
    """Per job: claim, lease renewals, the final write (BEGIN … COMMIT of `finish`: model row, job
    metrics, status, closing event) and the job's other records (events, progress, metrics)."""
    stmts, renewal_ms = [], []  # (t, job, category, sql, ms); each renewal that held
    for r in log_lines(a.log):
        if r.get("target") != "sqlx::query":
            continue
        f = r.get("fields") or {}
        sql = (f.get("db.statement") or f.get("summary") or "").strip()  # the whole statement when over 4 words
        ms = float(f.get("elapsed_secs", 0)) * 1e3
        cat = classify(sql, int(f.get("rows_returned", 0)))
        if cat == "lease" and sql.lower().startswith("update") and int(f.get("rows_affected", 0)) == 1:
            renewal_ms.append(ms)
        stmts.append((ts(r["timestamp"]), job_of(r), cat, sql, ms))
    tl = worker_timeline(a.log)
    jobs = [j for j, _, _ in tl]
    per = {j: {"claim": 0.0, "final": 0.0, "records": 0.0, "record_statements": 0} for j in jobs}
    # The claim runs before the job's span opens: the claim statements after job i-1 ended (or
    # from the start) up to job i's `job started` belong to job i. (Renewals, from a task of their
    # own, come from the long job, which never succeeds: it is in no timeline.)
    prev_end = -math.inf
    for j, b, s in tl:
        for t, _, cat, sql, ms in stmts:
            if cat == "claim" and prev_end < t <= b:
                per[j]["claim"] += ms
        prev_end = s
    for j in jobs:
        mine = [(sql, ms) for _, job, cat, sql, ms in stmts if job == j and cat is None]
        ins = next((i for i, (sql, _) in enumerate(mine) if sql.lower().startswith("insert into models")), None)
        lo = hi = None
        if ins is not None:
            lo = max((i for i in range(ins + 1) if mine[i][0].upper() == "BEGIN"), default=ins)
            hi = next((i for i in range(ins, len(mine)) if mine[i][0].upper() == "COMMIT"), len(mine) - 1)
        for i, (sql, ms) in enumerate(mine):
            if lo is not None and lo <= i <= hi:
                per[j]["final"] += ms
            else:
                per[j]["records"] += ms
                per[j]["record_statements"] += 1
    # Warm only: the first job pays for connections, caches and the model's first read.
    rows = [per[j] for j in jobs[1:]] or [per[j] for j in jobs]
    job_ms = [(s - b) * 1e3 for _, b, s in tl][1:]
    gap_ms = [(tl[i + 1][1] - tl[i][2]) * 1e3 for i in range(len(tl) - 1)]
    out = {
        "engine": a.engine, "round": a.round, "jobs": len(jobs), "counted": len(rows),
        "claim_ms": med([r["claim"] for r in rows]),
        "renewal_ms": med(renewal_ms) if renewal_ms else None, "renewals": len(renewal_ms),
        "final_write_ms": med([r["final"] for r in rows]),
        "records_ms": med([r["records"] for r in rows]),
        "record_statements": med([r["record_statements"] for r in rows]),
        "job_ms": med(job_ms), "gap_ms": med(gap_ms),
        "idle_polls": sum(1 for s in stmts if s[2] == "idle_poll"),
    }
    json.dump(out, open(a.out, "w"), indent=1)
    print(f"  {a.engine:8} round={a.round}: claim {out['claim_ms']:.2f} ms, final write {out['final_write_ms']:.2f} ms, "
          f"records {out['records_ms']:.2f} ms ({out['record_statements']:.0f} statements), "
          f"renewal {out['renewal_ms'] if out['renewal_ms'] is None else round(out['renewal_ms'], 2)} ms "
          f"({len(renewal_ms)} renewals); job {out['job_ms']:.0f} ms, gap {out['gap_ms']:.1f} ms")


# ---------------------------------------------------------------- the report

def fmt(x, d=1):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def cmd_report(a):
    raw = os.path.join(a.out, "raw")
    load = lambda pat: [json.load(open(p)) for p in sorted(glob.glob(os.path.join(raw, pat)))]
    lines = []
    p = lines.append
    meta = json.load(open(os.path.join(a.out, "meta.json")))
    p(f"# bench/scale.sh — {meta['date']}, build {meta['build']}")
    p(f"machine: {meta['machine']}")
    p(f"settings: {meta['settings']}")
    p("")

    scale = load("scale_*.json")
    if scale:
        engines = [e for e in ("sqlite", "postgres") if any(r["engine"] == e for r in scale)]
        counts = sorted({r["workers"] for r in scale})
        rounds = max(r["round"] for r in scale)
        p(f"## 1. Jobs finished per minute, 1 API + W worker processes ({scale[0]['n']} tiny jobs queued at once; "
          f"median of {rounds} round(s), engines alternating)")
        p("")
        hdr = "| workers |"
        for e in engines:
            hdr += f" {e} jobs/min | ×1 worker | job ms | gap ms | cores busy |"
        p(hdr)
        p("|" + " --- |" * (1 + 5 * len(engines)))
        base = {}
        for w in counts:
            row = f"| {w} |"
            for e in engines:
                rs = [r for r in scale if r["engine"] == e and r["workers"] == w]
                jpm = med([r["jobs_per_min"] for r in rs])
                base.setdefault(e, jpm)
                row += (f" {fmt(jpm)} | {fmt(jpm / base[e], 2)} | {fmt(med([r['job_ms_median'] for r in rs]), 0)} |"
                        f" {fmt(med([r['gap_ms_median'] for r in rs]))} | {fmt(med([r['cores_busy'] for r in rs]), 2)}/{rs[0]['cpus']} |")
            p(row)
        if len(engines) == 2:
            p("")
            p("postgres / sqlite jobs/min: " + ", ".join(
                f"{w} worker(s) {fmt(med([r['jobs_per_min'] for r in scale if r['engine'] == 'postgres' and r['workers'] == w]) / med([r['jobs_per_min'] for r in scale if r['engine'] == 'sqlite' and r['workers'] == w]), 2)}"
                for w in counts))
        # Where the cores stop the scaling.
        p("")
        for e in engines:
            verdict = []
            for w in counts:
                rs = [r for r in scale if r["engine"] == e and r["workers"] == w]
                busy, cpus = med([r["cores_busy"] for r in rs]), rs[0]["cpus"]
                job, gap = med([r["job_ms_median"] for r in rs]), med([r["gap_ms_median"] for r in rs])
                verdict.append((w, busy, cpus, job, gap))
            w1 = verdict[0]
            sat = next((v for v in verdict if v[1] >= 0.9 * v[2]), None)
            msg = f"{e}: "
            if sat:
                msg += (f"the {sat[2]} cores are {100 * sat[1] / sat[2]:.0f} % busy from {sat[0]} worker(s) on; past that a job takes "
                        f"{verdict[-1][3] / w1[3]:.1f}× as long as with 1 worker ({fmt(w1[3], 0)} → {fmt(verdict[-1][3], 0)} ms) "
                        f"while the queue's gap between jobs is {fmt(w1[4])} → {fmt(verdict[-1][4])} ms: "
                        f"the cores, not the queue, stop the scaling")
            else:
                msg += "the cores never reached 90 % busy: what stops the scaling is not the cores"
            p(msg + ".")
        p("")
        p("job ms: a job's time on its worker, `job started` → `job succeeded` in the worker's log (median); "
          "gap ms: from one job's end to the same worker's next job's start (the claim and the loop; median); "
          "cores busy: /proc/stat over the run, all processes (API, workers, Postgres, this client).")
        p("")

    db = load("dbcost_*.json")
    if db:
        engines = [e for e in ("sqlite", "postgres") if any(r["engine"] == e for r in db)]
        p(f"## 2. The queue's own cost per job (1 worker, jobs one after another; database time from the worker's "
          f"sqlx statement log; median over jobs, then over {max(r['round'] for r in db)} round(s))")
        p("")
        p("| per job | " + " | ".join(engines) + (" | postgres / sqlite |" if len(engines) == 2 else ""))
        p("|" + " --- |" * (1 + len(engines) + (1 if len(engines) == 2 else 0)))
        keys = [("claim (ms)", "claim_ms", 2), ("final write: model, metrics, status, event (ms)", "final_write_ms", 2),
                ("lease renewal (ms each)", "renewal_ms", 2),
                ("queue total: claim + final write (ms)", None, 2),
                ("other job records: events, progress, metrics (ms)", "records_ms", 2),
                ("  their statements", "record_statements", 0),
                ("the job on its worker, started → succeeded (ms)", "job_ms", 0),
                ("worker's gap between jobs (ms)", "gap_ms", 1)]
        vals = {}
        for label, k, d in keys:
            row = f"| {label} |"
            for e in engines:
                rs = [r for r in db if r["engine"] == e]
                if k is None:
                    v = med([r["claim_ms"] + r["final_write_ms"] for r in rs])
                else:
                    xs = [r[k] for r in rs if r[k] is not None]
                    v = med(xs) if xs else None
                vals[(label, e)] = v
                row += f" {fmt(v, d)} |"
            if len(engines) == 2:
                x, y = vals[(label, "postgres")], vals[(label, "sqlite")]
                row += f" {fmt(x / y, 2) if x is not None and y else 'n/a'} |"
            p(row)
        p("")
        p("Renewals: one every lease/3 of training (the default 30 s lease: one per 10 s), so a job pays "
          "renewal ms × its training seconds / 10; the run uses a 2 s lease and one long job (cancelled after a few seconds) "
          "to have some to time, median of those "
          f"({', '.join(e + ': ' + str(sum(r['renewals'] for r in db if r['engine'] == e)) + ' renewals' for e in engines)}). "
          "Claim, final write and records: median over a run's tiny jobs but the first, then over rounds.")
        p("")

    pr = load("predict_*.json")
    if pr:
        models = sorted({r["model"] for r in pr}, key=lambda m: (m != "tiny", m))
        setups = [s for s in ("direct-1", "nginx-1", "nginx-2") if any(r["setup"] == s for r in pr)]
        rounds = max(r["round"] for r in pr)
        c = pr[0]
        p(f"## 3. Predict, texts/s, {c['clients']} concurrent clients of `finetuned bench-serve`, batch {c['batch']}, "
          f"{c['seconds']:.0f} s a run (median of {rounds} round(s), setups alternating)")
        p("")
        p("| model | " + " | ".join(setups) + " | 2 replicas / 1 (nginx) | p50 ms " + " / ".join(setups)
          + " | nginx-2: replica 1's share | errors |")
        p("|" + " --- |" * (len(setups) + 5))
        for m in models:
            row = f"| {m} |"
            v = {}
            for s in setups:
                rs = [r for r in pr if r["model"] == m and r["setup"] == s]
                v[s] = med([r["texts_per_s"] for r in rs])
                row += f" {fmt(v[s])} |"
            ratio = v["nginx-2"] / v["nginx-1"] if "nginx-1" in v and "nginx-2" in v and v["nginx-1"] else None
            p50 = " / ".join(fmt(med([r["latency_ms"]["p50"] for r in pr if r["model"] == m and r["setup"] == s]), 1) for s in setups)
            errs = sum(n for r in pr if r["model"] == m for k, n in r["statuses"].items() if k != "200")
            shares = [r["per_replica"][0] / max(1, sum(r["per_replica"])) for r in pr
                      if r["model"] == m and r["setup"] == "nginx-2" and len(r.get("per_replica", [])) == 2]
            share = f"{100 * med(shares):.0f} %" if shares else "n/a"
            p(row + f" {fmt(ratio, 2)} | {p50} | {share} | {errs} |")
        p("")
        p("direct-1: the client on the API process's own port; nginx-1 / nginx-2: through nginx (round robin, "
          "keepalive) to 1 or 2 `--role api` processes on one data dir. Client, nginx and the API processes "
          "share the machine's cores.")
    text = "\n".join(lines) + "\n"
    open(os.path.join(a.out, "results.md"), "w").write(text)
    sys.stdout.write(text)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("model"); s.add_argument("dir"); s.set_defaults(f=cmd_model)
    s = sub.add_parser("toy"); s.add_argument("n", type=int); s.set_defaults(f=cmd_toy)
    for name, f in [("jobs", cmd_jobs), ("train", cmd_train)]:
        s = sub.add_parser(name)
        s.add_argument("--url", required=True); s.add_argument("--base", default="tiny")
        s.add_argument("--rows", type=int, default=48); s.add_argument("--epochs", type=int, default=2)
        s.add_argument("--batch", type=int, default=16); s.add_argument("--timeout", type=float, default=600)
        if name == "jobs":
            s.add_argument("--n", type=int, required=True); s.add_argument("--engine", required=True)
            s.add_argument("--workers", type=int, required=True); s.add_argument("--round", type=int, default=1)
            s.add_argument("--pids", default=""); s.add_argument("--logs", default="")
            s.add_argument("--out", required=True)
        else:
            s.add_argument("--name", required=True)
        s.set_defaults(f=f)
    s = sub.add_parser("long"); s.add_argument("--url", required=True); s.add_argument("--base", default="tiny")
    s.add_argument("--seconds", type=float, default=8); s.set_defaults(f=cmd_long)
    s = sub.add_parser("dbcost")
    s.add_argument("--log", required=True); s.add_argument("--engine", required=True)
    s.add_argument("--round", type=int, default=1); s.add_argument("--out", required=True)
    s.set_defaults(f=cmd_dbcost)
    s = sub.add_parser("report"); s.add_argument("out"); s.set_defaults(f=cmd_report)
    a = ap.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
