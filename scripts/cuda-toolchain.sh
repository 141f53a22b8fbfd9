#!/usr/bin/env bash
# Installs a CUDA toolchain from PyPI (Debian's main archive has none) into a venv and prints the
# environment that `cargo build --release --features cuda` needs to compile AND link, also on a
# machine with no GPU, no NVIDIA driver and no CUDA toolkit. Usage:
#   eval "$(scripts/cuda-toolchain.sh [VENV_DIR] [COMPUTE_CAP] [CUDA_VERSION])"
#   cargo build --release --features cuda
# COMPUTE_CAP is the GPU's compute capability without the dot (default 90: H100/H200).
# CUDA_VERSION (also read from the environment variable of that name; default 13.0.2) is the
# version of NVIDIA's `cuda-toolkit` wheels: 13.Y.Z pins one release, 13.Y the newest 13.Y.*.
# Pick it from the driver of the machine that RUNS the binary, never newer than the CUDA
# version its `nvidia-smi` reports: candle's kernels travel as PTX that the driver compiles at
# first use, and a driver refuses PTX from a newer toolkit. 13.0.2 fits driver branch 580
# (CUDA 13.0; the H200 we measure on has 580.159). The upper bound is cudarc's (0.19 knows
# toolkits up to 13.4 and refuses newer ones at build time); it is read from its features.
# VENV_DIR defaults to ~/.cache/finetuned-cuda-<CUDA_VERSION>, one venv per version; a VENV_DIR
# given explicitly must not hold another version's wheels (the script stops rather than swap them).
#
# Link time: candle builds cudarc with `dynamic-linking`, so the binary is linked against
# libcuda, libnvrtc, libcurand, libcublas, libcublasLt and (for candle-kernels) libcudart.
# All but libcuda come from NVIDIA's wheels; $VENV/finetuned-lib gets the unversioned
# `libX.so` symlinks that `-lX` needs. libcuda belongs to the driver, so, like the toolkit's
# lib/stubs, $VENV/finetuned-lib/stubs/libcuda.so is a generated link-time stub (soname
# libcuda.so.1; every driver function returns CUDA_ERROR_STUB_LIBRARY). It is never named
# libcuda.so.1 nor put on LD_LIBRARY_PATH, so a real driver is what gets loaded at run time.
#
# Run time (the machine that runs the binary): the NVIDIA driver (its libcuda.so.1, reporting a
# CUDA version >= CUDA_VERSION's major.minor), plus libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libnvrtc.so.13 (+ libnvrtc-builtins.so.13.Y) and libcudart.so.13 on
# LD_LIBRARY_PATH, e.g. the same wheels: `pip install "cuda-toolkit[cudart,nvrtc,cublas,curand]==$CUDA_VERSION"`
# and LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib (this script exports that for this venv),
# or the CUDA 13 libraries that the machine's PyTorch brought (bench/gpu.sh finds those).
# Without the driver the binary does not start at all: libcuda.so.1 is a load-time dependency.
set -euo pipefail
TK=${3:-${CUDA_VERSION:-13.0.2}}
VENV=${1:-$HOME/.cache/finetuned-cuda-$TK}
CAP=${2:-90}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $CAP =~ ^[0-9]+$ ]] || { echo "COMPUTE_CAP must be digits without a dot (e.g. 90), not '$CAP'" >&2; exit 1; }

# The CUDA version: 13.Y, 13.Y.Z or 13.Y.Z.W (NVIDIA publishes some four-part versions).
[[ $TK =~ ^([0-9]+)\.([0-9]+)(\.[0-9]+){0,2}$ ]] \
  || { echo "CUDA_VERSION must look like 13.0.2 or 13.0, not '$TK'" >&2; exit 1; }
MAJOR=${BASH_REMATCH[1]} MINOR=${BASH_REMATCH[2]}
if (( MAJOR != 13 )); then
  echo "CUDA_VERSION $TK: this script handles the CUDA 13 wheels only (their nvidia/cu13 layout)" >&2; exit 1
fi
# `==13.0` would mean 13.0.0 exactly; a bare major.minor means its newest patch release.
[[ $TK == *.*.* ]] && PIN="==$TK" || PIN="==$TK.*"

# cudarc's crate: its newest `cuda-MMmmp` feature is the newest toolkit it can build against,
# and its driver bindings feed the libcuda stub below.
CUDARC=$(cd "$REPO" && cargo metadata --format-version 1 --features cuda 2>/dev/null \
  | python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))') \
  || { echo "cargo metadata found no cudarc for --features cuda" >&2; exit 1; }
NEWEST=$(python3 - "$CUDARC" <<'PY'
import re, sys
feats = re.findall(r'^"?cuda-(\d{2})(\d{2})0"?\s*=', open(sys.argv[1]).read(), re.M)
print(max((int(a), int(b)) for a, b in feats) if feats else "")
PY
) || NEWEST=""
if [[ $NEWEST =~ ^\(([0-9]+),\ ([0-9]+)\)$ ]]; then
  MAXMAJ=${BASH_REMATCH[1]} MAXMIN=${BASH_REMATCH[2]}
  if (( MAJOR > MAXMAJ || (MAJOR == MAXMAJ && MINOR > MAXMIN) )); then
    echo "CUDA_VERSION $TK is newer than cudarc ($CUDARC) supports: it knows toolkits up to" \
         "$MAXMAJ.$MAXMIN and refuses newer ones at build time. Use $MAXMAJ.$MAXMIN.* or older" \
         "(and no newer than the CUDA version of the driver that will run the binary)." >&2
    exit 1
  fi
else
  echo "warning: could not read cudarc's newest CUDA version from $CUDARC; not checking $TK against it" >&2
fi

if [[ -x $VENV/bin/python ]]; then
  # One toolkit per venv: pip would otherwise swap the wheels under an earlier build's feet.
  HAVE=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("cuda-toolkit"))' 2>/dev/null || true)
  if [[ -n $HAVE && $HAVE != "$TK" && $HAVE != "$TK".* ]]; then
    echo "$VENV holds the CUDA $HAVE toolchain, not $TK: give another VENV_DIR (the default is" \
         "one per version) or remove that one" >&2
    exit 1
  fi
else
  python3 -m venv "$VENV" >&2
fi
# NVIDIA's `cuda-toolkit` metapackage pins mutually consistent wheels of one CUDA release. The
# CUDA 13 wheels carry nvcc itself (the -cu12 nvcc wheels carry only ptxas).
"$VENV/bin/pip" install -q "cuda-toolkit[nvcc,cudart,crt,nvvm,cccl,nvrtc,cublas,curand]$PIN" >&2
ROOT=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0] + "/"), "cu13"))')
[[ -x $ROOT/bin/nvcc ]] || { echo "nvcc not found under $ROOT" >&2; exit 1; }
NVCC=$("$ROOT/bin/nvcc" --version)
[[ $NVCC == *"release $MAJOR.$MINOR,"* ]] || { echo "nvcc under $ROOT is not CUDA $MAJOR.$MINOR: $NVCC" >&2; exit 1; }

LIB=$VENV/finetuned-lib
mkdir -p "$LIB/stubs"
for name in cublas cublasLt curand nvrtc cudart; do
  # The wheels ship only the versioned file (libcublas.so.13, libcurand.so.10, ...).
  so=$(find "$ROOT/lib" -maxdepth 1 -name "lib$name.so.[0-9]*" | awk '{ print length, $0 }' | sort -n | head -n1 | cut -d' ' -f2- || true)
  [[ -n $so ]] || { echo "lib$name.so.* not found under $ROOT/lib" >&2; exit 1; }
  ln -sfn "$so" "$LIB/lib$name.so"
done

# The driver functions cudarc can reference: every `extern "C"` declaration in its driver
# bindings (a superset of what the binary uses, for every CUDA version cudarc knows). All of them
# return CUresult, so one body fits all on the C ABI.
BINDINGS=$(dirname "$CUDARC")/src/driver/sys/mod.rs
"$VENV/bin/python" - "$BINDINGS" "$LIB/stubs/libcuda-stub.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r'^\s+fn (cu[A-Za-z0-9_]+)\(', open(sys.argv[1]).read(), re.M)))
if "cuInit" not in names or len(names) < 100:
    sys.exit(f"unexpected driver bindings in {sys.argv[1]}: {len(names)} cu* functions")
with open(sys.argv[2], "w") as f:
    f.write("/* Generated by scripts/cuda-toolchain.sh: link-time stub of the NVIDIA driver (libcuda.so.1).\n"
            "   Every function returns CUDA_ERROR_STUB_LIBRARY (34). Never load it at run time. */\n")
    for n in names:
        f.write(f"int {n}(void) {{ return 34; }}\n")
PY
cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$LIB/stubs/libcuda.so.tmp" "$LIB/stubs/libcuda-stub.c" >&2
mv -f "$LIB/stubs/libcuda.so.tmp" "$LIB/stubs/libcuda.so"

echo "# CUDA $TK toolchain in $VENV (nvcc $(sed -n 's/.*release \([0-9.]*\),.*/\1/p' <<< "$NVCC"))"
echo "export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT CUDA_COMPUTE_CAP=$CAP"
echo "export PATH=$ROOT/bin:\$PATH"
# Link time: the symlinks and the libcuda stub (cc searches LIBRARY_PATH after rustc's -L paths).
echo "export LIBRARY_PATH=$LIB:$LIB/stubs:$ROOT/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
# Run time, on a machine with the driver: the wheels' libraries (the stub is not on this path).
echo "export LD_LIBRARY_PATH=$ROOT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
