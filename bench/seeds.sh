#!/usr/bin/env bash
# Quality across seeds, ours against the PyTorch reference with the same flags: each seed trains
# both sides (STS-B: test Spearman; MRPC: test accuracy), 3 epochs, lr 5e-5, batch 32, length 128,
# `cls` pooling on our side as the reference's AutoModelForSequenceClassification reads the pooler.
# Speed is not measured here (bench/pairs.sh does that), so the runs take one thread each at the
# lowest priority and may share the machine.
# Usage: bench/seeds.sh OUT_DIR [SEED ...]   (from the repo root, after cargo build --release;
# BIN=… names another binary; DATASETS="stsb mrpc" by default).
set -euo pipefail
OUT=$(mkdir -p "${1:?out dir}" && cd "$1" && pwd); shift
SEEDS=${*:-1 2 3}
PY=${PY:-$HOME/refbench-venv/bin/python}
BIN=${BIN:-target/release/finetuned}
REF=../shared/bench/reference
M=../shared/models/all-minilm-l6-v2
COMMON="--model $M --epochs 3 --batch-size 32 --lr 5e-5 --max-len 128 --threads 1 --group-by-length"
for seed in $SEEDS; do
  for d in ${DATASETS:-stsb mrpc}; do
    mkdir -p "$OUT/$d"
    [ -s "$OUT/$d/ref-$seed.json" ] || nice -n 19 $PY $REF/finetune_ref.py $COMMON --seed "$seed" \
      --data ../shared/datasets/$d --out "$OUT/$d/ref-$seed.json" > "$OUT/$d/ref-$seed.log" 2>&1
    [ -s "$OUT/$d/ours-$seed.json" ] || nice -n 19 $BIN train $COMMON --seed "$seed" --pooling cls \
      --data ../shared/datasets/$d --out "$OUT/$d/ours-$seed.json" > "$OUT/$d/ours-$seed.log" 2>&1
  done
done
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, statistics as st, sys
d = sys.argv[1]
key = {"stsb": "test_spearman", "mrpc": "test_accuracy"}
for s in sorted(os.listdir(d)):
    if s not in key: continue
    row = {}
    for side in ("ref", "ours"):
        vals = {p.split("-")[-1][:-5]: json.load(open(p))[key[s]] for p in glob.glob(f"{d}/{s}/{side}-*.json")}
        row[side] = vals
        m = st.mean(vals.values()); sd = st.stdev(vals.values()) if len(vals) > 1 else 0.0
        print(f"{s:<6}{side:<6}{key[s]:<15}" + " ".join(f"seed {k}: {v:.4f}" for k, v in sorted(vals.items()))
              + f"   mean {m:.4f} sd {sd:.4f}")
    common = sorted(set(row["ref"]) & set(row["ours"]))
    diff = st.mean(row["ours"][k] - row["ref"][k] for k in common)
    print(f"{s:<6}mean difference, ours - reference, over {len(common)} seeds: {diff:+.4f}")
PY
