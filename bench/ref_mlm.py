"""Masked-LM pre-training in PyTorch + transformers, as our `mlm` job does it, for comparison.

Starts from a model directory's config and weights (e.g. a random init made by
bench/make_random_base.py), trains BertForMaskedLM on the training texts of a data set
(15 % of tokens chosen, 80/10/10, transformers' DataCollatorForLanguageModeling), with AdamW
(weight decay 0.01, none on biases and LayerNorm), linear warmup over 6 % of the steps then linear
decay, and saves the result with the tokenizer.

  python bench/ref_mlm.py --model MODELS/random-small --data ../shared/datasets/banking77 \
      --epochs 10 --lr 5e-4 --out MODELS/ref-mlm
"""
import argparse, json, math, os, random

import torch
from transformers import (AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling,
                          get_linear_schedule_with_warmup)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = BertForMaskedLM.from_pretrained(a.model)
    texts = [json.loads(l)["text"] for l in open(os.path.join(a.data, "train.jsonl")) if l.strip()]
    enc = [tok(t, truncation=True, max_length=a.max_len)["input_ids"] for t in texts]
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr)
    steps = math.ceil(len(enc) / a.batch_size) * a.epochs
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.06 * steps), steps)
    model.train()
    for epoch in range(a.epochs):
        order = list(range(len(enc)))
        random.shuffle(order)
        total, n = 0.0, 0
        for s in range(0, len(order), a.batch_size):
            batch = collate([{"input_ids": enc[i]} for i in order[s:s + a.batch_size]])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total, n = total + loss.item(), n + 1
        print(f"[ref-mlm] epoch {epoch + 1} train loss {total / n:.4f}", flush=True)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)


if __name__ == "__main__":
    main()
