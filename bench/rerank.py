"""Reranking speed and agreement: our `POST /v1/models/{id}/rerank` against sentence-transformers'
`CrossEncoder.predict` on the same (query, text) pairs, alternated in rounds in one process.

  rerank.py URL MODEL_ID MODEL_DIR PAIRS_JSONL OUT [--texts 32] [--rounds 5] [--per-round 20] [--threads 2]

PAIRS_JSONL: rows with `text` and `text_pair`; the query is the first row's text, the texts the
next rows' `text_pair`s. Prints and writes p50 latency and texts/s of each side and their ratio,
and the largest score difference between the two (the sigmoid of the logit on both sides).
"""
import argparse
import json
import statistics
import time
import urllib.request

import torch
from sentence_transformers import CrossEncoder


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    for a in ("url", "model_id", "model_dir", "pairs", "out"):
        ap.add_argument(a)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [json.loads(l) for l in open(args.pairs)]
    query = rows[0]["text"]
    texts = [r["text_pair"] for r in rows[1 : 1 + args.texts]]
    ce = CrossEncoder(args.model_dir, device="cpu")
    route = f"{args.url}/v1/models/{args.model_id}/rerank"

    def ours():
        return post(route, {"query": query, "texts": texts})["results"]

    def theirs():
        return ce.predict([(query, t) for t in texts], batch_size=len(texts), convert_to_numpy=True)

    ours(), theirs()  # warm both
    times = {"ours": [], "crossencoder": []}
    for _ in range(args.rounds):
        for name, f in (("ours", ours), ("crossencoder", theirs)):
            for _ in range(args.per_round):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    got = {r["index"]: r["score"] for r in ours()}
    ref = theirs()
    max_diff = max(abs(got[i] - float(ref[i])) for i in range(len(texts)))
    report = {"texts": len(texts), "requests_per_side": len(times["ours"]), "max_abs_score_diff": max_diff}
    for name, ts in times.items():
        p50 = statistics.median(ts)
        report[name] = {"p50_ms": p50 * 1e3, "texts_per_s": len(texts) * len(ts) / sum(ts)}
    report["ratio_texts_per_s"] = report["ours"]["texts_per_s"] / report["crossencoder"]["texts_per_s"]
    report["ratio_p50"] = report["crossencoder"]["p50_ms"] / report["ours"]["p50_ms"]
    json.dump(report, open(args.out, "w"), indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
