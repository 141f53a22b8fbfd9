#!/usr/bin/env bash
# Scaling out (issue 18): what more worker processes and more API processes buy on this machine,
# on SQLite (the default, in a shared data dir) and on Postgres (--database-url).
#
# Usage (from the repo root, after `cargo build --release`, on an otherwise idle machine):
#   bench/scale.sh OUT_DIR
# Writes OUT_DIR/results.md (the tables, also printed), OUT_DIR/raw/*.json (one file per run),
# OUT_DIR/logs/ (every process's log) and OUT_DIR/meta.json (date, build, machine, settings).
# Settings (environment; the defaults take ~10 min on 2 cores):
#   JOBS=1000          tiny jobs per run of part 1 (~10-20 ms each on one worker); EPOCHS=2: their epochs
#   ROUNDS=3           rounds of every part; figures are medians over rounds
#   WORKERS="1 2 4"    worker process counts of part 1
#   ENGINES="sqlite postgres"
#   QUEUE_JOBS=40      tiny jobs of each part-2 run; LONG_SECONDS=8: how long its long job runs (renewals)
#   PREDICT_SECONDS=12 CLIENTS=32  PREDICT_MODELS="tiny minilm" (minilm: ../shared/models/all-minilm-l6-v2)
#   PARTS="scale queue predict"
#   POLL_MS=100        --poll-interval-ms of every process (an idle worker's look at the queue)
#   WORKER_FLAGS=""    more `serve` flags for the part-1 workers, e.g. "--train-threads 1" (by default
#                      each worker trains on one thread per core: 4 workers put 8 threads on 2 cores)
#   PG_FSYNC=on        Postgres fsync (scripts/postgres.sh turns it off for tests; a deployment has it on)
#   BIN=target/release/finetuned
#
# The three parts:
# 1. Jobs finished per minute with 1 API process (--role api) and W worker processes (--role worker)
#    on one store. A run queues JOBS copies of tests/scale.rs's tiny job (the tiny random BERT of
#    tests/common/mod.rs, written by bench/scale_jobs.py; its 48 toy rows, 2 epochs, batch 16) as
#    fast as one client can post them and times from the first POST until the last job succeeded
#    (the last `job succeeded` line of the workers' logs). Each run has a fresh data dir (SQLite)
#    or a fresh database (Postgres); engines alternate run by run (their order flips each round).
#    Beside jobs/min each run reports, per job, its time on its worker (`job started` → `job
#    succeeded`), the worker's gap between one job's end and its next start (claim and loop), and
#    how many of the cores were busy (/proc/stat, whole machine). When more workers leave the gap
#    flat but stretch every job while the cores are ~100 % busy, the cores stop the scaling, not
#    the queue.
# 2. The queue's own cost per job. Method: one worker runs QUEUE_JOBS tiny jobs one after another
#    with sqlx's statement log on (RUST_LOG sqlx::query=debug), which gives every statement's time
#    as the worker sees it (sent → last row read, so lock waits included). Per job we add up:
#      claim        the statement(s) that took the job (Postgres: one UPDATE on a SELECT … FOR
#                   UPDATE SKIP LOCKED; SQLite: the SELECT that found it and the compare-and-set
#                   UPDATE); empty looks at an idle queue are not counted;
#      final write  the transaction that ends it: BEGIN, model row, job metrics, status
#                   'succeeded', closing event, COMMIT;
#      lease        each renewal (UPDATE lease_expires_at), timed per renewal; a job pays one per
#                   lease/3 of training (10 s at the default 30 s lease). This part runs with a
#                   2 s lease and ends with one long job, cancelled after LONG_SECONDS, for renewals.
#    The job's other writes (events, progress and metrics of every step) are shown apart: they are
#    the job's records rather than the queue. The first job of a run (cold connections and caches)
#    is left out; the rest give a median. Timing statements rather than subtracting a trainer's
#    time from a wall time keeps the figure free of the training's noise, which on tiny jobs is
#    larger than the queue's cost; what it leaves out (the pool's acquire, the async hop) shows in
#    the "gap" column of part 1, which holds the claim and everything around it.
# 3. Predict texts/s through nginx (round robin, keepalive, as deploy/compose/nginx.conf) to 1
#    and to 2 API processes (--role api) on one data dir, and to 1 API process directly; CLIENTS
#    concurrent clients of `finetuned bench-serve`, one text a request, PREDICT_SECONDS a run,
#    setups alternating (order rotating each round). The classifiers are trained first, on the toy
#    rows, from the tiny BERT (tiny: HTTP-bound) and from all-MiniLM-L6-v2 (minilm: compute-bound).
#    Client, nginx and servers share the machine: on 2 cores, a second replica has no core of its own.
set -euo pipefail
OUT=${1:?usage: bench/scale.sh OUT_DIR}
mkdir -p "$OUT/raw" "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/finetuned}
JOBS=${JOBS:-1000}; EPOCHS=${EPOCHS:-2}; ROUNDS=${ROUNDS:-3}; WORKERS=${WORKERS:-"1 2 4"}; ENGINES=${ENGINES:-"sqlite postgres"}
QUEUE_JOBS=${QUEUE_JOBS:-40}; LONG_SECONDS=${LONG_SECONDS:-8}
PREDICT_SECONDS=${PREDICT_SECONDS:-12}; CLIENTS=${CLIENTS:-32}; PREDICT_MODELS=${PREDICT_MODELS:-"tiny minilm"}
PARTS=${PARTS:-"scale queue predict"}; POLL_MS=${POLL_MS:-100}; PG_FSYNC=${PG_FSYNC:-on}; WORKER_FLAGS=${WORKER_FLAGS:-}
MINILM=../shared/models/all-minilm-l6-v2
PY="python3 bench/scale_jobs.py"
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release --locked first" >&2; exit 1; }
rm -f "$OUT"/raw/*.json
WORK=$(mktemp -d /tmp/finetuned-scale.XXXXXX)
chmod 755 "$WORK" # Postgres runs as its own user and must reach its cluster dir in here

PIDS=()          # every process this script started and has not stopped yet
NGINX_PID=""
PG_DIR=""
cleanup() {
  set +e
  for p in "${PIDS[@]}" $NGINX_PID; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}" $NGINX_PID; do wait "$p" 2>/dev/null; done
  [[ -n $PG_DIR ]] && bash scripts/postgres.sh stop "$PG_DIR" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start NAME ROLE DATA_DIR DB_URL|- [extra serve flags…]: starts `finetuned serve`, sets LAST_PID/LAST_URL
start() {
  local name=$1 role=$2 data=$3 db=$4; shift 4
  local p; p=$(port)
  local args=(serve --addr "127.0.0.1:$p" --role "$role" --data-dir "$data" --models-dir "$WORK/models"
              --poll-interval-ms "$POLL_MS" --log-format json)
  [[ $db != - ]] && args+=(--database-url "$db")
  "$BIN" "${args[@]}" "$@" > "$OUT/logs/$name.log" 2>&1 &
  LAST_PID=$!; LAST_URL="http://127.0.0.1:$p"
  PIDS+=("$LAST_PID")
}

# ready URL PID: waits for /readyz
ready() {
  for _ in $(seq 300); do
    curl -sf "$1/readyz" >/dev/null 2>&1 && return 0
    grep -qs '^State:[[:space:]]*[^Z]' "/proc/$2/status" || { echo "process $2 ($1) exited; see $OUT/logs" >&2; return 1; }
    sleep 0.1
  done
  echo "$1 not ready after 30 s" >&2; return 1
}

# stop_all: SIGTERM every started process and wait for it (SIGKILL after 20 s)
stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}

# db_for ENGINE TAG: the database of one run: "-" (SQLite in the data dir) or the URL of a fresh
# Postgres database named after the run.
db_for() {
  if [[ $1 == sqlite ]]; then echo -; return; fi
  psql -q "$PG_URL" -c "create database $2" >/dev/null
  echo "${PG_URL%/*}/$2"
}

# ---------------------------------------------------------------- setup
mkdir -p "$WORK/models"
$PY model "$WORK/models/tiny"
[[ -d $MINILM ]] && ln -sfn "$(cd "$MINILM" && pwd)" "$WORK/models/all-minilm-l6-v2"
case " $ENGINES " in *" postgres "*)
  PG_DIR=$WORK/pg
  PG_URL=$(bash scripts/postgres.sh start "$PG_DIR" 2>"$OUT/logs/postgres-start.log")
  if [[ $PG_FSYNC != off ]]; then
    # scripts/postgres.sh starts the test server with fsync=off on its command line, which no
    # setting can override: start the same cluster again as it does, but with fsync on.
    bash scripts/postgres.sh stop "$PG_DIR" 2>>"$OUT/logs/postgres-start.log"
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    runas=(); [[ $(id -u) == 0 ]] && runas=(runuser -u postgres --)
    "${runas[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 -o "-p $(cat "$PG_DIR/port") \
      -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=on" start >>"$OUT/logs/postgres-start.log" 2>&1
  fi
  PG_VERSION=$(psql -tA "$PG_URL" -c "show server_version")
  PG_FSYNC_NOW=$(psql -tA "$PG_URL" -c "show fsync")
  ;;
esac

# The tiny model loads: the server lists it.
start check all "$WORK/check" -
ready "$LAST_URL" "$LAST_PID"
curl -sf "$LAST_URL/v1/models" | grep -q '"id":"tiny"' || { echo "the tiny model is not listed: $(curl -s "$LAST_URL/v1/models")" >&2; exit 1; }
stop_all

GIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo "+changes")
python3 - "$OUT/meta.json" <<PY
import json, os, platform, subprocess, sys, time
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = int(open("/proc/meminfo").readline().split()[1]) // 1024 // 1024
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip() or "?"
json.dump({
  "date": time.strftime("%Y-%m-%d %H:%M %Z"),
  "build": "$BIN ($(basename "$BIN") at $GIT, release, $(stat -c %y "$BIN" | cut -d. -f1); " + rustc + ")",
  "machine": f"{os.cpu_count()} cores {cpu}, {mem} GiB, {platform.platform()}; Postgres ${PG_VERSION:-n/a} (fsync ${PG_FSYNC_NOW:-n/a}), "
             + subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
  "settings": "JOBS=$JOBS EPOCHS=$EPOCHS ROUNDS=$ROUNDS WORKERS='$WORKERS' ENGINES='$ENGINES' QUEUE_JOBS=$QUEUE_JOBS LONG_SECONDS=$LONG_SECONDS "
              "PREDICT_SECONDS=$PREDICT_SECONDS CLIENTS=$CLIENTS PREDICT_MODELS='$PREDICT_MODELS' POLL_MS=$POLL_MS WORKER_FLAGS='$WORKER_FLAGS'",
}, open(sys.argv[1], "w"), indent=1)
PY
read -ra ENGINE_LIST <<< "$ENGINES"
# engines in round r's order: as given on odd rounds, reversed on even ones
engines_of_round() { if (( $1 % 2 )); then echo "${ENGINE_LIST[@]}"; else printf '%s\n' "${ENGINE_LIST[@]}" | tac | tr '\n' ' '; fi; }

# ---------------------------------------------------------------- 1. jobs/min
if [[ " $PARTS " == *" scale "* ]]; then
  echo "== 1. jobs/min: $JOBS tiny jobs, 1 API + {$WORKERS} workers, engines {$ENGINES}, $ROUNDS round(s)"
  for r in $(seq "$ROUNDS"); do
    for w in $WORKERS; do
      for e in $(engines_of_round "$r"); do
        tag=${e}_w${w}_r${r}; d=$WORK/$tag; mkdir -p "$d"
        db=$(db_for "$e" "$tag")
        start "scale_${tag}_api" api "$d" "$db"; pids="api:$LAST_PID"; api=$LAST_URL
        ready "$api" "$LAST_PID"
        logs=()
        for i in $(seq "$w"); do
          start "scale_${tag}_worker$i" worker "$d" "$db" $WORKER_FLAGS; pids+=",worker$i:$LAST_PID"; logs+=("$OUT/logs/scale_${tag}_worker$i.log")
          ready "$LAST_URL" "$LAST_PID"
        done
        $PY jobs --url "$api" --n "$JOBS" --epochs "$EPOCHS" --engine "$e" --workers "$w" --round "$r" --pids "$pids" \
          --logs "$(IFS=,; echo "${logs[*]}")" --out "$OUT/raw/scale_$tag.json"
        stop_all
        rm -rf "$d"
      done
    done
  done
fi

# ---------------------------------------------------------------- 2. the queue's cost per job
if [[ " $PARTS " == *" queue "* ]]; then
  echo "== 2. queue cost: 1 worker, $QUEUE_JOBS tiny jobs, then one long job for ${LONG_SECONDS} s, statement log on, $ROUNDS round(s)"
  for r in $(seq "$ROUNDS"); do
    for e in $(engines_of_round "$r"); do
      tag=${e}_r${r}; d=$WORK/q_$tag; mkdir -p "$d"
      db=$(db_for "$e" "q_$tag")
      start "queue_${tag}_api" api "$d" "$db" --lease-seconds 2; api=$LAST_URL; ready "$api" "$LAST_PID"
      RUST_LOG="info,sqlx=warn,sqlx::query=debug" start "queue_${tag}_worker" worker "$d" "$db" --lease-seconds 2
      ready "$LAST_URL" "$LAST_PID"
      $PY jobs --url "$api" --n "$QUEUE_JOBS" --engine "$e" --workers 1 --round "$r" --out "$d/jobs.json" > /dev/null
      $PY long --url "$api" --seconds "$LONG_SECONDS"
      stop_all
      $PY dbcost --log "$OUT/logs/queue_${tag}_worker.log" --engine "$e" --round "$r" --out "$OUT/raw/dbcost_$tag.json"
      gzip -f "$OUT/logs/queue_${tag}_worker.log"
      rm -rf "$d"
    done
  done
fi

# ---------------------------------------------------------------- 3. predict through nginx
if [[ " $PARTS " == *" predict "* ]]; then
  models=()
  for m in $PREDICT_MODELS; do
    if [[ $m == minilm && ! -d $MINILM ]]; then echo "no $MINILM: predict on tiny only" >&2; continue; fi
    models+=("$m")
  done
  echo "== 3. predict: ${models[*]}; direct-1, nginx-1, nginx-2; $CLIENTS clients, ${PREDICT_SECONDS} s a run, $ROUNDS round(s)"
  P=$WORK/predict; mkdir -p "$P/data" "$P/nginx"
  start predict_train all "$P/data" -; ready "$LAST_URL" "$LAST_PID"
  for m in "${models[@]}"; do
    base=tiny; epochs=2; [[ $m == minilm ]] && { base=all-minilm-l6-v2; epochs=1; }
    $PY train --url "$LAST_URL" --base "$base" --epochs "$epochs" --name "clf-$m" --timeout 900
  done
  stop_all
  $PY toy 48 > "$P/texts.jsonl"
  NGINX_PORT=$(port)
  # nginx UPSTREAM_PORT…: nginx in the foreground on NGINX_PORT, round robin over the ports
  nginx_up() {
    local servers="" p
    for p in "$@"; do servers+="        server 127.0.0.1:$p max_fails=1 fail_timeout=5s;"$'\n'; done
    cat > "$P/nginx/nginx.conf" <<CONF
daemon off;
worker_processes auto;
pid $P/nginx/nginx.pid;
error_log $P/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $P/nginx/body; proxy_temp_path $P/nginx/proxy;
    fastcgi_temp_path $P/nginx/fastcgi; uwsgi_temp_path $P/nginx/uwsgi; scgi_temp_path $P/nginx/scgi;
    upstream finetuned_api {
$servers        keepalive 32;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://finetuned_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_next_upstream error timeout;
        }
    }
}
CONF
    nginx -p "$P/nginx" -c "$P/nginx/nginx.conf" -e "$P/nginx/error.log" &
    NGINX_PID=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$NGINX_PORT/healthz" && return 0; sleep 0.1; done
    echo "nginx did not start: $(cat "$P/nginx/error.log")" >&2; return 1
  }
  nginx_down() { kill -TERM "$NGINX_PID" 2>/dev/null || true; wait "$NGINX_PID" 2>/dev/null || true; NGINX_PID=""; }
  # served URL…: each API process's count of predict requests answered so far (its /metrics)
  served() {
    local u
    for u in "$@"; do
      curl -sf "$u/metrics" | awk '/^finetuned_http_requests_total\{route="\/v1\/models\/\{id\}\/predict"/ { n += $NF } END { printf "%d ", n }'
    done
  }
  SETUPS=(direct-1 nginx-1 nginx-2)
  for r in $(seq "$ROUNDS"); do
    for k in 0 1 2; do
      s=${SETUPS[$(( (k + r - 1) % 3 ))]}
      n=${s#*-}
      urls=(); ports=()
      for i in $(seq "$n"); do
        start "predict_${s}_r${r}_api$i" api "$P/data" -; ready "$LAST_URL" "$LAST_PID"
        urls+=("$LAST_URL"); ports+=("${LAST_URL##*:}")
      done
      target=${urls[0]}
      if [[ $s == nginx-* ]]; then nginx_up "${ports[@]}"; target=http://127.0.0.1:$NGINX_PORT; fi
      for m in "${models[@]}"; do
        for u in "${urls[@]}"; do # every replica loads the model before the clock starts
          curl -sf "$u/v1/models/clf-$m/predict" -H 'content-type: application/json' -d '{"inputs": ["good film"]}' >/dev/null
        done
        f=$OUT/raw/predict_${m}_${s}_r$r.json
        before=$(served "${urls[@]}")
        "$BIN" bench-serve --url "$target" --model "clf-$m" --texts "$P/texts.jsonl" --clients "$CLIENTS" --batch 1 \
          --duration "$PREDICT_SECONDS" --warmup 20 --out "$f" > /dev/null
        after=$(served "${urls[@]}")
        python3 - "$f" "$m" "$s" "$r" "$before" "$after" <<'PY'
import json, sys
f, m, s, r, before, after = sys.argv[1:]
d = json.load(open(f))
d.update(model=m, setup=s, round=int(r), per_replica=[int(b) - int(a) for a, b in zip(before.split(), after.split())])
json.dump(d, open(f, "w"), indent=1)
print(f"  {m:7} {s:9} round={r}: {d['texts_per_s']:.1f} texts/s, p50 {d['latency_ms']['p50']:.2f} ms, "
      f"statuses {d['statuses']}, requests per replica {d['per_replica']}")
PY
      done
      [[ -n $NGINX_PID ]] && nginx_down
      stop_all
    done
  done
fi

echo
$PY report "$OUT"
