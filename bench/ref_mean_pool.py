"""Runs ../shared/bench/reference/finetune_ref.py with mean pooling in place of BERT's pooler.

The reference script fine-tunes transformers' BertForSequenceClassification, whose head reads the
pooler over [CLS]. This wrapper swaps the pooler for the mean of the last hidden states over real
tokens (what `pooling: mean` does here), so the two sides compare with the same head. With
--prior-bias, a multi-label head's bias starts at each label's smoothed log-odds in the training
rows, as our trainer's does. Every other argument goes to finetune_ref.py unchanged.
"""
import json
import math
import os
import runpy
import sys

import torch
import transformers.models.bert.modeling_bert as mb

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "..", "shared", "bench", "reference", "finetune_ref.py")

_mask = {}
_forward = mb.BertModel.forward


def _bert_forward(self, *args, **kwargs):
    _mask["m"] = kwargs.get("attention_mask")
    return _forward(self, *args, **kwargs)


def _mean_pool(self, hidden):
    m = _mask["m"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _prior_bias(data_dir, max_train):
    rows = [json.loads(l) for l in open(os.path.join(data_dir, "train.jsonl")) if l.strip()]
    rows = rows[:max_train] if max_train else rows
    names = sorted({n for r in rows for n in (r["label"] if isinstance(r["label"], list) else [r["label"]])})
    n = len(rows)
    counts = {k: sum(k in r["label"] for r in rows) for k in names}
    return [math.log(((counts[k] + 0.5) / (n + 1)) / (1 - (counts[k] + 0.5) / (n + 1))) for k in names]


def main():
    args = sys.argv[1:]
    prior = "--prior-bias" in args
    args = [a for a in args if a != "--prior-bias"]
    mb.BertModel.forward = _bert_forward
    mb.BertPooler.forward = _mean_pool
    if prior:
        data = args[args.index("--data") + 1]
        max_train = int(args[args.index("--max-train") + 1]) if "--max-train" in args else 0
        bias = _prior_bias(data, max_train)
        forward = mb.BertForSequenceClassification.forward

        # Set on the first forward pass: from_pretrained initialises the new head after
        # the constructor has run, so a bias set there would be overwritten.
        def _forward_once(self, *a, **k):
            if not getattr(self, "_prior_set", False):
                with torch.no_grad():
                    self.classifier.bias.copy_(torch.tensor(bias))
                self._prior_set = True
            return forward(self, *a, **k)

        mb.BertForSequenceClassification.forward = _forward_once
    sys.argv = ["finetune_ref.py"] + args
    runpy.run_path(REF, run_name="__main__")


if __name__ == "__main__":
    main()
