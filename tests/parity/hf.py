"""transformers side of the parity tests (run by tests/parity.rs when transformers is installed).

  hf.py logits MODEL_DIR TEXTS_JSON   -> prints {"logits": [[...]], "ids": [[...]]}
  hf.py make MODEL_DIR NUM_LABELS OUT -> saves a BertForSequenceClassification with a seeded head
  hf.py mlm MODEL_DIR TEXT            -> prints masked-LM logits (first 1000 vocabulary entries)
"""
import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def logits(model_dir, texts_path):
    texts = json.load(open(texts_path))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out_logits, out_ids = [], []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=512)
            out_ids.append(enc["input_ids"][0].tolist())
            out_logits.append(model(**enc).logits[0].tolist())
    print(json.dumps({"logits": out_logits, "ids": out_ids}))


def mlm(model_dir, text):
    from transformers import AutoModelForMaskedLM
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc).logits[0, :, :1000]
    print(json.dumps({"ids": enc["input_ids"][0].tolist(), "logits": out.tolist()}))


def make(model_dir, num_labels, out):
    torch.manual_seed(0)
    n = int(num_labels)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=n, id2label={i: f"label_{i}" for i in range(n)},
        label2id={f"label_{i}": i for i in range(n)})
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    {"logits": logits, "make": make, "mlm": mlm}[sys.argv[1]](*sys.argv[2:])
