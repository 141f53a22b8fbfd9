#!/usr/bin/env bash
# "epochs": "auto" against fixed epoch counts (issue 21's goal: auto reaches the best of 1, 2, 3
# and 5 epochs minus half a point), and the calibration each run measures on the test set.
#
#   bench/auto_epochs.sh BINARY OUT_DIR    (ONLY=trec6,sst2 to run some sets; EPOCHS="1 2 3 5 auto")
#
# Same data, learning rate and seed on every run of a set; full fine-tuning, pooling auto. A run
# whose report exists in OUT_DIR is not run again. Prints a table.
set -euo pipefail
BIN=$1 OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
D=$HERE/../../shared/datasets M=$HERE/../../shared/models/all-minilm-l6-v2
mkdir -p "$OUT"
COMMON="--model $M --batch-size 32 --max-len 64 --seed 42 --threads 2 --group-by-length"
# name  data-args  lr
SETS=(
  "trec6|--data $D/trec6|5e-5"
  "sst2|--data $D/sst2 --max-train 8000|5e-5"
  "banking77|--data $D/banking77|1e-4"
)
for s in "${SETS[@]}"; do
  IFS='|' read -r name data lr <<<"$s"
  [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$name,"* ]] || continue
  for e in ${EPOCHS:-1 2 3 5 auto}; do
    f=$OUT/$name-e$e
    [ -s "$f.json" ] || "$BIN" train $COMMON $data --lr "$lr" --epochs "$e" --out "$f.json" >"$f.log" 2>&1
  done
done
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name, e):
    p = os.path.join(out, f"{name}-e{e}.json")
    return json.load(open(p)) if os.path.exists(p) else None
print("| data | 1 | 2 | 3 | 5 | best fixed | auto | auto − best | auto ran (cap) | why it stopped |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ["trec6", "sst2", "banking77"]:
    runs = {e: load(name, e) for e in ["1", "2", "3", "5", "auto"]}
    if not any(runs.values()):
        continue
    acc = {e: r["test_accuracy"] for e, r in runs.items() if r}
    fixed = [acc[e] for e in ["1", "2", "3", "5"] if e in acc]
    best = max(fixed) if fixed else None
    cell = lambda e: f"{acc[e]:.4f}" if e in acc else "–"
    a = runs["auto"]
    delta = f"{100 * (acc['auto'] - best):+.2f}" if a and best is not None else "–"
    ran = f"{a['stopped']['epochs_run']} ({a['stopped']['max_epochs']})" if a else "–"
    why = a["stopped"]["reason"] if a else "–"
    print(f"| {name} | {cell('1')} | {cell('2')} | {cell('3')} | {cell('5')} | {best if best is None else f'{best:.4f}'} | {cell('auto')} | {delta} | {ran} | {why} |")
print()
print("| data | epochs | temperature | test ECE uncalibrated | test ECE calibrated |")
print("| --- | --- | --- | --- | --- |")
for name in ["trec6", "sst2", "banking77"]:
    for e in ["1", "2", "3", "5", "auto"]:
        r = load(name, e)
        if r and r.get("calibration"):
            c = r["calibration"]
            print(f"| {name} | {e} | {c['temperature']:.3f} | {c['test_ece_before']:.4f} | {c['test_ece_after']:.4f} |")
PY
