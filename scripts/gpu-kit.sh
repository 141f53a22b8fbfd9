#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on a GPU machine into a git-ignored folder of this repo, so that
# it travels with the working tree (name the folder in the device call's `carry`):
#   scripts/gpu-kit.sh [BINARY] [KIT_DIR]
#   BINARY   a release build with `--features cuda` (default target/release/finetuned); build it
#            with the toolkit of the device driver's CUDA version or older (scripts/cuda-toolchain.sh)
#   KIT_DIR  default .gpu, inside the repo; added to .git/info/exclude (never to .gitignore)
# SHARED (default: the shared/ folder beside or inside the repo) holds the sources: the
# tokenizer of models/all-minilm-l6-v2, bench/reference/{finetune,predict}_ref.py, datasets/sst2.
# The kit: finetuned.xz (stripped, xz -9), tok/, reference/, sst2/ and kit-info.txt. The script
# stops if the kit plus the rest of what travels (tracked and untracked, not ignored, files)
# exceeds the device's 64 MiB, and copies nothing into tracked files.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
BIN=${1:-target/release/finetuned}
KIT=${2:-.gpu}
LIMIT=$((64 * 1024 * 1024))
if [[ -z ${SHARED:-} ]]; then
  for d in "$REPO/shared" "$REPO/../shared"; do [[ -d $d/bench/reference ]] && { SHARED=$d; break; }; done
fi
[[ -n ${SHARED:-} && -d $SHARED ]] || { echo "no shared/ folder found: set SHARED" >&2; exit 1; }
[[ -f $BIN ]] || { echo "no binary at $BIN: build it with --features cuda (README, GPU build)" >&2; exit 1; }
if [[ $(readelf -d "$BIN" 2>/dev/null || true) != *"[libcuda.so.1]"* ]]; then
  echo "$BIN does not link libcuda.so.1: not a --features cuda build" >&2; exit 1
fi
PTX=$(grep -a -o -m1 'Cuda compilation tools, release [0-9.]*, V[0-9.]*' "$BIN" | head -n1 || true)
TARGET=$(grep -a -o -m1 '^\.target sm_[0-9a-z]*' "$BIN" | head -n1 || true)

# The kit must be inside the repo to travel, and ignored so that it is never committed.
mkdir -p "$KIT"
KIT=$(cd "$KIT" && pwd)
case $KIT/ in
  "$REPO"/*/)
    rel=${KIT#"$REPO"/}
    EXCLUDE=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$EXCLUDE")"
    grep -qxF "/$rel/" "$EXCLUDE" 2>/dev/null || echo "/$rel/" >> "$EXCLUDE"
    if [[ -n $(git ls-files -- "$rel") ]]; then
      echo "$rel holds tracked files: pick another KIT_DIR" >&2; exit 1
    fi
    git check-ignore -q "$rel/x" || { echo "$rel is not ignored by git: check $EXCLUDE" >&2; exit 1; } ;;
  *) echo "warning: $KIT is outside the repo; only a folder inside it travels to the device" >&2 ;;
esac

rm -rf "$KIT/finetuned.xz" "$KIT/tok" "$KIT/reference" "$KIT/sst2" "$KIT/kit-info.txt"
mkdir -p "$KIT/tok" "$KIT/reference" "$KIT/sst2"
TMP=$(mktemp)
trap 'rm -f "$TMP"' EXIT
strip -o "$TMP" "$BIN"
xz -9 -T0 -c "$TMP" > "$KIT/finetuned.xz"
TOK=$SHARED/models/all-minilm-l6-v2
cp "$TOK/tokenizer.json" "$TOK/vocab.txt" "$KIT/tok/"
for f in tokenizer_config.json special_tokens_map.json; do [[ -f $TOK/$f ]] && cp "$TOK/$f" "$KIT/tok/"; done
cp "$SHARED/bench/reference/finetune_ref.py" "$SHARED/bench/reference/predict_ref.py" "$KIT/reference/"
cp "$SHARED/datasets/sst2/train.jsonl" "$SHARED/datasets/sst2/validation.jsonl" "$SHARED/datasets/sst2/test.jsonl" "$KIT/sst2/"
chmod -R u+w "$KIT"
{
  echo "made $(date -u +%FT%TZ) from $(git describe --always --dirty 2>/dev/null || echo '?')"
  echo "binary $BIN, $(stat -c %s "$BIN") bytes, stripped $(stat -c %s "$TMP"), xz $(stat -c %s "$KIT/finetuned.xz"), sha256 $(sha256sum "$TMP" | cut -c1-16)"
  echo "kernels: ${PTX:-no PTX header found} ${TARGET:+($TARGET)}"
} > "$KIT/kit-info.txt"

# What travels: the kit, plus the tracked and untracked-but-not-ignored files (shared/ when inside).
kit_bytes=$(du -sb "$KIT" | cut -f1)
tree_bytes=$(git ls-files -z -c -o --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{ s += $1 } END { print s + 0 }') || true
total=$((kit_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
sed 's/^/[kit] /' "$KIT/kit-info.txt"
echo "[kit] $KIT: $(mib "$kit_bytes"); with the rest of the working tree ($(mib "$tree_bytes")): $(mib "$total") of 64 MiB"
if (( total > LIMIT )); then
  echo "over the device's 64 MiB: untracked files or the binary are too big" >&2; exit 1
fi
echo "[kit] on the device, from the repo root, carrying ${KIT#"$REPO"/}: KIT=${KIT#"$REPO"/} bash bench/gpu.sh"
