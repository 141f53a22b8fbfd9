#!/usr/bin/env bash
# A throwaway Postgres server for the tests: a fresh cluster in DIR, on a free local port, as an
# unprivileged user (initdb refuses root). Installs Debian's `postgresql` package when missing.
#   scripts/postgres.sh start DIR   # prints the server's URL (database `postgres`, user `finetuned`)
#   scripts/postgres.sh stop DIR
#   scripts/postgres.sh resume DIR  # starts a stopped cluster again, on the same port
set -euo pipefail
CMD=${1:?start or stop}; DIR=${2:?cluster dir}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [[ $CMD == start && ! -x $BIN/initdb ]]; then
  echo "installing Debian's postgresql package" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi
# As root, the cluster belongs to the `postgres` user the package creates.
as_owner() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case $CMD in
  start)
    mkdir -p "$DIR"
    [[ $(id -u) == 0 ]] && chown postgres "$DIR"
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "$PORT" > "$DIR/port"
    as_owner "$BIN/initdb" -D "$DIR/data" -U finetuned --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1
    bash "${BASH_SOURCE[0]}" resume "$DIR"
    echo "postgres://finetuned@127.0.0.1:$PORT/postgres"
    ;;
  resume)
    PORT=$(cat "$DIR/port")
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
      -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" start >&2
    ;;
  stop)
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
    ;;
  *) echo "usage: $0 start|stop|resume DIR" >&2; exit 2 ;;
esac
