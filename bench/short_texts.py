"""Writes the texts predict_ref.py times one at a time, as JSONL, so bench-serve's single-text
latency is measured on the same texts (predict_ref: the first texts of its pool with at most
--short-max-tokens tokens, cycled to --n-requests).

Usage: python bench/short_texts.py --model DIR --data DATASET_DIR --out short.jsonl
"""
import argparse
import json
import os

from transformers import AutoTokenizer


def read_texts(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n-texts", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--n-requests", type=int, default=200)
    ap.add_argument("--short-max-tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    pool = []
    for split in ("test", "validation", "train"):
        pool.extend(read_texts(os.path.join(a.data, f"{split}.jsonl")))
        if len(pool) >= a.n_texts:
            break
    short = [x for x in pool
             if len(tok(x, truncation=True, max_length=a.max_len)["input_ids"]) <= a.short_max_tokens] or pool
    reqs = [short[i % len(short)] for i in range(a.n_requests)]
    with open(a.out, "w", encoding="utf-8") as f:
        for x in reqs:
            f.write(json.dumps({"text": x}) + "\n")
    n = [len(tok(x)["input_ids"]) for x in reqs]
    print(f"{len(reqs)} texts, tokens mean {sum(n) / len(n):.1f}, max {max(n)}")


if __name__ == "__main__":
    main()
