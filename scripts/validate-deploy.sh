#!/usr/bin/env bash
# Validates the deployment files offline: no cluster, no Docker engine, no network beyond PyPI.
#
#   scripts/validate-deploy.sh [K8S_DIR [COMPOSE_FILE]]
#
# K8S_DIR (default deploy/kubernetes): every *.yaml / *.yml under it, recursively, is checked:
#   - parsed as YAML, duplicate keys refused;
#   - each Kubernetes object validated with kubernetes-validate in --strict mode (unknown fields
#     refused) against the schemas of every version in K8S_VERSIONS (default "1.30.0 1.37.0": an
#     older cluster and the newest schema the pinned kubernetes-validate ships); an object whose
#     kind/apiVersion has no schema there is an error, not a warning;
#   - references between them: ConfigMaps, Secrets (and their keys), PVCs and volumes that pods
#     name exist; probe and Service ports name a container port; selectors match pod labels;
#     the HPA's target exists and its containers request CPU;
#   - kustomization.yaml: every listed resource exists and is validated; when `kubectl` is on
#     PATH (or $KUBECTL names one), `kubectl kustomize` renders it (offline) and the rendered
#     objects are validated too.
# COMPOSE_FILE (default docker-compose.yml):
#   - validated against the Compose Specification schema (check-jsonschema's vendored copy);
#   - for no profile, each profile, and all of them: every `depends_on` names a service enabled
#     with it, `service_healthy` ones have a healthcheck, named volumes are declared, bind-mount
#     sources and build contexts exist (a Dockerfile target is a stage of it), host ports differ;
#   - when a Compose v2 CLI is found (`docker compose`, or $DOCKER_COMPOSE, or `docker-compose`
#     reporting v2), `config -q` for each of those profile sets (it needs no engine).
#
# Python packages (kubernetes-validate, check-jsonschema; versions pinned below) go into a
# temporary venv, removed at exit, or into FINETUNED_DEPLOY_VENV when set (kept and reused, so a
# second run needs no network). Exits non-zero on any error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_DIR="${1:-$ROOT/deploy/kubernetes}"
COMPOSE_FILE="${2:-$ROOT/docker-compose.yml}"
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
KV_VERSION=1.37.0   # kubernetes-validate: ships the schemas of Kubernetes 1.25 to 1.37
CJ_VERSION=0.39.0   # check-jsonschema: ships the Compose Specification schema

[ -d "$K8S_DIR" ] || { echo "validate-deploy: no such directory: $K8S_DIR" >&2; exit 2; }
[ -f "$COMPOSE_FILE" ] || { echo "validate-deploy: no such file: $COMPOSE_FILE" >&2; exit 2; }
K8S_DIR="$(cd "$K8S_DIR" && pwd)"
COMPOSE_FILE="$(cd "$(dirname "$COMPOSE_FILE")" && pwd)/$(basename "$COMPOSE_FILE")"

PYTHON="${PYTHON:-python3}"
if [ -n "${FINETUNED_DEPLOY_VENV:-}" ]; then
  VENV="$FINETUNED_DEPLOY_VENV"
else
  VENV="$(mktemp -d "${TMPDIR:-/tmp}/validate-deploy.XXXXXX")"
  trap 'rm -rf "$VENV"' EXIT
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" - "$KV_VERSION" "$CJ_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(version("kubernetes-validate") != sys.argv[1] or version("check-jsonschema") != sys.argv[2])
PY
then
  echo "== installing kubernetes-validate==$KV_VERSION check-jsonschema==$CJ_VERSION into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VERSION" "check-jsonschema==$CJ_VERSION"
fi

# A Compose v2 CLI, when there is one (`docker compose config` parses without an engine).
COMPOSE_CLI=""
if [ -n "${DOCKER_COMPOSE:-}" ]; then
  COMPOSE_CLI="$DOCKER_COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  COMPOSE_CLI="docker compose"
elif docker-compose version 2>/dev/null | grep -q 'version v\?2'; then
  COMPOSE_CLI="docker-compose"
fi
# kubectl, for `kubectl kustomize` (offline); KUBECTL= (empty) skips it, KUBECTL=PATH picks one.
KUBECTL="${KUBECTL-$(command -v kubectl || true)}"

FAILED=0

echo "== Kubernetes manifests in $K8S_DIR (schemas: $K8S_VERSIONS, strict)"
"$VENV/bin/python" - "$K8S_DIR" "$K8S_VERSIONS" "$KUBECTL" <<'PY' || FAILED=1
import os, subprocess, sys
import yaml
from kubernetes_validate.utils import validate, SchemaNotFoundError, VersionNotSupportedError, ValidationError

root, versions, kubectl = sys.argv[1], sys.argv[2].split(), sys.argv[3]
errors = []

def err(where, msg):
    errors.append(f"{where}: {msg}")
    print(f"ERROR {where}: {msg}")

class StrictLoader(yaml.SafeLoader):
    """Refuses duplicate keys in a mapping (PyYAML keeps the last one silently)."""
    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(k, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", k.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

def load_docs(text, where):
    try:
        return [d for d in yaml.load_all(text, Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        err(where, f"not valid YAML: {e}")
        return []

def check_schema(obj, where):
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        err(where, "not a Kubernetes object (apiVersion and kind are required)")
        return False
    name = f"{obj['kind']}/{(obj.get('metadata') or {}).get('name', '?')}"
    ok = True
    for v in versions:
        try:
            validate(obj, v, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path) or "(top)"
            err(where, f"{name} invalid for Kubernetes {v}: {path}: {e.message}")
            ok = False
        except SchemaNotFoundError as e:
            err(where, f"{name}: {e.message}")
            ok = False
        except VersionNotSupportedError as e:
            err(where, e.message)
            ok = False
    if ok:
        print(f"ok    {where}: {name}")
    return ok

files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith((".yaml", ".yml")))
if not files:
    err(root, "no manifests found")
objects = []          # (where, obj)
kustomizations = []   # (path, obj)
for path in files:
    rel = os.path.relpath(path, root)
    with open(path) as f:
        docs = load_docs(f.read(), rel)
    for i, d in enumerate(docs):
        where = rel if len(docs) == 1 else f"{rel}#{i + 1}"
        if isinstance(d, dict) and d.get("kind") == "Kustomization":
            kustomizations.append((path, d))
            continue
        if check_schema(d, where):
            objects.append((where, d))

# --- kustomization.yaml -------------------------------------------------------------------
for path, k in kustomizations:
    rel = os.path.relpath(path, root)
    if not str(k.get("apiVersion", "")).startswith("kustomize.config.k8s.io/"):
        err(rel, f"unexpected apiVersion {k.get('apiVersion')!r}")
    base = os.path.dirname(path)
    for r in k.get("resources") or []:
        if "://" in r:
            err(rel, f"remote resource {r!r}: the manifests must be self-contained")
        elif not os.path.exists(os.path.join(base, r)):
            err(rel, f"resource {r!r} does not exist")
    if "namespace" in k:
        err(rel, "sets a namespace: these manifests are meant to be namespace-agnostic")
    print(f"ok    {rel}: lists {len(k.get('resources') or [])} resources")
    if kubectl:
        run = subprocess.run([kubectl, "kustomize", base], capture_output=True, text=True)
        if run.returncode != 0:
            err(rel, f"`kubectl kustomize` failed: {run.stderr.strip()}")
        else:
            rendered = load_docs(run.stdout, f"{rel} (rendered)")
            for d in rendered:
                check_schema(d, f"{rel} (rendered by kubectl kustomize)")
            for d in rendered:
                if (d.get("metadata") or {}).get("namespace"):
                    err(rel, f"rendered {d['kind']}/{d['metadata']['name']} has a namespace")
    else:
        print(f"skip  {rel}: no kubectl on PATH, so the kustomization was not rendered")

# --- references between the objects ---------------------------------------------------------
by_kind = {}
for where, o in objects:
    by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = (where, o)

def pod_templates():
    for where, o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            yield where, o, o["spec"]["template"]
        elif o["kind"] == "Pod":
            yield where, o, o

def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

def has_key(kind, name, key):
    _, o = by_kind[kind][name]
    return key in (o.get("data") or {}) or key in (o.get("stringData") or {})

for where, o, tpl in pod_templates():
    spec = tpl.get("spec") or {}
    labels = (tpl.get("metadata") or {}).get("labels") or {}
    sel = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels") if o["kind"] != "Pod" else None
    if o["kind"] != "Pod" and not matches(sel, labels):
        err(where, f"selector {sel} does not match the pod template's labels {labels}")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for v in volumes.values():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
            err(where, f"volume {v['name']!r} names PVC {claim!r}, defined nowhere")
        for ref in ("configMap", "secret"):
            n = (v.get(ref) or {}).get("name") or (v.get(ref) or {}).get("secretName")
            kind = "ConfigMap" if ref == "configMap" else "Secret"
            if n and n not in by_kind.get(kind, {}) and not (v.get(ref) or {}).get("optional"):
                err(where, f"volume {v['name']!r} names {kind} {n!r}, defined nowhere")
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        cw = f"{where} container {c['name']!r}"
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                err(cw, f"mounts volume {m['name']!r}, which the pod does not define")
        for e in c.get("envFrom") or []:
            for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                n = (e.get(ref) or {}).get("name")
                if n and n not in by_kind.get(kind, {}) and not e[ref].get("optional"):
                    err(cw, f"envFrom names {kind} {n!r}, defined nowhere")
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                r = vf.get(ref)
                if not r:
                    continue
                if r["name"] not in by_kind.get(kind, {}):
                    err(cw, f"env {e['name']} names {kind} {r['name']!r}, defined nowhere")
                elif not r.get("optional") and not has_key(kind, r["name"], r["key"]):
                    err(cw, f"env {e['name']} needs key {r['key']!r} of {kind} {r['name']!r}, which it lacks")
        ports = {p.get("name") for p in c.get("ports") or []} | {p["containerPort"] for p in c.get("ports") or []}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = (c.get(probe) or {}).get("httpGet")
            if p and p["port"] not in ports:
                err(cw, f"{probe} uses port {p['port']!r}, which the container does not declare")

def templates_matching(selector):
    return [(w, o, t) for w, o, t in pod_templates() if o["kind"] != "Pod" and matches(selector, (t.get("metadata") or {}).get("labels") or {})]

for name, (where, svc) in by_kind.get("Service", {}).items():
    targets = templates_matching(svc["spec"].get("selector") or {})
    if not targets:
        err(where, f"Service {name}: its selector matches no pod template")
    for port in svc["spec"].get("ports") or []:
        tp = port.get("targetPort", port["port"])
        for w, o, t in targets:
            declared = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports") or []} | \
                       {p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports") or []}
            if tp not in declared:
                err(where, f"Service {name}: targetPort {tp!r} is no container port of {o['kind']}/{o['metadata']['name']}")
for name, (where, pdb) in by_kind.get("PodDisruptionBudget", {}).items():
    if not templates_matching((pdb["spec"].get("selector") or {}).get("matchLabels") or {}):
        err(where, f"PodDisruptionBudget {name}: its selector matches no pod template")
for name, (where, hpa) in by_kind.get("HorizontalPodAutoscaler", {}).items():
    ref = hpa["spec"]["scaleTargetRef"]
    target = by_kind.get(ref["kind"], {}).get(ref["name"])
    if not target:
        err(where, f"HPA {name}: target {ref['kind']}/{ref['name']} is defined nowhere")
        continue
    for m in hpa["spec"].get("metrics") or []:
        res = (m.get("resource") or {}).get("name")
        if m.get("type") == "Resource" and (m["resource"]["target"].get("type") == "Utilization"):
            for c in target[1]["spec"]["template"]["spec"]["containers"]:
                if res not in ((c.get("resources") or {}).get("requests") or {}):
                    err(where, f"HPA {name}: container {c['name']!r} requests no {res}, so its utilisation is undefined")

print(f"== Kubernetes: {len(objects)} objects, {len(errors)} error(s)")
sys.exit(1 if errors else 0)
PY

echo "== Compose file $COMPOSE_FILE"
if "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE_FILE"; then
  echo "ok    Compose Specification schema"
else
  FAILED=1
fi

SETS_FILE="$(mktemp "${TMPDIR:-/tmp}/validate-deploy-profiles.XXXXXX")"
"$VENV/bin/python" - "$COMPOSE_FILE" "$SETS_FILE" <<'PY' || FAILED=1
import os, re, sys
import yaml

path = sys.argv[1]
base = os.path.dirname(path)
with open(path) as f:
    doc = yaml.safe_load(f)
services = doc.get("services") or {}
declared_volumes = set((doc.get("volumes") or {}).keys())
profiles = sorted({p for s in services.values() for p in s.get("profiles") or []})
errors = []

def err(msg):
    errors.append(msg)
    print(f"ERROR {msg}")

def interpolate(value):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR and $$, from this environment."""
    return re.sub(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", _sub, str(value))

def _sub(m):
    if m.group(0) == "$$":
        return "$"
    if m.group(2):
        return os.environ.get(m.group(2), "")
    inner = m.group(1)
    mm = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)(.*))?$", inner, re.S)
    if not mm:
        err(f"bad interpolation ${{{inner}}}")
        return ""
    name, op, default = mm.group(1), mm.group(2), mm.group(3) or ""
    v = os.environ.get(name)
    if op in (":-", ":?"):
        return v if v else (default if op == ":-" else "")
    if op in ("-", "?"):
        return v if v is not None else (default if op == "-" else "")
    return v or ""

def stages(dockerfile):
    with open(dockerfile) as f:
        return {m.group(1).lower() for m in re.finditer(r"(?im)^\s*FROM\s+\S+(?:\s+AS\s+(\S+))?", f.read()) if m.group(1)}

# Per-service checks that do not depend on the profile.
for name, s in services.items():
    b = s.get("build")
    if b is not None:
        ctx = os.path.normpath(os.path.join(base, interpolate(b if isinstance(b, str) else b.get("context", "."))))
        if not os.path.isdir(ctx):
            err(f"service {name}: build context {ctx} does not exist")
        else:
            df = os.path.join(ctx, (b.get("dockerfile") if isinstance(b, dict) else None) or "Dockerfile")
            if not os.path.isfile(df):
                err(f"service {name}: {df} does not exist")
            elif isinstance(b, dict) and b.get("target") and b["target"].lower() not in stages(df):
                err(f"service {name}: build target {b['target']!r} is no stage of {df}")
    elif not s.get("image"):
        err(f"service {name}: neither image nor build")
    for v in s.get("volumes") or []:
        if isinstance(v, str):
            src = interpolate(v).split(":")[0] if ":" in v else None
            kind = None if src is None else ("bind" if src.startswith((".", "/", "~")) else "volume")
        else:
            src, kind = v.get("source"), v.get("type")
        if kind == "volume" and src and src not in declared_volumes:
            err(f"service {name}: named volume {src!r} is not declared under top-level volumes")
        if kind == "bind" and src:
            p = os.path.normpath(os.path.expanduser(src) if src.startswith("~") else os.path.join(base, src))
            # Compose creates a missing bind-mount directory (./models), but a file must exist.
            target = v.split(":")[1] if isinstance(v, str) else v.get("target", "")
            if not os.path.exists(p) and os.path.splitext(target)[1]:
                err(f"service {name}: bind-mounted file {p} does not exist")
    for ef in ([s["env_file"]] if isinstance(s.get("env_file"), str) else s.get("env_file") or []):
        p = ef if isinstance(ef, str) else ef.get("path")
        required = True if isinstance(ef, str) else ef.get("required", True)
        if required and not os.path.exists(os.path.join(base, p)):
            err(f"service {name}: env_file {p} does not exist")

profile_sets = [[]] + [[p] for p in profiles] + ([profiles] if len(profiles) > 1 else [])
for active in profile_sets:
    label = ",".join(active) or "(no profile)"
    enabled = {n for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & set(active)}
    ports = {}
    for name in sorted(enabled):
        s = services[name]
        deps = s.get("depends_on") or {}
        deps = {d: {} for d in deps} if isinstance(deps, list) else deps
        for d, spec in deps.items():
            if d not in services:
                err(f"[{label}] service {name}: depends_on {d!r}, which does not exist")
            elif d not in enabled and (spec or {}).get("required", True):
                err(f"[{label}] service {name}: depends_on {d!r}, which this profile set does not enable")
            elif (spec or {}).get("condition") == "service_healthy" and not (services[d].get("healthcheck") or {}).get("test"):
                err(f"[{label}] service {name}: waits for {d!r} to be healthy, but {d!r} has no healthcheck")
        for p in s.get("ports") or []:
            text = interpolate(p if not isinstance(p, dict) else f"{p.get('published', '')}:{p.get('target')}")
            parts = text.split(":")
            host = parts[-2] if len(parts) >= 2 else None
            if host:
                if host in ports:
                    err(f"[{label}] services {ports[host]} and {name} both publish host port {host}")
                ports[host] = name
    if not any(label in e for e in errors):
        print(f"ok    [{label}] {len(enabled)} services: {', '.join(sorted(enabled))}")

# The profile sets, one per line, for the Compose CLI check.
with open(sys.argv[2], "w") as f:
    f.writelines((" ".join(active) or "-") + "\n" for active in profile_sets)
sys.exit(1 if errors else 0)
PY
PROFILE_SETS="$(cat "$SETS_FILE")"
rm -f "$SETS_FILE"

if [ -n "$COMPOSE_CLI" ]; then
  while read -r set; do
    [ -n "$set" ] || continue
    args=()
    if [ "$set" != "-" ]; then for p in $set; do args+=(--profile "$p"); done; fi
    if $COMPOSE_CLI -f "$COMPOSE_FILE" "${args[@]}" config -q; then
      echo "ok    $COMPOSE_CLI config -q ${args[*]:-(no profile)}"
    else
      echo "ERROR $COMPOSE_CLI config -q ${args[*]:-(no profile)} failed"
      FAILED=1
    fi
  done <<<"$PROFILE_SETS"
else
  echo "skip  no Compose v2 CLI (docker compose / docker-compose v2 / \$DOCKER_COMPOSE): 'config -q' not run"
fi

if [ "$FAILED" -ne 0 ]; then
  echo "validate-deploy: FAILED"
  exit 1
fi
echo "validate-deploy: all checks passed"
