#!/usr/bin/env bash
# Training and inference speed, ours against the PyTorch reference, run alternately.
# Usage: bench/speed.sh OUT_DIR [MAX_TRAIN]   (from the repo root; needs ~/refbench-venv and a
# release build: cargo build --release). Run it on an otherwise idle machine.
set -euo pipefail
OUT=${1:?out dir}; N=${2:-8000}
mkdir -p "$OUT"
PY=${PY:-$HOME/refbench-venv/bin/python}
REF=../shared/bench/reference
BIN=target/release/finetuned
COMMON="--model ../shared/models/all-minilm-l6-v2 --data ../shared/datasets/sst2 --epochs 1 --batch-size 32 --lr 5e-5 --max-len 64 --seed 42 --max-train $N --threads 2"
. "$(dirname "$0")/idle.sh"
idle; $PY $REF/finetune_ref.py $COMMON --out "$OUT/ref_default.json" > "$OUT/ref_default.log" 2>&1
idle; $BIN train $COMMON --pooling cls --out "$OUT/ours_default.json" > "$OUT/ours_default.log" 2>&1
idle; $PY $REF/finetune_ref.py $COMMON --group-by-length --out "$OUT/ref_gbl.json" > "$OUT/ref_gbl.log" 2>&1
idle; $BIN train $COMMON --pooling cls --group-by-length --out "$OUT/ours_gbl.json" > "$OUT/ours_gbl.log" 2>&1
python3 - "$OUT" <<'PY'
import json, sys
d = sys.argv[1]
print(f"{'run':<14}{'train ex/s':>11}{'median interval':>17}{'cores busy':>11}{'test acc':>9}{'peak RSS MiB':>13}")
for name in ["ref_default", "ours_default", "ref_gbl", "ours_gbl"]:
    r = json.load(open(f"{d}/{name}.json"))
    t = r["timing"]
    print(f"{name:<14}{r['train_examples_per_s']:>11.1f}{r['train_examples_per_s_median_interval'] or 0:>17.1f}"
          f"{t['train_cpu_cores_busy']:>11.2f}{r['test_accuracy']:>9.4f}{r['peak_rss_mib']:>13.0f}")
PY
