#!/usr/bin/env bash
# Installs a CUDA compiler from PyPI (Debian's main archive has none) into a venv and prints the
# environment that `cargo build --release --features cuda` needs. Usage:
#   eval "$(scripts/cuda-toolchain.sh [VENV_DIR] [COMPUTE_CAP])"
#   cargo build --release --features cuda
# COMPUTE_CAP is the GPU's compute capability without the dot (default 90: H100/H200).
# Only the build needs this; running on a GPU needs the NVIDIA driver (libcuda) on that machine.
set -euo pipefail
VENV=${1:-$HOME/.cache/finetuned-cuda}
CAP=${2:-90}
if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV" >&2
fi
# The CUDA 13 wheels carry nvcc itself (the -cu12 nvcc wheels carry only ptxas). Pinned to 13.4:
# cudarc 0.19 (under candle 0.11) knows toolkits up to 13.4 and refuses newer ones at build time.
V=13.4.*
"$VENV/bin/pip" install -q "nvidia-cuda-nvcc==$V" "nvidia-cuda-runtime==$V" "nvidia-cuda-crt==$V" "nvidia-nvvm==$V" "nvidia-cuda-cccl>=13,<14" >&2
ROOT=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0] + "/"), "cu13"))')
[[ -x $ROOT/bin/nvcc ]] || { echo "nvcc not found under $ROOT" >&2; exit 1; }
echo "export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT CUDA_COMPUTE_CAP=$CAP"
echo "export PATH=$ROOT/bin:\$PATH"
echo "export LIBRARY_PATH=$ROOT/lib:\${LIBRARY_PATH:-}"
