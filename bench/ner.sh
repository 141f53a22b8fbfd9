#!/usr/bin/env bash
# Named entities on CoNLL-2003, ours against the PyTorch reference on all-MiniLM-L6-v2 with the
# same flags, run alternately: training (ner_ref.py against `finetuned train`: test entity F1,
# sentences/s), then predict of the model the reference saved, served by us (bench-serve: one
# client's p50, 32 clients' sentences/s) against transformers' pipeline (bench/ner_pipeline_ref.py).
# Usage: bench/ner.sh OUT_DIR [EPOCHS]   (from the repo root, after cargo build --release; needs
# ~/refbench-venv with seqeval; run it on an otherwise idle machine).
set -euo pipefail
OUT=$(mkdir -p "${1:?out dir}" && cd "$1" && pwd)
EPOCHS=${2:-3}
PY=${PY:-$HOME/refbench-venv/bin/python}
REF=../shared/bench/reference
BIN=target/release/finetuned
D=../shared/datasets/conll2003
COMMON="--model ../shared/models/all-minilm-l6-v2 --data $D --epochs $EPOCHS --batch-size 32 --lr 5e-5 --max-len 128 --seed 42 --threads 2 --group-by-length"
. "$(dirname "$0")/idle.sh"
# A run that stopped after training goes on with predict (delete the reports to train again).
[ -f "$OUT/ref.json" ] || { idle; $PY $REF/ner_ref.py $COMMON --save "$OUT/ref_model" --out "$OUT/ref.json" > "$OUT/ref.log" 2>&1; }
[ -f "$OUT/ours.json" ] || { idle; $BIN train $COMMON --task token_classification --out "$OUT/ours.json" > "$OUT/ours.log" 2>&1; }
python3 -c '
import json, sys
for l in open(sys.argv[1]).readlines()[:1024]:
    print(json.dumps({"text": " ".join(json.loads(l)["tokens"])}))
' $D/test.jsonl > "$OUT/sentences.jsonl"
mkdir -p "$OUT/serve/models" "$OUT/serve/data"
ln -sfn "$OUT/ref_model" "$OUT/serve/models/ner"
idle; $BIN serve --addr 127.0.0.1:8196 --data-dir "$OUT/serve/data" --models-dir "$OUT/serve/models" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:8196/healthz >/dev/null && break; sleep 0.1; done
$BIN bench-serve --url http://127.0.0.1:8196 --model ner --texts "$OUT/sentences.jsonl" --clients 1 --duration 15 --out "$OUT/ours_1client.json" > /dev/null
$BIN bench-serve --url http://127.0.0.1:8196 --model ner --texts "$OUT/sentences.jsonl" --clients 32 --duration 15 --out "$OUT/ours_32clients.json" > /dev/null
kill $SERVER; wait $SERVER 2>/dev/null || true
idle; $PY bench/ner_pipeline_ref.py "$OUT/ref_model" "$OUT/sentences.jsonl" "$OUT/pipeline.json" > /dev/null
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
d = sys.argv[1]
load = lambda p: json.load(open(f"{d}/{p}"))
ref, ours = load("ref.json"), load("ours.json")
print(f"{'side':<11}{'sentences/s':>12}{'ratio':>7}{'test F1':>9}{'precision':>10}{'recall':>8}{'peak RSS MiB':>14}")
for name, r in (("reference", ref), ("ours", ours)):
    print(f"{name:<11}{r['train_examples_per_s']:>12.2f}{r['train_examples_per_s'] / ref['train_examples_per_s']:>7.2f}"
          f"{r['test_f1']:>9.4f}{r['test_precision']:>10.4f}{r['test_recall']:>8.4f}{r['peak_rss_mib']:>14.0f}")
pipe, one, many = load("pipeline.json"), load("ours_1client.json"), load("ours_32clients.json")
print()
print(f"predict: one sentence p50 {one['latency_ms']['p50']:.2f} ms (pipeline {pipe['p50_ms_one_sentence']:.2f} ms, "
      f"{pipe['p50_ms_one_sentence'] / one['latency_ms']['p50']:.2f}x); 32 clients {many['texts_per_s']:.1f} sentences/s "
      f"(pipeline batch 32: {pipe['sentences_per_s_batch32']:.1f}, {many['texts_per_s'] / pipe['sentences_per_s_batch32']:.2f}x)")
PY
