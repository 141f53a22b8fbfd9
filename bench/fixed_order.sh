#!/usr/bin/env bash
# Our trainer against PyTorch's, step by step: both start from one classifier that transformers
# initialised and saved (the same head), run the same batches in the same order (ours, printed by
# examples/batch_order.rs) with the same schedule, clipping and weight decay, and dropout off on
# both sides (a copy of all-MiniLM-L6-v2 whose config sets it to 0). Prints the largest per-step
# loss difference and each epoch's mean loss on both sides.
# Usage: bench/fixed_order.sh OUT_DIR [DATASET]   (from the repo root, after cargo build --release
# --bin finetuned --example batch_order; DATASET: mrpc by default; THREADS=1 by default, so the
# two sides may run side by side: no speed is read here).
set -euo pipefail
OUT=$(mkdir -p "${1:?out dir}" && cd "$1" && pwd)
D=${2:-mrpc}
PY=${PY:-$HOME/refbench-venv/bin/python}
T=${THREADS:-1}
M=../shared/models/all-minilm-l6-v2
DATA=../shared/datasets/$D
$PY - "$M" "$DATA" "$OUT" <<'PY'
import json, os, shutil, sys
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, set_seed
base, data, out = sys.argv[1:]
nodrop = os.path.join(out, "nodrop")
os.makedirs(nodrop, exist_ok=True)
for f in os.listdir(base):
    if os.path.isfile(os.path.join(base, f)):
        shutil.copy(os.path.join(base, f), nodrop)
cfg = json.load(open(os.path.join(nodrop, "config.json")))
cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
json.dump(cfg, open(os.path.join(nodrop, "config.json"), "w"), indent=2)
labels = sorted({str(json.loads(l)["label"]) for l in open(os.path.join(data, "train.jsonl")) if l.strip()})
set_seed(42)
m = AutoModelForSequenceClassification.from_pretrained(
    nodrop, num_labels=len(labels), label2id={n: i for i, n in enumerate(labels)}, id2label=dict(enumerate(labels)))
m.save_pretrained(os.path.join(out, "init"))
AutoTokenizer.from_pretrained(nodrop).save_pretrained(os.path.join(out, "init"))
PY
COMMON="--epochs 3 --batch-size 32 --lr 5e-5 --max-len 128 --seed 42 --threads $T --group-by-length --log-every 1"
target/release/finetuned train --model "$OUT/init" --data $DATA $COMMON --pooling cls --out "$OUT/ours.json" > "$OUT/ours.log" 2>&1 &
$PY bench/fixed_order_ref.py --model "$OUT/init" --data $DATA $COMMON --order-bin target/release/examples/batch_order \
  --out "$OUT/ref.json" > "$OUT/ref.log" 2>&1
wait
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
d = sys.argv[1]
ours = {e["step"]: e["loss"] for e in json.load(open(f"{d}/ours.json"))["loss_log"]}
ref = {e["step"]: e["loss"] for e in json.load(open(f"{d}/ref.json"))["loss_log"]}
diff, at = max((abs(ours[s] - ref[s]), s) for s in ref)
print(f"{len(ref)} steps; largest per-step loss difference {diff:.2e} (step {at})")
n = len(ref) // 3
for e in range(3):
    steps = range(e * n + 1, (e + 1) * n + 1)
    print(f"epoch {e + 1}: mean loss ours {sum(ours[s] for s in steps) / n:.5f}, PyTorch {sum(ref[s] for s in steps) / n:.5f}")
PY
