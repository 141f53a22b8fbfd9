#!/usr/bin/env bash
# Speed of each architecture the Encoder seam runs, ours against the PyTorch reference, run
# alternately on random-init weights of real shapes that transformers saved once
# (bench/make_arch_bases.py): training (finetune_ref.py against `finetuned train`) and predict at
# batch 32 (predict_ref.py against our server, on the classifier the reference fine-tuned). For
# XLM-R (a 250k-row embedding) our `lora` and `head` runs too.
# Usage: bench/architectures.sh OUT_DIR [ARCH ...]   (from the repo root, after cargo build
# --release; needs ~/refbench-venv; run it on an otherwise idle machine). ARCH is a folder of
# OUT_DIR/models: roberta-base, xlm-roberta-base, distilbert-base-uncased, electra-base-discriminator,
# modernbert-base, deberta-v3-small, deberta-v3-base (made when missing). PREDICT=0 skips predict.
set -euo pipefail
OUT=$(mkdir -p "${1:?out dir}" && cd "$1" && pwd); shift
ARCHS=${*:-roberta-base xlm-roberta-base distilbert-base-uncased electra-base-discriminator}
PY=${PY:-$HOME/refbench-venv/bin/python}
REF=../shared/bench/reference
BIN=target/release/finetuned
for a in $ARCHS; do [ -d "$OUT/models/$a" ] || $PY bench/make_arch_bases.py "$OUT/models" "$a"; done
# SST-2's first 2,000 training rows; 200 rows each to validate and test (the weights are random:
# the accuracy says nothing, the time spent evaluating is not what is measured).
D=$OUT/sst2-2000
mkdir -p "$D"
head -2000 ../shared/datasets/sst2/train.jsonl > "$D/train.jsonl"
head -200 ../shared/datasets/sst2/validation.jsonl > "$D/validation.jsonl"
head -200 ../shared/datasets/sst2/test.jsonl > "$D/test.jsonl"
awk "NR <= 2048" ../shared/datasets/sst2/test.jsonl ../shared/datasets/sst2/validation.jsonl > "$OUT/pool.jsonl"
# MAXLEN (default 64): the longest a training text is cut to, on both sides.
COMMON="--data $D --epochs 1 --batch-size 32 --lr 5e-5 --max-len ${MAXLEN:-64} --seed 42 --threads 2 --group-by-length"
. "$(dirname "$0")/idle.sh"
for a in $ARCHS; do
  M=$OUT/models/$a; R=$OUT/$a
  mkdir -p "$R"
  idle; $PY $REF/finetune_ref.py --model "$M" $COMMON --save "$R/ref_model" --out "$R/ref_train.json" > "$R/ref_train.log" 2>&1
  idle; $BIN train --model "$M" $COMMON --pooling cls --out "$R/ours_train.json" > "$R/ours_train.log" 2>&1
  if [ "$a" = xlm-roberta-base ]; then
    for m in lora head; do
      idle; $BIN train --model "$M" ${COMMON/--lr 5e-5/} --pooling cls --method $m --out "$R/ours_$m.json" > "$R/ours_$m.log" 2>&1
    done
  fi
  [ "${PREDICT:-1}" = 0 ] && continue
  idle; $PY $REF/predict_ref.py --model "$R/ref_model" --data ../shared/datasets/sst2 --n-texts 1024 --n-requests 100 --threads 2 \
    --out "$R/predict_ref.json" > "$R/predict_ref.log" 2>&1
  mkdir -p "$R/serve/models" "$R/serve/data"
  ln -sfn "$R/ref_model" "$R/serve/models/bench-model"
  idle; $BIN serve --addr 127.0.0.1:8198 --data-dir "$R/serve/data" --models-dir "$R/serve/models" > "$R/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:8198/healthz >/dev/null && break; sleep 0.1; done
  $BIN bench-serve --url http://127.0.0.1:8198 --model bench-model --texts "$OUT/pool.jsonl" --clients 1 --batch 32 --duration 15 \
    --out "$R/ours_predict_b32.json" > /dev/null
  grep VmHWM /proc/$SERVER/status > "$R/server_rss.txt"
  kill $SERVER; wait $SERVER 2>/dev/null || true
done
python3 - "$OUT" $ARCHS <<'PY' | tee "$OUT/summary.txt"
import json, sys
d, archs = sys.argv[1], sys.argv[2:]
load = lambda p: json.load(open(p))
print(f"{'model':<28}{'run':<12}{'train ex/s':>11}{'ratio':>7}{'peak RSS MiB':>13}{'cores busy':>11}")
for a in archs:
    ref = load(f"{d}/{a}/ref_train.json")
    runs = [("reference", ref), ("ours full", load(f"{d}/{a}/ours_train.json"))]
    if a == "xlm-roberta-base":
        runs += [(f"ours {m}", load(f"{d}/{a}/ours_{m}.json")) for m in ("lora", "head")]
    for name, r in runs:
        ratio = r["train_examples_per_s"] / ref["train_examples_per_s"]
        print(f"{a:<28}{name:<12}{r['train_examples_per_s']:>11.2f}{ratio:>7.2f}{r['peak_rss_mib']:>13.0f}"
              f"{r['timing']['train_cpu_cores_busy']:>11.2f}")
print()
print(f"{'model':<28}{'predict_ref b32 texts/s':>24}{'ours b32 texts/s':>18}{'ratio':>7}")
for a in archs:
    try:
        ref = load(f"{d}/{a}/predict_ref.json")["throughput"]["e2e_seq_per_s"]
    except FileNotFoundError:
        continue
    ours = load(f"{d}/{a}/ours_predict_b32.json")["texts_per_s"]
    print(f"{a:<28}{ref:>24.1f}{ours:>18.1f}{ours / ref:>7.2f}")
PY
