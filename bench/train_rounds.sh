#!/usr/bin/env bash
# Training speed against finetune_ref.py in alternated rounds, on a model and data that
# bench/architectures.sh OUT_DIR prepared (OUT_DIR/models/ARCH, OUT_DIR/sst2-2000), with its
# settings (1 epoch, batch 32, len 64, --group-by-length, ours --pooling cls). Each round runs the
# reference, then each given build of ours, in an order that flips every round.
# Prints every round and each build's median with its ratio to the reference's median.
# Usage: [MAXLEN=64] bench/train_rounds.sh OUT_DIR ROUNDS ARCH BIN [BIN ...]   (from the repo root; idle machine)
set -euo pipefail
OUT=$(cd "${1:?out dir}" && pwd); ROUNDS=${2:?rounds}; ARCH=${3:?arch}; shift 3
BINS=("$@")
PY=${PY:-$HOME/refbench-venv/bin/python}
MAXLEN=${MAXLEN:-64}
COMMON="--data $OUT/sst2-2000 --epochs 1 --batch-size 32 --lr 5e-5 --max-len $MAXLEN --seed 42 --threads 2 --group-by-length"
R=$OUT/train-rounds/$ARCH-len$MAXLEN
mkdir -p "$R"
. "$(dirname "$0")/idle.sh"
for r in $(seq "$ROUNDS"); do
  sides=(ref); for i in "${!BINS[@]}"; do sides+=("$i"); done
  if (( r % 2 == 0 )); then sides=($(printf '%s\n' "${sides[@]}" | tac)); fi
  for side in "${sides[@]}"; do
    idle
    if [ "$side" = ref ]; then
      $PY ../shared/bench/reference/finetune_ref.py --model "$OUT/models/$ARCH" $COMMON --out "$R/ref-$r.json" > "$R/ref-$r.log" 2>&1
    else
      "${BINS[$side]}" train --model "$OUT/models/$ARCH" $COMMON --pooling cls --out "$R/ours$side-$r.json" > "$R/ours$side-$r.log" 2>&1
    fi
  done
done
python3 - "$R" "$ROUNDS" "${BINS[@]}" <<'PY'
import json, statistics, sys
d, rounds, bins = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rate = lambda side, r: json.load(open(f"{d}/{side}-{r}.json"))["train_examples_per_s"]
ref = [rate("ref", r) for r in range(1, rounds + 1)]
print(f"reference: rounds {', '.join(f'{x:.2f}' for x in ref)}; median {statistics.median(ref):.2f} ex/s")
for i, b in enumerate(bins):
    ours = [rate(f"ours{i}", r) for r in range(1, rounds + 1)]
    per = ", ".join(f"{o / f:.3f}" for o, f in zip(ours, ref))
    print(f"{b}: rounds {', '.join(f'{x:.2f}' for x in ours)}; median {statistics.median(ours):.2f} ex/s; "
          f"ratio of medians {statistics.median(ours) / statistics.median(ref):.3f} (per round {per})")
PY
