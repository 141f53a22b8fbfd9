"""Reference for NER predict speed: transformers' token-classification pipeline (aggregation
`simple`) on the same sentences as `finetuned bench-serve`: one sentence at a time (p50 latency),
and all of them in batches of 32 (sentences/s), on 2 threads.

  ner_pipeline_ref.py MODEL_DIR TEXTS_JSONL OUT [--n 256] [--threads 2]
"""
import argparse
import json
import statistics
import time

import torch
from transformers import pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("texts")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = [json.loads(l)["text"] for l in open(args.texts)][: args.n]
    pipe = pipeline("token-classification", model=args.model, aggregation_strategy="simple", device="cpu")
    pipe(texts[:8])  # warm
    one = []
    for t in texts[:100]:
        t0 = time.perf_counter()
        pipe(t)
        one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    pipe(texts, batch_size=32)
    batched = time.perf_counter() - t0
    report = {"p50_ms_one_sentence": statistics.median(one) * 1e3, "sentences_per_s_batch32": len(texts) / batched,
              "n_sentences": len(texts), "torch": torch.__version__}
    json.dump(report, open(args.out, "w"), indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
