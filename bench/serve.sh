#!/usr/bin/env bash
# Serving speed, ours against predict_ref.py, on the same classifier (the reference's own
# fine-tuned SST-2 model, imported through the models dir) and the same texts.
# Usage: bench/serve.sh MODEL_DIR OUT_DIR   (from the repo root, after cargo build --release;
# run it on an otherwise idle machine). Single texts are the ones predict_ref.py times
# (bench/short_texts.py). FINETUNED_PREDICT_DTYPE=bf16 in the environment serves in bf16.
set -euo pipefail
MODEL=$(cd "$1" && pwd); OUT=${2:?out dir}
mkdir -p "$OUT/models" "$OUT/data"
ln -sfn "$MODEL" "$OUT/models/bench-model"
PY=${PY:-$HOME/refbench-venv/bin/python}
awk "NR <= 2048" ../shared/datasets/sst2/test.jsonl ../shared/datasets/sst2/validation.jsonl > "$OUT/pool.jsonl"
$PY bench/short_texts.py --model "$MODEL" --data ../shared/datasets/sst2 --out "$OUT/short.jsonl" > /dev/null
$PY ../shared/bench/reference/predict_ref.py --model "$MODEL" --data ../shared/datasets/sst2 --threads 2 --out "$OUT/predict_ref.json" > "$OUT/predict_ref.log" 2>&1
target/release/finetuned serve --addr 127.0.0.1:8199 --data-dir "$OUT/data" --models-dir "$OUT/models" \
  --max-concurrent-predicts 256 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:8199/healthz >/dev/null && break; sleep 0.1; done
B="target/release/finetuned bench-serve --url http://127.0.0.1:8199 --model bench-model --texts $OUT/pool.jsonl"
$B --clients 1 --batch 32 --duration 15 --out "$OUT/ours_c1_b32.json" > /dev/null
B1="target/release/finetuned bench-serve --url http://127.0.0.1:8199 --model bench-model --texts $OUT/short.jsonl"
$B1 --clients 1 --batch 1 --duration 10 --out "$OUT/ours_c1_b1.json" > /dev/null
$B --clients 1 --batch 1 --duration 10 --out "$OUT/ours_c1_b1_pool.json" > /dev/null
$B --clients 32 --batch 1 --duration 15 --out "$OUT/ours_c32_b1.json" > /dev/null
$B --clients 512 --batch 1 --duration 15 --timeout 30 --out "$OUT/ours_c512_b1.json" > /dev/null
# 32 single-text clients against one client's batches of 32, alternated (the host's speed
# drifts by more than the difference between the two): ROUNDS rounds, default 3.
for r in $(seq "${ROUNDS:-3}"); do
  $B --clients 1 --batch 32 --duration 10 --out "$OUT/alt_b32_$r.json" > /dev/null
  $B --clients 32 --batch 1 --duration 10 --out "$OUT/alt_c32_$r.json" > /dev/null
done
echo "server peak RSS: $(grep VmHWM /proc/$SERVER/status)" | tee "$OUT/server_rss.txt"
python3 - "$OUT" <<'PY'
import json, sys
d = sys.argv[1]
r = json.load(open(f"{d}/predict_ref.json"))
print("predict_ref: batch-32 e2e", round(r["throughput"]["e2e_seq_per_s"], 1), "texts/s; single p50",
      round(r["latency_batch1"]["p50_ms"], 2), "ms; peak RSS", round(r["peak_rss_mib"]), "MiB")
for n in ["c1_b32", "c1_b1", "c1_b1_pool", "c32_b1", "c512_b1"]:
    o = json.load(open(f"{d}/ours_{n}.json"))
    l = o["latency_ms"]
    print(f"ours {n}: {o['texts_per_s']:.1f} texts/s, p50 {l['p50']:.2f} ms, p95 {l['p95']:.2f}, p99 {l['p99']:.2f}, statuses {o['statuses']}")
import glob, statistics
rate = lambda m: [json.load(open(f))["texts_per_s"] for f in sorted(glob.glob(f"{d}/alt_{m}_*.json"))]
b, c = rate("b32"), rate("c32")
print("alternated, batch 32:", [round(x, 1) for x in b], "32 clients:", [round(x, 1) for x in c],
      "ratio of medians", round(statistics.median(c) / statistics.median(b), 3),
      "per round", [round(y / x, 3) for x, y in zip(b, c)])
PY
