#!/usr/bin/env bash
# Rewrites tests/parity/golden/ from transformers: makes a venv with torch and transformers
# (PyPI; ~6 GB, since the default Linux torch wheel is the CUDA build) unless FINETUNED_PYTHON
# names a Python that has them, then runs the parity tests live with FINETUNED_PARITY_WRITE=1.
# Usage: tests/parity/regenerate.sh [VENV]   (default ~/refbench-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${FINETUNED_PYTHON:-}" ]; then
  VENV=${1:-$HOME/refbench-venv}
  if ! "$VENV/bin/python" -c "import torch, transformers, safetensors, peft, sentence_transformers" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check torch transformers safetensors peft sentence-transformers
  fi
  export FINETUNED_PYTHON=$VENV/bin/python
fi
# The tiny BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT and ModernBERT (model files and tokenizers) their cases start from.
"$FINETUNED_PYTHON" tests/parity/make_models.py tests/parity/golden
FINETUNED_PARITY_WRITE=1 cargo test --locked --test parity --test lora --test training_parity --test tokenization --test token_parity --test rope_parity --test modernbert -- --nocapture --test-threads 1
git status --short tests/parity/golden
