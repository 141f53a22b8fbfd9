#!/usr/bin/env bash
# LoRA against full fine-tuning (ours) and against peft (bench/lora_ref.py), issue 20's accuracy
# goal: same data, epochs and seed in one run, the sides alternating per data set.
#
#   bench/lora_accuracy.sh BINARY OUT_DIR [PYTHON]    (ONLY=sst2,banking77 to run some sets)
#
# For each data set: ours full and ours LoRA with the default pooling (auto), then ours LoRA and
# peft with cls pooling (the pooler frozen, as peft's SEQ_CLS task leaves it). Prints a table.
set -euo pipefail
BIN=$1 OUT=$2 PY=${3:-$HOME/refbench-venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
D=$HERE/../../shared/datasets M=$HERE/../../shared/models/all-minilm-l6-v2
mkdir -p "$OUT"
COMMON="--model $M --batch-size 32 --max-len 64 --seed 42 --threads 2"
# name  data-args  full-lr  lora-lr
SETS=(
  "sst2|--data $D/sst2 --max-train 8000 --epochs 1|5e-5|2e-3"
  "trec6|--data $D/trec6 --epochs 5 --group-by-length|5e-5|5e-4"
  "banking77|--data $D/banking77 --epochs 5 --group-by-length|1e-4|1e-3"
)
for s in "${SETS[@]}"; do
  IFS='|' read -r name data full_lr lora_lr <<<"$s"
  [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$name,"* ]] || continue
  run() { local tag=$1; shift; [ -s "$OUT/$name-$tag.json" ] || "$@" --out "$OUT/$name-$tag.json" >"$OUT/$name-$tag.log" 2>&1; }
  run full "$BIN" train $COMMON $data --lr "$full_lr" --method full
  run lora "$BIN" train $COMMON $data --lr "$lora_lr" --method lora --lora-r 8
  run lora-cls "$BIN" train $COMMON $data --lr "$lora_lr" --method lora --lora-r 8 --pooling cls
  run peft "$PY" "$HERE/lora_ref.py" --lora-r 8 $COMMON $data --lr "$lora_lr"
done
"$PY" - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
acc = lambda n: json.load(open(os.path.join(out, n + ".json")))
print("| data | full (auto) | LoRA r=8 (auto) | LoRA − full | LoRA r=8 (cls) | peft LoRA r=8 (cls) | ours − peft |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in ["sst2", "trec6", "banking77"]:
    try:
        f, l, lc, p = (acc(f"{name}-{t}")["test_accuracy"] for t in ["full", "lora", "lora-cls", "peft"])
    except FileNotFoundError:
        continue
    print(f"| {name} | {f:.4f} | {l:.4f} | {100*(l-f):+.2f} | {lc:.4f} | {p:.4f} | {100*(lc-p):+.2f} |")
PY
