#!/usr/bin/env bash
# A throwaway S3-protocol server for the tests: s3s-fs (from the crates registry, built with its
# `binary` feature; installed into $FINETUNED_TOOLS, default target/tools, when missing) serving
# DIR/root on a free local port, with one bucket, `finetuned`.
#   scripts/s3-server.sh start DIR    # prints the endpoint URL
#   scripts/s3-server.sh stop DIR
#   scripts/s3-server.sh resume DIR   # starts it again on the same port and data
# Clients use AWS_ACCESS_KEY_ID=finetuned AWS_SECRET_ACCESS_KEY=finetuned-secret AWS_REGION=us-east-1
# AWS_ALLOW_HTTP=true and AWS_ENDPOINT_URL=<the printed URL>.
set -euo pipefail
CMD=${1:?start, stop or resume}; DIR=${2:?server dir}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${FINETUNED_TOOLS:-$REPO/target/tools}
BIN=$TOOLS/bin/s3s-fs
case $CMD in
  start)
    if [[ ! -x $BIN ]]; then
      echo "installing s3s-fs into $TOOLS" >&2
      cargo install s3s-fs@0.14.1 --features binary --locked --root "$TOOLS" >&2
    fi
    mkdir -p "$DIR/root/finetuned"
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' > "$DIR/port"
    bash "${BASH_SOURCE[0]}" resume "$DIR"
    echo "http://127.0.0.1:$(cat "$DIR/port")"
    ;;
  resume)
    PORT=$(cat "$DIR/port")
    nohup "$BIN" --host 127.0.0.1 --port "$PORT" --access-key finetuned --secret-key finetuned-secret \
      "$DIR/root" >>"$DIR/server.log" 2>&1 &
    echo $! > "$DIR/pid"
    for _ in $(seq 100); do
      if python3 -c "import socket, sys; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null; then exit 0; fi
      sleep 0.1
    done
    echo "s3s-fs did not start: $(tail -n 5 "$DIR/server.log")" >&2; exit 1
    ;;
  stop)
    [[ -f $DIR/pid ]] && kill "$(cat "$DIR/pid")" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$(cat "$DIR/pid")" 2>/dev/null || exit 0; sleep 0.1; done
    ;;
  *) echo "usage: $0 start|stop|resume DIR" >&2; exit 2 ;;
esac
