#!/usr/bin/env bash
# Ours (the `cuda` build) against PyTorch on the same GPU, in one call of at most ~10 minutes.
#
#   scripts/gpu-kit.sh target/release/finetuned   # here: packs the kit into .gpu/ (git-ignored)
#   KIT=.gpu bash bench/gpu.sh                     # there: from the repo root, .gpu carried along
#
# The kit (scripts/gpu-kit.sh makes it; everything that travels must stay under 64 MiB):
#   $KIT/finetuned.xz   the release binary built with `--features cuda`, stripped, xz-compressed.
#                       Build it with the toolkit wheels of the device driver's CUDA version or
#                       older (driver 580.x = CUDA 13.0: scripts/cuda-toolchain.sh's default 13.0.2);
#                       a driver refuses the PTX of a newer toolkit.
#   $KIT/tok/           tokenizer.json and vocab.txt of all-minilm-l6-v2
#   $KIT/reference/     finetune_ref.py and predict_ref.py (both take --device and --dtype)
#   $KIT/sst2/          train/validation/test.jsonl
# The machine must have python3 with torch and transformers (the PyTorch side, the random models
# and bench/short_texts.py) and nvidia-smi; our binary borrows the CUDA 13 libraries of PyTorch's
# wheels (cublas, cublasLt, curand, nvrtc, cudart) and the driver's libcuda.so.1.
#
# Both sides get the same random-init encoders (made here, seed 0): MiniLM's shape (6 layers,
# hidden 384), bert-base's (12 x 768), ModernBERT-base's and DeBERTa-v3-small's (their rows come
# last: run them with ROWS="warmup modernbert_bf16_b32 deberta_bf16_b32 modernbert_bf16_b32_len512"
# when the budget stops before them), with all-minilm-l6-v2's tokenizer. Training: SST-2's
# first 8,000 rows, 1 epoch, lr 5e-5, seed 42, max-len 64 (one row 256), CLS pooling, the two
# sides alternately (ours, then PyTorch, per row). Predict: one random-init bert-base classifier;
# ours over HTTP (`finetuned serve` + `finetuned bench-serve`), PyTorch in-process
# (predict_ref.py): batch 32 texts/s on predict_ref's 2,048-text pool, and the p50 of single
# short texts (bench/short_texts.py writes the very texts predict_ref.py times).
# GPU memory per step: the peak of nvidia-smi's memory.used (sampled every 100 ms) minus what
# was in use before the step; and what each side reports itself: our train report's
# `peak_gpu_mib`, and torch.cuda.max_memory_reserved() of the reference (through a wrapper).
#
# Environment (all optional): KIT (.gpu), BUDGET (540: seconds for the whole script; every step
# has its own timeout and is cut or skipped to fit), ROWS (the row ids to run, space-separated,
# default all; see `rows` below; keep `warmup` first: the driver compiles the PTX of the kernels
# a run uses at their first use, ~15 s, which would otherwise land in the first row's timings), DEVICE (cuda), THREADS (8: --threads of both sides), MAX_TRAIN
# (8000), PY (python3). Results: a table on stdout and in $OUT/table.md, the numbers in
# $OUT/summary.json, every log and report in $OUT/results.tgz.
set -u
export LC_ALL=C PYTHONUNBUFFERED=1 NO_COLOR=1
# Our server is on loopback: no proxy for bench-serve (reqwest reads these) nor for urllib.
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$(date +%s)
BUDGET=${BUDGET:-540}
KIT=$(cd "${KIT:-.gpu}" 2>/dev/null && pwd) || { echo "no kit at ${KIT:-.gpu}: run scripts/gpu-kit.sh first" >&2; exit 2; }
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}
MAX_TRAIN=${MAX_TRAIN:-8000}
PY=${PY:-python3}
GPU_INDEX=${DEVICE#cuda}; GPU_INDEX=${GPU_INDEX#:}; GPU_INDEX=${GPU_INDEX:-0}
W=$(mktemp -d)                 # models, data dirs, the unpacked binary
R=$W/results; mkdir -p "$R"    # every log and JSON; packed into $OUT/results.tgz at the end
OUT=${OUT:-$W/out}; mkdir -p "$OUT"
DATA=$KIT/sst2
REF=$KIT/reference
BIN=$W/finetuned
SRV=""

left() { echo $((BUDGET - ($(date +%s) - T0))); }
log() { echo "[$(($(date +%s) - T0))s] $*"; }

# --- GPU memory: nvidia-smi samples, one file per step ---------------------------------------
gpu_used() {  # MiB in use on our GPU now ("" without nvidia-smi)
  nvidia-smi -i "$GPU_INDEX" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1 | tr -dc '0-9'
}
SAMPLER=""
sampler_start() {  # sampler_start NAME: baseline now, then a sample every 100 ms
  gpu_used > "$R/$1.smi0"
  nvidia-smi -i "$GPU_INDEX" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
    > "$R/$1.smi" 2>/dev/null &
  SAMPLER=$!
}
sampler_stop() {
  [ -n "$SAMPLER" ] && { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; }
  SAMPLER=""
}

# --- steps: each under its own timeout, cut to what the budget has left -----------------------
# step NAME TIMEOUT CMD...: runs CMD with its output in $R/NAME.log; one line per step in
# $R/steps.tsv (name, exit status, seconds; 124 = timed out, skip = not run).
step() {
  local name=$1 t=$2; shift 2
  local l; l=$(left)
  if (( l < 15 )); then
    log "[skip] $name: ${l}s of the budget left"; printf '%s\tskip\t0\n' "$name" >> "$R/steps.tsv"; return 0
  fi
  (( t > l - 5 )) && t=$((l - 5))
  log "[run] $name (timeout ${t}s)"
  local s; s=$(date +%s%N)
  sampler_start "$name"
  timeout -k 5 "$t" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  sampler_stop
  local secs; secs=$(( ($(date +%s%N) - s) / 1000000 ))
  printf '%s\t%s\t%d.%03d\n' "$name" "$rc" $((secs / 1000)) $((secs % 1000)) >> "$R/steps.tsv"
  log "[done] $name rc=$rc in $((secs / 1000))s"
  (( rc == 0 )) || tail -n 5 "$R/$name.log" | sed "s/^/    [$name] /"
  return 0
}

# The reference under a wrapper that also writes torch's own GPU memory peaks to $TORCH_MEM.
TORCH_WRAP='import atexit, json, os, runpy, sys
import torch
def dump():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(os.environ["TORCH_MEM"], "w") as f:
            json.dump({"max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
                       "max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20}, f)
atexit.register(dump)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")'
ref() {  # ref NAME TIMEOUT SCRIPT ARGS...
  local name=$1 t=$2; shift 2
  step "$name" "$t" env TORCH_MEM="$R/$name.torchmem.json" "$PY" -c "$TORCH_WRAP" "$@"
}

finish() {
  sampler_stop
  if [ -n "$SRV" ]; then kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null; fi
  table
  tar czf "$OUT/results.tgz" -C "$W" results 2>/dev/null
  rm -rf "$W/models" "$W/serve" "$W/data-"* "$BIN"
}
trap finish EXIT
exec > >(tee "$R/log.txt") 2>&1

# --- the table ------------------------------------------------------------------------------
table() {
  log "total $(($(date +%s) - T0))s of ${BUDGET}s"
  "$PY" - "$R" "$OUT" "${ROWS_ASKED:-}" <<'PYEOF'
import json, os, re, sys

R, OUT, asked = sys.argv[1], sys.argv[2], sys.argv[3].split()

def load(name):
    try:
        with open(f"{R}/{name}.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

steps = {}
try:
    for line in open(f"{R}/steps.tsv"):
        name, rc, secs = line.rstrip("\n").split("\t")
        steps[name] = (rc, float(secs))
except OSError:
    pass

def smi_peak(name):
    """Peak MiB in use during the step minus what was in use before it."""
    try:
        base = int(open(f"{R}/{name}.smi0").read().strip() or 0)
        vals = [int(x) for x in open(f"{R}/{name}.smi").read().split() if x.isdigit()]
    except (OSError, ValueError):
        return None
    return max(vals) - base if vals else None

def torch_mem(name):
    try:
        return json.load(open(f"{R}/{name}.torchmem.json"))["max_reserved_mib"]
    except (OSError, ValueError, KeyError):
        return None

def status(name):
    rc = steps.get(name, ("not run", 0))[0]
    return {"0": None, "124": "timed out", "skip": "skipped (budget)", "not run": "not run"}.get(rc, f"failed (rc {rc})")

def fmt(x, nd=1):
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

rows, summary = [], []

def add(row, metric, ours, ref, ours_name, ref_name, acc=(None, None), mem_self=(None, None)):
    o, p = ours, ref
    ratio = o / p if (o is not None and p) else None
    so, sp = status(ours_name), status(ref_name)
    d = {"row": row, "metric": metric, "ours": o, "pytorch": p, "ours_over_pytorch": ratio,
         "ours_status": so or "ok", "pytorch_status": sp or "ok",
         "test_acc_ours": acc[0], "test_acc_pytorch": acc[1],
         "gpu_peak_mib_smi_ours": smi_peak(ours_name) if ours_name in steps else None,
         "gpu_peak_mib_smi_pytorch": smi_peak(ref_name) if ref_name in steps else None,
         "gpu_peak_mib_self_ours": mem_self[0], "gpu_peak_mib_self_pytorch": mem_self[1],
         "seconds_ours": steps.get(ours_name, (0, None))[1], "seconds_pytorch": steps.get(ref_name, (0, None))[1]}
    summary.append(d)
    rows.append([row, metric, so or fmt(o), sp or fmt(p), fmt(ratio, 2),
                 f"{fmt(acc[0], 4)} / {fmt(acc[1], 4)}",
                 f"{fmt(d['gpu_peak_mib_smi_ours'])} / {fmt(d['gpu_peak_mib_smi_pytorch'])}",
                 f"{fmt(mem_self[0], 0)} / {fmt(mem_self[1], 0)}"])

TRAIN = [("minilm_f32_b32", "MiniLM f32 b32"), ("bertbase_bf16_b32", "bert-base bf16 b32"),
         ("bertbase_f32_b32", "bert-base f32 b32"), ("bertbase_bf16_b128", "bert-base bf16 b128"),
         ("minilm_bf16_b128", "MiniLM bf16 b128"), ("bertbase_bf16_b32_len256", "bert-base bf16 b32 max-len 256"),
         ("modernbert_bf16_b32", "ModernBERT-base bf16 b32"), ("modernbert_bf16_b32_len512", "ModernBERT-base bf16 b32 max-len 512"),
         ("deberta_bf16_b32", "DeBERTa-v3-small bf16 b32")]
for rid, label in TRAIN:
    o, p = load(f"ours_{rid}") or {}, load(f"ref_{rid}") or {}
    add(label, "train ex/s (higher is better)", o.get("train_examples_per_s"), p.get("train_examples_per_s"),
        f"ours_{rid}", f"ref_{rid}", acc=(o.get("test_accuracy"), p.get("test_accuracy")),
        mem_self=(o.get("peak_gpu_mib"), torch_mem(f"ref_{rid}")))

for dt in ("f32", "bf16"):
    srv = f"ours_serve_{dt}"
    b32, b1, p = load(f"ours_predict_{dt}_b32") or {}, load(f"ours_predict_{dt}_single") or {}, load(f"ref_predict_{dt}") or {}
    info = load(f"ours_info_{dt}") or {}
    tag = f"bert-base predict {dt}" + ("" if info.get("predict_dtype", dt) == dt else f" (server ran {info['predict_dtype']})")
    add(tag, "batch 32 texts/s (higher is better)", b32.get("texts_per_s"),
        (p.get("throughput") or {}).get("e2e_seq_per_s"), f"ours_predict_{dt}_b32", f"ref_predict_{dt}",
        mem_self=(None, torch_mem(f"ref_predict_{dt}")))
    # The server's memory: its whole life (start, model load, both loads) against predict_ref's run.
    summary[-1]["gpu_peak_mib_smi_ours"] = smi_peak(srv) if srv in steps else None
    rows[-1][6] = f"{fmt(summary[-1]['gpu_peak_mib_smi_ours'])} / {fmt(summary[-1]['gpu_peak_mib_smi_pytorch'])}"
    add(tag, "single text p50 ms (lower is better)", (b1.get("latency_ms") or {}).get("p50"),
        (p.get("latency_batch1") or {}).get("p50_ms"), f"ours_predict_{dt}_single", f"ref_predict_{dt}")
    rows[-1][6] = rows[-2][6]
    if steps.get(srv, ("skip",))[0] not in ("0", "skip"):  # ours never got to run: say why
        for i in (-1, -2):
            rows[i][2] = summary[i]["ours_status"] = f"server failed ({srv}.log)"

head = ["row", "metric", "ours", "PyTorch", "ours/PyTorch", "test acc ours / PyTorch",
        "GPU MiB nvidia-smi ours / PyTorch", "GPU MiB self-reported ours / PyTorch"]
out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
notes = ["",
         "GPU MiB, nvidia-smi: peak memory.used during the step minus what was in use before it (ours in predict: "
         "the server's whole life, both loads). Self-reported, ours: the train report's peak_gpu_mib (the device's "
         "used memory after each backward pass, what nvidia-smi shows, baseline included); PyTorch: "
         "torch.cuda.max_memory_reserved() (its caching allocator only, no CUDA context). "
         "ours/PyTorch > 1: ours does more per second, or (p50 ms) takes longer."]
skipped = set()
for name, (rc, _) in steps.items():
    if rc == "skip":
        rid = name.partition("_")[2]
        m = re.match(r"(?:serve|predict)_(f32|bf16)", rid)
        skipped.add(f"predict_{m.group(1)}" if m else rid)
if skipped:
    # A new call compiles the PTX again: the warm-up leads.
    again = ["warmup"] + [r for r in asked if r in skipped and r != "warmup"] + sorted(skipped - set(asked) - {"warmup"})
    notes.append("Skipped for the budget; to run them in another call: ROWS=\"" + " ".join(again) + "\"")
text = "\n".join(out + notes)
print()
print(text)
with open(f"{OUT}/table.md", "w") as f:
    f.write(text + "\n")
with open(f"{OUT}/summary.json", "w") as f:
    json.dump({"rows": summary, "steps": {k: {"rc": v[0], "seconds": v[1]} for k, v in steps.items()}}, f, indent=1)
PYEOF
}

# --- the machine, the libraries, the binary -------------------------------------------------
log "kit $KIT, device $DEVICE, budget ${BUDGET}s, work dir $W"
[ -f "$KIT/kit-info.txt" ] && sed 's/^/[kit] /' "$KIT/kit-info.txt"
for f in finetuned.xz tok/tokenizer.json tok/vocab.txt reference/finetune_ref.py reference/predict_ref.py \
         sst2/train.jsonl sst2/validation.jsonl sst2/test.jsonl; do
  [ -e "$KIT/$f" ] || { echo "the kit lacks $f: run scripts/gpu-kit.sh" >&2; exit 2; }
done
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | sed 's/^/[gpu] /'
DRIVER_CUDA=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n1)
log "driver's CUDA version: ${DRIVER_CUDA:-unknown}"
"$PY" -c "import torch, transformers; print('[py] torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

# PyTorch's CUDA libraries (its nvidia-* wheels) and the driver's libcuda.so.1, wherever they are.
LIBS=$("$PY" - <<'PYEOF'
import glob, os
try:
    import nvidia
    bases = list(nvidia.__path__)
except ImportError:
    bases = []
print(":".join(sorted({os.path.dirname(f) for b in bases for f in glob.glob(b + "/**/lib*.so*", recursive=True)})))
PYEOF
)
DRV=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{ print $NF; exit }')
[ -n "$DRV" ] || DRV=$(find / -name libcuda.so.1 -path '*nvidia*' 2>/dev/null | head -n1)
export LD_LIBRARY_PATH=$LIBS${DRV:+:$(dirname "$DRV")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# candle's kernels are PTX that the driver compiles at first use: cache all of it for this run.
export CUDA_CACHE_PATH=$W/nv-cache CUDA_CACHE_MAXSIZE=4294967296

if ! { xz -dc "$KIT/finetuned.xz" > "$BIN" && chmod +x "$BIN"; }; then
  echo "cannot unpack $KIT/finetuned.xz" >&2; exit 2
fi
PTX=$(grep -a -o -m1 'Cuda compilation tools, release [0-9.]*, V[0-9.]*' "$BIN" | head -n1)
log "kernels built by: ${PTX:-no PTX found: not a cuda build?}"
PTX_CUDA=$(echo "$PTX" | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
if [ -n "$PTX_CUDA" ] && [ -n "$DRIVER_CUDA" ] && [ "$(printf '%s\n' "$PTX_CUDA" "$DRIVER_CUDA" | sort -V | tail -n1)" != "$DRIVER_CUDA" ]; then
  log "WARNING: the kernels come from CUDA $PTX_CUDA, newer than the driver's $DRIVER_CUDA: expect" \
      "CUDA_ERROR_UNSUPPORTED_PTX_VERSION; rebuild with scripts/cuda-toolchain.sh '' 90 $DRIVER_CUDA"
fi
ldd "$BIN" | grep -E 'not found|libcu|nvrtc|curand' | sed 's/^/[ldd] /'
"$BIN" --version

# --- the random models (both sides load these very files) -----------------------------------
mkdir -p "$W/models" "$W/serve"
W=$W KIT=$KIT "$PY" - <<'PYEOF' || { echo "could not make the models" >&2; exit 2; }
import json, os, shutil, torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, DebertaV2Config, DebertaV2Model, ModernBertConfig,
                          ModernBertModel)
W, KIT = os.environ["W"], os.environ["KIT"]
def config(layers, hidden, **kw):
    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12,
                      intermediate_size=4 * hidden, pad_token_id=0, **kw)
made = [("models/minilm", BertModel, config(6, 384)), ("models/bertbase", BertModel, config(12, 768)),
        ("serve/bertbase-cls", BertForSequenceClassification,
         config(12, 768, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})),
        # The encoders of part 2 at their real shapes, over MiniLM's vocabulary (its ids fit).
        ("models/modernbert", ModernBertModel,
         ModernBertConfig(vocab_size=30522, pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102)),
        ("models/deberta", DebertaV2Model,
         DebertaV2Config(vocab_size=30522, hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=512, relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
                         share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0, pad_token_id=0,
                         layer_norm_eps=1e-7, pooler_hidden_size=768, pooler_hidden_act="gelu", pooler_dropout=0.0))]
for path, cls, cfg in made:
    torch.manual_seed(0)
    d = f"{W}/{path}"
    cls(cfg).save_pretrained(d, safe_serialization=True)
    for f in os.listdir(f"{KIT}/tok"):
        shutil.copy(f"{KIT}/tok/{f}", d)
    if cls in (ModernBertModel, DebertaV2Model):
        # Their own tokenizer classes would look for their own files: MiniLM's is a BERT one.
        json.dump({"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": 512},
                  open(f"{d}/tokenizer_config.json", "w"))
print("[models] made", ", ".join(p for p, _, _ in made))
PYEOF

# --- the rows ---------------------------------------------------------------------------------
train_row() {  # train_row ID SHAPE DTYPE BATCH MAXLEN OURS_TIMEOUT REF_TIMEOUT
  local id=$1 shape=$2 dt=$3 bs=$4 ml=$5
  local args=(--model "$W/models/$shape" --data "$DATA" --epochs 1 --batch-size "$bs" --lr 5e-5 --max-len "$ml"
              --seed 42 --max-train "$MAX_TRAIN" --threads "$THREADS" --device "$DEVICE" --dtype "$dt")
  step "ours_$id" "$6" "$BIN" train "${args[@]}" --pooling cls --out "$R/ours_$id.json"
  ref "ref_$id" "$7" "$REF/finetune_ref.py" "${args[@]}" --out "$R/ref_$id.json"
}

http_get() {  # http_get URL [FILE]: exit status 0 on a 2xx answer
  "$PY" - "$@" <<'PYEOF'
import sys, urllib.request
try:
    body = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=5).read()
except Exception:
    sys.exit(1)
if len(sys.argv) > 2:
    open(sys.argv[2], "wb").write(body)
PYEOF
}

predict_row() {  # predict_row DTYPE PORT
  local dt=$1 port=$2 url=http://127.0.0.1:$2 srv=ours_serve_$1
  if (( $(left) < 60 )); then
    log "[skip] predict $dt: $(left)s of the budget left"
    printf '%s\tskip\t0\n' "$srv" "ours_predict_${dt}_b32" "ours_predict_${dt}_single" "ref_predict_$dt" >> "$R/steps.tsv"
    return 0
  fi
  log "[run] $srv"
  sampler_start "$srv"
  local s; s=$(date +%s)
  "$BIN" serve --addr "127.0.0.1:$port" --data-dir "$W/data-$dt" --models-dir "$W/serve" --device "$DEVICE" \
    --predict-dtype "$dt" --max-concurrent-predicts 256 > "$R/$srv.log" 2>&1 &
  SRV=$!
  local ready=0
  for _ in $(seq 120); do
    http_get "$url/readyz" && { ready=1; break; }
    kill -0 "$SRV" 2>/dev/null || break
    sleep 0.5
  done
  if (( ready )); then
    http_get "$url/v1/info" "$R/ours_info_$dt.json"
    # The first predict loads the model and compiles the PTX it needs: not timed.
    step "ours_predict_${dt}_warm" 60 "$BIN" bench-serve --url "$url" --model bertbase-cls --texts "$W/pool.jsonl" \
      --clients 1 --batch 32 --duration 2 --warmup 2 --timeout 55
    step "ours_predict_${dt}_b32" 30 "$BIN" bench-serve --url "$url" --model bertbase-cls --texts "$W/pool.jsonl" \
      --clients 1 --batch 32 --duration 10 --out "$R/ours_predict_${dt}_b32.json"
    step "ours_predict_${dt}_single" 30 "$BIN" bench-serve --url "$url" --model bertbase-cls --texts "$W/short.jsonl" \
      --clients 1 --batch 1 --duration 8 --out "$R/ours_predict_${dt}_single.json"
  else
    log "the server did not get ready"; tail -n 5 "$R/$srv.log" | sed "s/^/    [$srv] /"
  fi
  kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null; SRV=""
  sampler_stop
  printf '%s\t%s\t%d\n' "$srv" $(( ready ? 0 : 1 )) $(( $(date +%s) - s )) >> "$R/steps.tsv"
  ref "ref_predict_$dt" 75 "$REF/predict_ref.py" --model "$W/serve/bertbase-cls" --data "$DATA" --device "$DEVICE" \
    --dtype "$dt" --threads "$THREADS" --out "$R/ref_predict_$dt.json"
}

# predict_ref.py's pool (test, then validation: the first 2,048 texts) and its single texts.
cat "$DATA/test.jsonl" "$DATA/validation.jsonl" | head -n 2048 > "$W/pool.jsonl"
"$PY" "$HERE/short_texts.py" --model "$W/serve/bertbase-cls" --data "$DATA" --out "$W/short.jsonl" | sed 's/^/[short texts] /'

# In the order they run (the most wanted first; the table keeps its own order). A row that finds
# less than a minute of the budget left is skipped; ROWS="id ..." runs only those rows.
rows="warmup minilm_f32_b32 bertbase_bf16_b32 predict_f32 predict_bf16 bertbase_f32_b32 bertbase_bf16_b128 minilm_bf16_b128 bertbase_bf16_b32_len256 modernbert_bf16_b32 deberta_bf16_b32 modernbert_bf16_b32_len512"
ROWS_ASKED=${ROWS:-$rows}
for row in $ROWS_ASKED; do
  if (( $(left) < 60 )) && [ "${row#predict}" = "$row" ]; then
    log "[skip] $row: $(left)s of the budget left"
    printf '%s\tskip\t0\n' "ours_$row" "ref_$row" >> "$R/steps.tsv"
    continue
  fi
  case $row in
    # A small run first: the driver compiles the PTX of candle's kernels (~15 s), cached for the rest.
    warmup) step ours_warmup 90 "$BIN" train --model "$W/models/minilm" --data "$DATA" --max-train 64 --epochs 1 \
              --batch-size 8 --max-len 64 --device "$DEVICE" --dtype bf16 --pooling cls --out "$R/ours_warmup.json" ;;
    minilm_f32_b32)           train_row "$row" minilm f32 32 64 75 60 ;;
    bertbase_bf16_b32)        train_row "$row" bertbase bf16 32 64 110 75 ;;
    bertbase_f32_b32)         train_row "$row" bertbase f32 32 64 110 75 ;;
    bertbase_bf16_b128)       train_row "$row" bertbase bf16 128 64 90 60 ;;
    minilm_bf16_b128)         train_row "$row" minilm bf16 128 64 60 50 ;;
    bertbase_bf16_b32_len256) train_row "$row" bertbase bf16 32 256 110 75 ;;
    modernbert_bf16_b32)      train_row "$row" modernbert bf16 32 64 110 75 ;;
    modernbert_bf16_b32_len512) train_row "$row" modernbert bf16 32 512 150 110 ;;
    deberta_bf16_b32)         train_row "$row" deberta bf16 32 64 110 75 ;;
    predict_f32)              predict_row f32 8181 ;;
    predict_bf16)             predict_row bf16 8182 ;;
    *) log "unknown row $row (rows: $rows)" ;;
  esac
done
