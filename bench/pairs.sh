#!/usr/bin/env bash
# Sentence pairs and regression, ours against the PyTorch reference on all-MiniLM-L6-v2 with the
# same flags, run alternately: STS-B (regression: test Pearson, Spearman, MSE) and MRPC
# (paraphrase classification: test accuracy), 3 epochs, lr 5e-5, batch 32, length 128.
# Usage: bench/pairs.sh OUT_DIR [DATASET ...]   (from the repo root, after cargo build --release;
# needs ~/refbench-venv with scipy; run it on an otherwise idle machine). DATASET: stsb, mrpc.
set -euo pipefail
OUT=$(mkdir -p "${1:?out dir}" && cd "$1" && pwd); shift
SETS=${*:-stsb mrpc}
PY=${PY:-$HOME/refbench-venv/bin/python}
REF=../shared/bench/reference
BIN=target/release/finetuned
M=../shared/models/all-minilm-l6-v2
COMMON="--model $M --epochs 3 --batch-size 32 --lr 5e-5 --max-len 128 --seed 42 --threads 2 --group-by-length"
. "$(dirname "$0")/idle.sh"
for d in $SETS; do
  mkdir -p "$OUT/$d"
  idle; $PY $REF/finetune_ref.py $COMMON --data ../shared/datasets/$d --out "$OUT/$d/ref.json" > "$OUT/$d/ref.log" 2>&1
  # The reference's AutoModelForSequenceClassification reads BERT's pooler: `cls` pooling here too.
  idle; $BIN train $COMMON --data ../shared/datasets/$d --pooling cls --out "$OUT/$d/ours.json" > "$OUT/$d/ours.log" 2>&1
done
python3 - "$OUT" $SETS <<'PY' | tee "$OUT/summary.txt"
import json, sys
d, sets = sys.argv[1], sys.argv[2:]
load = lambda p: json.load(open(p))
print(f"{'dataset':<8}{'side':<11}{'train ex/s':>11}{'ratio':>7}{'test metrics':>50}{'peak RSS MiB':>14}")
for s in sets:
    ref, ours = load(f"{d}/{s}/ref.json"), load(f"{d}/{s}/ours.json")
    for name, r in (("reference", ref), ("ours", ours)):
        if s == "stsb":
            m = f"pearson {r['test_pearson']:.4f} spearman {r['test_spearman']:.4f} mse {r['test_mse']:.4f}"
        else:
            m = f"accuracy {r['test_accuracy']:.4f} macro-F1 {r['test_macro_f1']:.4f}"
        ratio = r["train_examples_per_s"] / ref["train_examples_per_s"]
        print(f"{s:<8}{name:<11}{r['train_examples_per_s']:>11.2f}{ratio:>7.2f}{m:>50}{r['peak_rss_mib']:>14.0f}")
PY
