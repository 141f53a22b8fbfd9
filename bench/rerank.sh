#!/usr/bin/env bash
# A cross-encoder reranker trained here on MRPC's pairs (relevance 1 for a paraphrase), then
# served: our /rerank of 32 texts against one query against sentence-transformers'
# CrossEncoder.predict on the same pairs (bench/rerank.py: p50, texts/s, score agreement).
# Usage: bench/rerank.sh OUT_DIR   (from the repo root, after cargo build --release; needs
# ~/refbench-venv with sentence-transformers; run it on an otherwise idle machine; BIN=… names
# another build).
set -euo pipefail
OUT=$(mkdir -p "${1:?out dir}" && cd "$1" && pwd)
PY=${PY:-$HOME/refbench-venv/bin/python}
BIN=${BIN:-target/release/finetuned}
. "$(dirname "$0")/idle.sh"
D=$OUT/mrpc-rerank
mkdir -p "$D"
for s in train validation test; do
  python3 -c '
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(json.dumps({"query": r["text"], "document": r["text_pair"], "label": 1 if r["label"] == "equivalent" else 0}))
' ../shared/datasets/mrpc/$s.jsonl > "$D/$s.jsonl"
done
[ -f "$OUT/train.json" ] || $BIN train --model ../shared/models/all-minilm-l6-v2 --data "$D" --task rerank --pooling cls \
  --epochs 1 --batch-size 32 --lr 5e-5 --max-len 128 --group-by-length --threads 2 --save "$OUT/models/reranker" \
  --out "$OUT/train.json" > "$OUT/train.log" 2>&1
mkdir -p "$OUT/data"
idle; $BIN serve --addr 127.0.0.1:8197 --data-dir "$OUT/data" --models-dir "$OUT/models" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:8197/healthz >/dev/null && break; sleep 0.1; done
idle; $PY bench/rerank.py http://127.0.0.1:8197 reranker "$OUT/models/reranker" ../shared/datasets/mrpc/test.jsonl "$OUT/rerank.json" \
  | tee "$OUT/summary.txt"
