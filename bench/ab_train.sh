#!/usr/bin/env bash
# Training speed of two builds of ours, alternated round by round on the same data and seed
# (`finetuned train`, SST-2, the settings of bench/speed.sh with --group-by-length).
# Usage: bench/ab_train.sh OLD_BIN NEW_BIN OUT_DIR [MAX_TRAIN] [ROUNDS]   (from the repo root)
set -euo pipefail
OLD=${1:?old binary}; NEW=${2:?new binary}; OUT=${3:?out dir}; N=${4:-4000}; ROUNDS=${5:-3}
mkdir -p "$OUT"
COMMON="--model ../shared/models/all-minilm-l6-v2 --data ../shared/datasets/sst2 --epochs 1 --batch-size 32 --lr 5e-5 --max-len 64 --seed 42 --max-train $N --threads 2 --pooling cls --group-by-length"
for r in $(seq "$ROUNDS"); do
  # The order flips each round, so neither build always runs on a warmer machine.
  if (( r % 2 )); then order="old new"; else order="new old"; fi
  for side in $order; do
    bin=$OLD; [[ $side == new ]] && bin=$NEW
    "$bin" train $COMMON --out "$OUT/$side-$r.json" > "$OUT/$side-$r.log" 2>&1
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
rows = {s: [json.load(open(f"{d}/{s}-{r}.json")) for r in range(1, rounds + 1)] for s in ("old", "new")}
med = {s: statistics.median(x["train_examples_per_s"] for x in rows[s]) for s in rows}
print("| build | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | median ex/s | test accuracy | peak RSS MiB |")
print("| --- |" + " --- |" * (rounds + 3))
for s in ("old", "new"):
    rates = " | ".join(f"{x['train_examples_per_s']:.1f}" for x in rows[s])
    accs = ", ".join(f"{x['test_accuracy']:.4f}" for x in rows[s])
    rss = ", ".join(f"{x['peak_rss_mib']:.0f}" for x in rows[s])
    print(f"| {s} | {rates} | {med[s]:.1f} | {accs} | {rss} |")
print(f"\nnew / old on the medians: {med['new'] / med['old']:.3f}; per round: "
      + ", ".join(f"{n['train_examples_per_s'] / o['train_examples_per_s']:.3f}" for n, o in zip(rows['new'], rows['old'])))
PY
