#!/usr/bin/env bash
# Issue 30's learning-rate defaults per method: full, lora and head on sst2, trec6 and banking77,
# and head over a sweep of rates, each with `finetuned train`, one run after the other.
#
#   bench/method_defaults.sh BINARY OUT_DIR        (ONLY=sst2,trec6 to run some sets)
#
# Runs that name no rate (`default`) take the method's own default; the sweep's runs name theirs.
# A run whose report exists is not run again. Prints the table of test accuracies.
set -euo pipefail
BIN=$1 OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
D=$HERE/../../shared/datasets M=$HERE/../../shared/models/all-minilm-l6-v2
mkdir -p "$OUT"
COMMON="--model $M --batch-size 32 --max-len 64 --seed 42 --threads 2 --group-by-length"
SETS=("sst2|--data $D/sst2 --max-train 4000 --epochs 1" "trec6|--data $D/trec6 --epochs 3" "banking77|--data $D/banking77 --epochs 3")
# tag  method  rate ("default": none given)
RUNS=("full full default" "lora lora default" "head head default"
  "head-1e-4 head 1e-4" "head-3e-4 head 3e-4" "head-1e-3 head 1e-3" "head-3e-3 head 3e-3" "head-1e-2 head 1e-2")
for s in "${SETS[@]}"; do
  IFS='|' read -r name data <<<"$s"
  [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$name,"* ]] || continue
  for r in "${RUNS[@]}"; do
    read -r tag method rate <<<"$r"
    out="$OUT/$name-$tag.json"
    [ -s "$out" ] && continue
    lr=(); [ "$rate" = default ] || lr=(--lr "$rate")
    echo "$(date +%T) $name $tag" >&2
    "$BIN" train $COMMON $data --method "$method" "${lr[@]}" --out "$out" >"$OUT/$name-$tag.log" 2>&1
  done
done
python3 - "$OUT" <<'PY'
import json, sys, os, glob
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    name, tag = os.path.basename(f)[:-5].split("-", 1)
    r = json.load(open(f))
    rows.setdefault(name, {})[tag] = (r["test_accuracy"], r["args"]["lr"])
for name, runs in rows.items():
    print(f"## {name}")
    print("| run | lr | test accuracy |")
    print("| --- | --- | --- |")
    for tag, (acc, lr) in sorted(runs.items()):
        print(f"| {tag} | {lr:g} | {acc:.4f} |")
PY
