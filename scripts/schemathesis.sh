#!/usr/bin/env bash
# Property-based API tests: runs schemathesis against a live `finetuned` server, driven by openapi.yaml.
#
#   scripts/schemathesis.sh path/to/finetuned
#
# Starts the given binary on a free port with a throw-away data dir and a models dir linking
# ../shared/models/all-minilm-l6-v2 (relative to the repo root), seeds two datasets and two tiny trained
# models so the `{id}` operations get past 404, runs schemathesis with every check, and exits non-zero on
# any schemathesis failure. The server is stopped on exit.
#
# Environment (all optional):
#   ST_SPEC           OpenAPI document to test against (default: the repo's openapi.yaml)
#   SCHEMA_VENV       virtualenv to (re)use; created and given schemathesis==$ST_VERSION if that is missing
#   ST_MAX_EXAMPLES   test cases per operation and phase (default 20)
#   ST_SEED           schemathesis seed (default 42)
#   ST_TIMEOUT        wall-clock limit for the schemathesis run, seconds (default 240)
#   ST_REPORT_DIR     keep JUnit/JSON/VCR reports here (default: discarded with the temp dir)
#   ST_EXTRA_ARGS     extra arguments for `st run`, e.g. "--continue-on-failure --workers 1"
set -euo pipefail

ST_VERSION=4.32.5

if [[ $# -ne 1 || ! -x $1 ]]; then
    echo "usage: $0 path/to/finetuned" >&2
    exit 2
fi
BIN=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SPEC=${ST_SPEC:-$ROOT/openapi.yaml}
MODEL_SRC=$ROOT/../shared/models/all-minilm-l6-v2
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-20}
SEED=${ST_SEED:-42}
ST_TIMEOUT=${ST_TIMEOUT:-240}

for f in config.json tokenizer.json model.safetensors; do
    [[ -f $MODEL_SRC/$f ]] || { echo "missing $MODEL_SRC/$f" >&2; exit 2; }
done

# shellcheck source=server-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/server-lib.sh"
make_work schemathesis

# --- schemathesis -------------------------------------------------------------------------------
VENV=${SCHEMA_VENV:-$WORK/venv}
if ! "$VENV/bin/st" --version 2>/dev/null | grep -qF "$ST_VERSION"; then
    echo "installing schemathesis==$ST_VERSION into $VENV"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi

# --- server -------------------------------------------------------------------------------------
start_server "$BIN" "$MODEL_SRC" --default-model st-model

# --- seed data so the {id} operations reach real resources ----------------------------------------
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
post() { curl -fsS --max-time 30 -X POST "$@"; }

python3 - >"$WORK/seed.jsonl" <<'EOF'
pos = ["great movie", "loved it", "wonderful acting", "a joy to watch", "superb film", "really fun"]
neg = ["dull and far too long", "hated it", "terrible acting", "a waste of time", "awful film", "really boring"]
for i in range(24):
    print('{"text": "%s", "label": "positive"}' % pos[i % 6])
    print('{"text": "%s", "label": "negative"}' % neg[i % 6])
EOF
DS_TRAIN=$(post "$BASE/v1/datasets?name=st-train" -H 'Content-Type: application/x-ndjson' \
    --data-binary @"$WORK/seed.jsonl" | json_field id)
DS_DEL=$(post "$BASE/v1/datasets?name=st-delete" -H 'Content-Type: text/csv' \
    --data-binary $'text,label\ngood,pos\nbad,neg\n' | json_field id)

train() {  # train MODEL_NAME -> prints the job id once it succeeded
    local job status deadline=$((SECONDS + 180))
    job=$(post "$BASE/v1/jobs" -H 'Content-Type: application/json' -d "{\"base_model\": \"all-minilm-l6-v2\",
        \"training_dataset\": \"$DS_TRAIN\", \"model_name\": \"$1\",
        \"hyperparameters\": {\"epochs\": 1, \"batch_size\": 16, \"max_seq_len\": 16}}" | json_field id) || return 1
    while :; do
        status=$(curl -fsS --max-time 10 "$BASE/v1/jobs/$job" | json_field status) || return 1
        case $status in
            succeeded) echo "$job"; return 0 ;;
            failed|cancelled) echo "seed job $job for $1 ended $status" >&2; return 1 ;;
        esac
        (( SECONDS < deadline )) || { echo "seed job $job for $1 did not finish in 180s" >&2; return 1; }
        sleep 0.5
    done
}
JOB_KEEP=$(train st-model)
train st-delete >/dev/null
echo "seeded datasets $DS_TRAIN $DS_DEL, models st-model st-delete, job $JOB_KEEP"

# --- schemathesis config: known ids (half the time) and serializers -------------------------------
cat >"$WORK/hooks.py" <<'EOF'
import schemathesis

# Dataset bodies are raw bytes; schemathesis has no serializer for the JSON Lines media types.
schemathesis.serializer.alias(["application/x-ndjson", "application/jsonl"], "application/octet-stream")
EOF

cat >"$WORK/schemathesis.toml" <<EOF
[dictionaries.datasets]
values = ["$DS_TRAIN"]
[dictionaries.deletable_datasets]
values = ["$DS_DEL"]
[dictionaries.jobs]
values = ["$JOB_KEEP"]
[dictionaries.models]
values = ["st-model", "all-minilm-l6-v2"]
[dictionaries.deletable_models]
values = ["st-delete", "all-minilm-l6-v2"]
[dictionaries.base_models]
values = ["all-minilm-l6-v2"]

[[operations]]
include-name = ["GET /v1/datasets/{id}"]
parameters = { "path.id" = { dictionary = "datasets", probability = 0.5 } }

[[operations]]
include-name = ["DELETE /v1/datasets/{id}"]
parameters = { "path.id" = { dictionary = "deletable_datasets", probability = 0.5 } }

[[operations]]
include-name = ["GET /v1/jobs/{id}", "POST /v1/jobs/{id}/cancel", "GET /v1/jobs/{id}/events", "GET /v1/jobs/{id}/metrics"]
parameters = { "path.id" = { dictionary = "jobs", probability = 0.5 } }

[[operations]]
include-name = ["GET /v1/models/{id}", "GET /v1/models/{id}/download", "POST /v1/models/{id}/predict", "POST /v1/models/{id}/rerank"]
parameters = { "path.id" = { dictionary = "models", probability = 0.5 } }

[[operations]]
include-name = ["POST /predict", "GET /info", "POST /tokenize", "POST /rerank"]
parameters = { "header.X-Model" = { dictionary = "models", probability = 0.5 } }

[[operations]]
include-name = ["DELETE /v1/models/{id}"]
parameters = { "path.id" = { dictionary = "deletable_models", probability = 0.5 } }

[[operations]]
include-name = ["POST /v1/jobs"]
parameters = { "body.base_model" = { dictionary = "base_models", probability = 0.5 }, "body.training_dataset" = { dictionary = "datasets", probability = 0.5 } }

# 422 is a right answer to some schema-valid requests: a dataset file is "format: binary", so any bytes
# (a PNG, say) count as valid, but the server must refuse a file that is not JSON Lines/CSV
# (invalid_dataset); "threshold" is schema-valid but only allowed for multi-label models; an X-Model
# header may name a base model, which the TEI routes refuse as predict does, and /tokenize refuses a
# prompt_name; the rerank routes refuse a classifier of two labels (st-model), which is not a reranker.
[[operations]]
include-name = ["POST /v1/datasets", "POST /v1/jobs", "POST /v1/models/{id}/predict", "POST /predict", "GET /info", "POST /tokenize", "POST /v1/models/{id}/rerank", "POST /rerank"]
checks.positive_data_acceptance.expected-statuses = ["2XX", 401, 404, 409, 422]
EOF

# --- run --------------------------------------------------------------------------------------------
REPORT_DIR=${ST_REPORT_DIR:-$WORK/report}
mkdir -p "$REPORT_DIR"
cd "$WORK"
run_schemathesis() {
    # shellcheck disable=SC2086
    SCHEMATHESIS_HOOKS=hooks PYTHONPATH=$WORK timeout --signal=INT --kill-after=20 "$ST_TIMEOUT" \
        "$VENV/bin/st" --config-file "$WORK/schemathesis.toml" run "$SPEC" \
        --url "$BASE" \
        --checks all \
        --max-examples "$MAX_EXAMPLES" \
        --seed "$SEED" \
        --generation-database none \
        --workers 1 \
        --request-timeout 30 \
        --report junit,json,vcr --report-dir "$REPORT_DIR" \
        --no-color \
        ${ST_EXTRA_ARGS:-} 2>&1 | tee "$WORK/run.log"
    return "${PIPESTATUS[0]}"
}
set +e
run_schemathesis
rc=$?
# One worker: with two threads, runs here stopped three times in five on CPython 3.11's "AST
# constructor recursion depth mismatch" inside schemathesis (a bug seen in threaded programs,
# python/cpython#106905); with one, the case count is the same every run. Any error inside
# schemathesis, with no check failed, gets one more run; a failed check (its FAILURES section)
# never does.
if [[ $rc -ne 0 && $rc -ne 124 && $rc -ne 130 ]] && grep -q "^Errors:" "$WORK/run.log" && ! grep -q "FAILURES\|^Failures:" "$WORK/run.log"; then
    echo "schemathesis stopped on an error of its own, with no failed check: running it once more" >&2
    run_schemathesis
    rc=$?
fi
set -e
if [[ $rc -eq 124 || $rc -eq 130 ]]; then
    echo "schemathesis did not finish within ${ST_TIMEOUT}s" >&2
fi
[[ -n ${ST_REPORT_DIR:-} ]] && echo "reports in $REPORT_DIR"
exit "$rc"
