# Sourced by the scripts that check a live server (schemathesis.sh, client-test.sh,
# browser-test.sh): a throw-away work dir, cleanup on every exit, and the server's start.
#
#   make_work NAME                  WORK=a new temp dir; on exit the server is stopped, its log's
#                                   last lines shown if the script failed, and WORK removed
#   start_server BIN MODEL_SRC ARGS...
#                                   BIN serve on a free port with WORK/data, and a models dir
#                                   linking MODEL_SRC as all-minilm-l6-v2, plus ARGS; returns once
#                                   /healthz answers, with SERVER_PID and BASE (http://host:port) set

SERVER_PID=

_server_lib_cleanup() {
    local rc=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 && -f $WORK/server.log ]]; then
        echo "--- last lines of the server log ---" >&2
        tail -n 30 "$WORK/server.log" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}

make_work() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/finetuned-$1.XXXXXX")
    trap _server_lib_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

start_server() {
    local bin=$1 model_src=$2
    shift 2
    mkdir -p "$WORK/models" "$WORK/data"
    ln -s "$(cd "$model_src" && pwd)" "$WORK/models/all-minilm-l6-v2"
    env -u FINETUNED_API_KEY NO_COLOR=1 "$bin" serve --addr 127.0.0.1:0 \
        --data-dir "$WORK/data" --models-dir "$WORK/models" "$@" >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    BASE=
    local deadline=$((SECONDS + 60))
    while :; do
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited during startup" >&2; exit 1; }
        (( SECONDS < deadline )) || { echo "server not healthy within 60s" >&2; exit 1; }
        if [[ -z $BASE ]]; then
            BASE=$(grep -so 'listening on http://[0-9.:]*' "$WORK/server.log" | head -n1 | sed 's/^listening on //' || true)
        fi
        if [[ -n $BASE ]] && curl -fsS -o /dev/null --max-time 2 "$BASE/healthz" 2>/dev/null; then
            break
        fi
        sleep 0.2
    done
    echo "server up at $BASE (pid $SERVER_PID)"
}
