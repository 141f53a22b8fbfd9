#!/usr/bin/env bash
# Predict latency while a fine-tuning job trains on the same machine (issue 4, item 4).
# Usage: bench/serve_while_training.sh CLASSIFIER_DIR OUT_DIR [TRAIN_THREADS PREDICT_THREADS]
# (from the repo root, after cargo build --release, on an otherwise idle machine).
# One client sends one text at a time for 12 s with no job running, then again while an SST-2
# job (8,000 rows) trains; the job is cancelled at the end.
set -euo pipefail
MODEL=$(cd "$1" && pwd); OUT=${2:?out dir}; TT=${3:-1}; PT=${4:-1}
mkdir -p "$OUT/models" "$OUT/data"
ln -sfn "$MODEL" "$OUT/models/bench-model"
ln -sfn "$(cd ../shared/models/all-minilm-l6-v2 && pwd)" "$OUT/models/all-minilm-l6-v2"
awk "NR <= 2048" ../shared/datasets/sst2/test.jsonl ../shared/datasets/sst2/validation.jsonl > "$OUT/pool.jsonl"
PORT=8198; URL=http://127.0.0.1:$PORT
target/release/finetuned serve --addr 127.0.0.1:$PORT --data-dir "$OUT/data" --models-dir "$OUT/models" \
  --train-threads "$TT" --predict-threads "$PT" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf $URL/healthz >/dev/null && break; sleep 0.1; done
B="target/release/finetuned bench-serve --url $URL --model bench-model --texts $OUT/pool.jsonl --clients 1 --batch 1 --duration 12"
$B --out "$OUT/idle.json" > /dev/null
DS=$(head -n 8000 ../shared/datasets/sst2/train.jsonl | curl -sf -X POST $URL/v1/datasets -H 'content-type: application/x-ndjson' --data-binary @- | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
JOB=$(curl -sf -X POST $URL/v1/jobs -H 'content-type: application/json' \
  -d "{\"training_dataset\": \"$DS\", \"base_model\": \"all-minilm-l6-v2\", \"hyperparameters\": {\"epochs\": 1, \"batch_size\": 32, \"learning_rate\": 5e-5, \"max_seq_len\": 64, \"pooling\": \"cls\"}}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
# Wait until the job is past its first steps (training, not tokenising).
for _ in $(seq 300); do
  curl -sf $URL/v1/jobs/$JOB | python3 -c 'import json,sys; j=json.load(sys.stdin); sys.exit(0 if j["status"]=="running" and (j.get("progress") or {}).get("step",0)>=2 else 1)' && break
  sleep 0.5
done
$B --out "$OUT/training.json" > /dev/null
curl -sf $URL/v1/jobs/$JOB | python3 -c 'import json,sys; j=json.load(sys.stdin); print("job", j["status"], j.get("progress"))' | tee "$OUT/job.txt"
curl -sf -X POST $URL/v1/jobs/$JOB/cancel > /dev/null
python3 - "$OUT" "$TT" "$PT" <<'PY'
import json, sys
d, tt, pt = sys.argv[1:]
for n in ["idle", "training"]:
    o = json.load(open(f"{d}/{n}.json")); l = o["latency_ms"]
    print(f"train-threads {tt} predict-threads {pt}, {n:>8}: {o['texts_per_s']:.1f} texts/s, p50 {l['p50']:.2f} ms, p95 {l['p95']:.2f}, p99 {l['p99']:.2f}, statuses {o['statuses']}")
PY
