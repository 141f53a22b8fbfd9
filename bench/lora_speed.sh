#!/usr/bin/env bash
# LoRA against full fine-tuning, training examples/s and peak RSS on the CPU (issue 20's goal:
# LoRA ≥ 1.3× full, lower peak RSS), for one or more builds, alternated run by run.
#
#   bench/lora_speed.sh OUT_DIR ROWS ROUNDS BINARY [BINARY ...]    (from the repo root)
#
# SST-2's first ROWS training rows, 1 epoch, batch 32, max-len 64, seed 42, LoRA r 8 on
# query/key/value (the defaults); validation and test cut to 32 rows, so the run is training.
# Each round runs every build's LoRA, then every build's full, the build order flipping each
# round. Prints each run, then per build the medians and LoRA / full.
set -euo pipefail
OUT=${1:?out dir}; ROWS=${2:?rows}; ROUNDS=${3:?rounds}; shift 3
[ $# -ge 1 ] || { echo "give at least one binary" >&2; exit 2; }
D=$(cd "$(dirname "$0")/../../shared" && pwd)
mkdir -p "$OUT/data"
ln -sf "$D/datasets/sst2/train.jsonl" "$OUT/data/train.jsonl"
for f in validation test; do head -32 "$D/datasets/sst2/$f.jsonl" > "$OUT/data/$f.jsonl"; done
BINS=("$@")
for r in $(seq "$ROUNDS"); do
  order=$(seq 0 $((${#BINS[@]} - 1)))
  (( r % 2 )) || order=$(echo "$order" | tac)
  for method in lora full; do
    for i in $order; do
      f="$OUT/b$i-$method-$r"
      "${BINS[$i]}" train --model "$D/models/all-minilm-l6-v2" --data "$OUT/data" --max-train "$ROWS" \
        --epochs 1 --max-len 64 --batch-size 32 --seed 42 --threads 2 --method "$method" --out "$f.json" > "$f.log" 2>&1
    done
  done
done
python3 - "$OUT" "$ROUNDS" "${BINS[@]}" <<'PY'
import json, statistics, sys
out, rounds, bins = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
load = lambda i, m, r: json.load(open(f"{out}/b{i}-{m}-{r}.json"))
print("| build | method | ex/s, by round | median | LoRA / full | peak RSS MiB |")
print("| --- | --- | --- | --- | --- | --- |")
for i, b in enumerate(bins):
    med = {}
    for m in ("lora", "full"):
        runs = [load(i, m, r) for r in range(1, rounds + 1)]
        rates = [x["train_examples_per_s"] for x in runs]
        med[m] = statistics.median(rates)
        rss = [x["peak_rss_mib"] for x in runs]
        ratio = f"**{med['lora'] / med['full']:.2f}×**" if m == "full" else ""
        print(f"| {b.rsplit('/', 1)[-1]} | {m} | {', '.join(f'{v:.1f}' for v in rates)} | {med[m]:.1f} | {ratio} | {min(rss):.0f}–{max(rss):.0f} |")
PY
