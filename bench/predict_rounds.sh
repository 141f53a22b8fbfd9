#!/usr/bin/env bash
# Predict at batch 32, ours against predict_ref.py, in alternated rounds on the classifiers that
# bench/architectures.sh fine-tuned with the reference (OUT_DIR/ARCH/ref_model) and its text
# pool (OUT_DIR/pool.jsonl): each round runs, per model, predict_ref.py's end-to-end pass over
# 1,024 texts, then our server under `finetuned bench-serve --clients 1 --batch 32` for 15 s.
# Prints each round and the medians with their ratio.
# Usage: bench/predict_rounds.sh OUT_DIR ROUNDS [ARCH ...]   (from the repo root, after cargo
# build --release and bench/architectures.sh OUT_DIR; on an otherwise idle machine).
set -euo pipefail
OUT=$(cd "${1:?out dir}" && pwd); ROUNDS=${2:?rounds}; shift 2
ARCHS=${*:-roberta-base xlm-roberta-base distilbert-base-uncased electra-base-discriminator}
PY=${PY:-$HOME/refbench-venv/bin/python}
BIN=target/release/finetuned
. "$(dirname "$0")/idle.sh"
for r in $(seq "$ROUNDS"); do
  for a in $ARCHS; do
    R=$OUT/$a; P=$OUT/predict-rounds/$a/$r
    mkdir -p "$P/serve/models" "$P/serve/data"
    idle; $PY ../shared/bench/reference/predict_ref.py --model "$R/ref_model" --data ../shared/datasets/sst2 --n-texts 1024 \
      --n-requests 20 --threads 2 --out "$P/predict_ref.json" > "$P/predict_ref.log" 2>&1
    ln -sfn "$R/ref_model" "$P/serve/models/bench-model"
    idle; $BIN serve --addr 127.0.0.1:8197 --data-dir "$P/serve/data" --models-dir "$P/serve/models" > "$P/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 300); do curl -sf http://127.0.0.1:8197/healthz >/dev/null && break; sleep 0.1; done
    $BIN bench-serve --url http://127.0.0.1:8197 --model bench-model --texts "$OUT/pool.jsonl" --clients 1 --batch 32 \
      --duration 15 --out "$P/ours_b32.json" > /dev/null
    grep VmHWM /proc/$SERVER/status > "$P/server_rss.txt"
    kill $SERVER; wait $SERVER 2>/dev/null || true
  done
done
python3 - "$OUT/predict-rounds" "$ARCHS" <<'PY'
import json, statistics, sys, os
d, archs = sys.argv[1], sys.argv[2].split()
print(f"{'model':<28}{'reference rounds':>26}{'ours rounds':>26}{'median ratio':>14}")
for a in archs:
    rounds = sorted(os.listdir(f"{d}/{a}"), key=int)
    ref = [json.load(open(f"{d}/{a}/{r}/predict_ref.json"))["throughput"]["e2e_seq_per_s"] for r in rounds]
    ours = [json.load(open(f"{d}/{a}/{r}/ours_b32.json"))["texts_per_s"] for r in rounds]
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
    print(f"{a:<28}{fmt(ref):>26}{fmt(ours):>26}{statistics.median(ours) / statistics.median(ref):>14.2f}")
PY
