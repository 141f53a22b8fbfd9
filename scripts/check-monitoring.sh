#!/usr/bin/env bash
# Checks the monitoring assets offline: no Prometheus server, no Grafana.
#
#   scripts/check-monitoring.sh
#
# - deploy/prometheus/finetuned-rules.yml: `promtool check rules`, then the unit tests in
#   finetuned-rules.test.yml (`promtool test rules`);
# - deploy/grafana/finetuned.json: parses as JSON, every panel queries the `datasource` variable
#   (so the dashboard imports on any Grafana), and every query is valid PromQL (promtool checks it
#   as a recording rule, with the dashboard's variables filled in).
#
# promtool comes from Debian's `prometheus` package, installed with apt-get when it is missing
# (as root, or through sudo). Exits non-zero on any error. Which metric names the server
# exports is checked by tests/api/monitoring.rs, not here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RULES="$ROOT/deploy/prometheus/finetuned-rules.yml"
RULE_TESTS="$ROOT/deploy/prometheus/finetuned-rules.test.yml"
DASHBOARD="$ROOT/deploy/grafana/finetuned.json"

if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null; then
    SUDO=(sudo)
  else
    echo "check-monitoring: promtool is missing and apt-get needs root (or sudo)" >&2
    exit 2
  fi
  echo "== installing promtool (Debian's prometheus package)"
  # A fresh image has no package lists yet: fetch them only when the first try fails.
  install=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus)
  "${install[@]}" >/dev/null || { "${SUDO[@]}" apt-get update -q >/dev/null && "${install[@]}" >/dev/null; }
fi
promtool --version 2>&1 | head -n 1

FAILED=0

echo "== promtool check rules"
promtool check rules "$RULES" || FAILED=1

echo "== promtool test rules"
promtool test rules "$RULE_TESTS" || FAILED=1

echo "== Grafana dashboard $DASHBOARD"
QUERIES="$(mktemp "${TMPDIR:-/tmp}/check-monitoring.XXXXXX")"
trap 'rm -f "$QUERIES"' EXIT
if python3 - "$DASHBOARD" "$QUERIES" <<'PY'
import json, sys

with open(sys.argv[1]) as f:
    dash = json.load(f)
panels = [p for top in dash["panels"] for p in [top] + top.get("panels", [])]
errors, rules = [], []
ids = [p["id"] for p in panels]
if len(ids) != len(set(ids)):
    errors.append(f"panel ids repeat: {sorted(ids)}")
for p in panels:
    if p["type"] == "row":
        continue
    # A fixed data source uid would tie the dashboard to the Grafana it was made on.
    if p.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"panel {p['title']!r} does not query the ${{datasource}} variable")
    for t in p.get("targets", []):
        expr = t["expr"].replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId']}", "expr": expr})
for e in errors:
    print(f"ERROR {e}")
# JSON is YAML, so promtool reads this file as it is.
with open(sys.argv[2], "w") as f:
    json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
sys.exit(1 if errors else 0)
PY
then
  echo "ok    parses; every panel uses \${datasource}"
else
  FAILED=1
fi
# The queries' file is empty when the dashboard did not parse.
if [ -s "$QUERIES" ]; then
  echo "== the dashboard's queries, checked as recording rules"
  promtool check rules "$QUERIES" || FAILED=1
fi

if [ "$FAILED" -ne 0 ]; then
  echo "check-monitoring: FAILED"
  exit 1
fi
echo "check-monitoring: all checks passed"
