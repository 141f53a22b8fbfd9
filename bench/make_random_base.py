#!/usr/bin/env python3
"""A randomly initialised BERT of a given shape with another model's tokenizer, saved as a
Hugging Face directory: the "random init" baseline for a from-scratch pre-training run.

  ~/refbench-venv/bin/python bench/make_random_base.py --tokenizer ../shared/models/all-minilm-l6-v2 \\
      --layers 2 --hidden 128 --heads 2 --out models/random-small
"""
import argparse, shutil

import torch
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.tokenizer}/tokenizer.json")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                     intermediate_size=4 * a.hidden, pad_token_id=0)
    BertModel(cfg).save_pretrained(a.out, safe_serialization=True)
    shutil.copy(f"{a.tokenizer}/tokenizer.json", f"{a.out}/tokenizer.json")


if __name__ == "__main__":
    main()
