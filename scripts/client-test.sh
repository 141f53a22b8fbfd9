#!/usr/bin/env bash
# Real clients against a live server: clients generated from openapi.yaml by openapi-python-client
# and by @hey-api/openapi-ts run the README's walk-through, huggingface_hub's
# InferenceClient.text_classification calls our predict route and the TEI route /predict, TEI's
# own /predict examples answer in TEI's shapes, and the standardwebhooks package verifies a job's
# webhooks (scripts/client-test.py and client-test.mts hold the checks).
#
#   scripts/client-test.sh path/to/finetuned
#
# Starts the binary on a free port with --api-key, --default-model, a throw-away data dir and a models
# dir linking ../shared/models/all-minilm-l6-v2; the walk-through trains on ../shared/datasets/tiny.
# Fails if a generator prints a warning about our spec.
#
# Environment (all optional):
#   CLIENT_VENV   virtualenv to (re)use; created and given the pinned clients if they are missing
#   CLIENT_NODE   npm prefix to (re)use for @hey-api/openapi-ts, tsx and typescript (default: a temp dir)
set -euo pipefail

HF_HUB_VERSION=2.4.0
OPC_VERSION=0.29.1
STANDARDWEBHOOKS_VERSION=1.1.0
HEYAPI_VERSION=0.95.0

if [[ $# -ne 1 || ! -x $1 ]]; then
    echo "usage: $0 path/to/finetuned" >&2
    exit 2
fi
BIN=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL_SRC=$ROOT/../shared/models/all-minilm-l6-v2
DATASET_DIR=$ROOT/../shared/datasets/tiny
for f in "$MODEL_SRC/config.json" "$MODEL_SRC/tokenizer.json" "$MODEL_SRC/model.safetensors" "$DATASET_DIR/train.jsonl"; do
    [[ -f $f ]] || { echo "missing $f" >&2; exit 2; }
done

# shellcheck source=server-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/server-lib.sh"
make_work clients

# --- clients, from PyPI ---------------------------------------------------------------------------
VENV=${CLIENT_VENV:-$WORK/venv}
if ! "$VENV/bin/python" -c "import huggingface_hub as h, sys; sys.exit(h.__version__ != '$HF_HUB_VERSION')" 2>/dev/null \
    || ! "$VENV/bin/openapi-python-client" --version 2>/dev/null | grep -qF "$OPC_VERSION" \
    || ! "$VENV/bin/pip" show standardwebhooks 2>/dev/null | grep -qx "Version: $STANDARDWEBHOOKS_VERSION"; then
    echo "installing huggingface_hub==$HF_HUB_VERSION openapi-python-client==$OPC_VERSION standardwebhooks==$STANDARDWEBHOOKS_VERSION into $VENV"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "huggingface_hub==$HF_HUB_VERSION" "openapi-python-client==$OPC_VERSION" \
        "standardwebhooks==$STANDARDWEBHOOKS_VERSION"
fi

# --- the generated client -------------------------------------------------------------------------
(cd "$WORK" && "$VENV/bin/openapi-python-client" generate --path "$ROOT/openapi.yaml" --meta none \
    --config "$ROOT/scripts/openapi-python-client.yaml" >"$WORK/generate.log" 2>&1) \
    || { cat "$WORK/generate.log" >&2; echo "openapi-python-client failed" >&2; exit 1; }
if grep -v -e '^Generating ' -e '^[[:space:]]*$' "$WORK/generate.log" >/dev/null; then
    cat "$WORK/generate.log" >&2
    echo "openapi-python-client printed warnings for openapi.yaml" >&2
    exit 1
fi
echo "generated finetuned_client from openapi.yaml, no warnings"
# openapi-python-client#1451 (open in 0.29.1): an operation whose body has several media types
# (POST /v1/jobs) types it `... | Unset` without importing `Unset`. The README's workaround: add the import.
for f in "$WORK"/finetuned_client/api/*/*.py; do
    if grep -q '| Unset' "$f" && ! grep -q 'import.*\bUnset\b' "$f"; then
        sed -i 's/^from \.\.\.types import Response, UNSET$/from ...types import Response, UNSET, Unset/' "$f"
        echo "patched the missing Unset import into ${f#"$WORK"/}"
    fi
done

NODE_PREFIX=${CLIENT_NODE:-$WORK/node}
if [[ ! -x $NODE_PREFIX/node_modules/.bin/openapi-ts ]] \
    || ! grep -qF "\"version\": \"$HEYAPI_VERSION\"" "$NODE_PREFIX/node_modules/@hey-api/openapi-ts/package.json"; then
    echo "installing @hey-api/openapi-ts@$HEYAPI_VERSION into $NODE_PREFIX"
    mkdir -p "$NODE_PREFIX"
    npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --loglevel=error \
        "@hey-api/openapi-ts@$HEYAPI_VERSION" tsx@4.23.15 typescript@5.9.3 >/dev/null
fi
"$NODE_PREFIX/node_modules/.bin/openapi-ts" -i "$ROOT/openapi.yaml" -o "$WORK/ts-client" >"$WORK/generate-ts.log" 2>&1 \
    || { cat "$WORK/generate-ts.log" >&2; echo "@hey-api/openapi-ts failed" >&2; exit 1; }
if grep -qiE 'warn|error|⚠' "$WORK/generate-ts.log"; then
    cat "$WORK/generate-ts.log" >&2
    echo "@hey-api/openapi-ts printed warnings for openapi.yaml" >&2
    exit 1
fi
echo "generated a TypeScript client with @hey-api/openapi-ts, no warnings"

# --- server ---------------------------------------------------------------------------------------
MODEL_NAME=client-test-v1
API_KEY=client-test-key
# A Standard Webhooks secret (`whsec_` and a base64 key): the webhooks check verifies with it.
WEBHOOK_SECRET=whsec_Y2xpZW50LXRlc3Qtd2ViaG9vay1rZXk=
start_server "$BIN" "$MODEL_SRC" --api-key "$API_KEY" --default-model "$MODEL_NAME" --webhook-secret "$WEBHOOK_SECRET"

# --- the checks -----------------------------------------------------------------------------------
BASE=$BASE API_KEY=$API_KEY MODEL_NAME=$MODEL_NAME DATASET_DIR=$DATASET_DIR HF_HOME=$WORK/hf HF_HUB_DISABLE_TELEMETRY=1 PYTHONPATH=$WORK \
    WEBHOOK_SECRET=$WEBHOOK_SECRET \
    timeout 900 "$VENV/bin/python" "$ROOT/scripts/client-test.py"
BASE=$BASE API_KEY=$API_KEY MODEL_NAME=$MODEL_NAME DATASET_DIR=$DATASET_DIR GEN_DIR=$WORK/ts-client \
    timeout 900 "$NODE_PREFIX/node_modules/.bin/tsx" "$ROOT/scripts/client-test.mts"
