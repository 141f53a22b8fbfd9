#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 600) from the committed seeds, one after another.
# A crash stops with libFuzzer's report; copy the input it saved (artifacts/<target>/crash-…)
# into regressions/<target>/ so that `cargo test --test fuzz_replay` keeps checking it.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-600}
for t in ${TARGETS:-dataset_jsonl dataset_csv predict_body}; do
    mkdir -p "corpus/$t"
    echo "== $t: ${SECONDS_EACH}s"
    cargo +nightly fuzz run -O -s none "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$SECONDS_EACH" -print_final_stats=1 2>&1 \
        | grep -E "^(stat::|Done|==|INFO: Running|.*ERROR|.*panicked)" || true
    test "${PIPESTATUS[0]}" -eq 0
done
