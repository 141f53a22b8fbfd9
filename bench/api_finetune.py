#!/usr/bin/env python3
"""Fine-tune through the running finetuned server and score the test set through predict.

Standard library only. Uploads the first --max-train rows of DATA/train.jsonl and
DATA/validation.jsonl, starts a job with the given settings, polls it, then predicts
DATA/test.jsonl in batches and prints a JSON report (accuracy, macro-F1, training
throughput from the job's progress) comparable with finetune_ref.py's.

  python3 bench/api_finetune.py --url http://127.0.0.1:8080 --model all-minilm-l6-v2 \
      --data ../shared/datasets/sst2 --max-train 8000 --epochs 1 --batch-size 32 \
      --lr 5e-5 --max-len 64 --seed 42 --pooling cls --out out/api_sst2.json
"""
import argparse, json, time, urllib.request, urllib.error


def call(url, method="GET", body=None, ctype="application/json", key=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", ctype)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {url} -> {e.code}: {e.read().decode()}")


def read_jsonl(path, limit=None):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit and len(rows) >= limit:
                    break
    return rows


def upload(u, rows, name, key=None):
    """Uploads rows as JSONL; returns the dataset id."""
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return call(f"{u}/v1/datasets?name={name}", "POST", body, "application/x-ndjson", key)["id"]


def run_job(u, body, key=None):
    """Starts a job and polls it until it ends; exits unless it succeeded. Adds `wall_seconds`."""
    job = call(f"{u}/v1/jobs", "POST", body, key=key)
    t0 = time.time()
    while job["status"] in ("queued", "running"):
        time.sleep(2)
        job = call(f"{u}/v1/jobs/{job['id']}", key=key)
    if job["status"] != "succeeded":
        raise SystemExit(f"job ended {job['status']}: {job.get('error')}")
    job["wall_seconds"] = round(time.time() - t0, 1)
    return job


def score(u, model, rows, key=None):
    """Top-1 predictions for `rows` through predict, in batches of 64: (accuracy, macro-F1)."""
    preds = []
    for i in range(0, len(rows), 64):
        out = call(f"{u}/v1/models/{model}/predict", "POST", {"inputs": [r["text"] for r in rows[i:i + 64]], "top_k": 1}, key=key)
        preds += [p[0]["label"] for p in out["predictions"]]
    truth = [str(r["label"]) for r in rows]
    return sum(t == p for t, p in zip(truth, preds)) / len(truth), macro_f1(truth, preds)


def write_report(report, out):
    print(json.dumps(report, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)


def macro_f1(truth, pred):
    labels = sorted(set(truth) | set(pred))
    f1s = []
    for l in labels:
        tp = sum(1 for t, p in zip(truth, pred) if t == l and p == l)
        fp = sum(1 for t, p in zip(truth, pred) if t != l and p == l)
        fn = sum(1 for t, p in zip(truth, pred) if t == l and p != l)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--key")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-train", type=int)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--pooling", default="auto")
    ap.add_argument("--group-by-length", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    u = a.url.rstrip("/")

    train = upload(u, read_jsonl(f"{a.data}/train.jsonl", a.max_train), "train", a.key)
    val = upload(u, read_jsonl(f"{a.data}/validation.jsonl"), "validation", a.key)
    hp = {"epochs": a.epochs, "batch_size": a.batch_size, "learning_rate": a.lr, "max_seq_len": a.max_len,
          "seed": a.seed, "pooling": a.pooling, "group_by_length": a.group_by_length}
    job = run_job(u, {"base_model": a.model, "training_dataset": train, "validation_dataset": val, "hyperparameters": hp}, a.key)
    accuracy, f1 = score(u, job["model"], read_jsonl(f"{a.data}/test.jsonl"), a.key)
    events = call(f"{u}/v1/jobs/{job['id']}/events?limit=1000", key=a.key)["data"]
    report = {
        "job": job["id"], "model": job["model"], "hyperparameters": job["hyperparameters"],
        "test_accuracy": accuracy,
        "test_macro_f1": f1,
        "validation": job["metrics"], "job_wall_seconds": job["wall_seconds"],
        "train_examples_per_s_last": job["progress"]["examples_per_second"],
        "messages": [e["message"] for e in events if e["type"] == "message"],
    }
    write_report(report, a.out)


if __name__ == "__main__":
    main()
