"""PyTorch side of the training parity test (tests/training_parity.rs):

  steps.py MODEL_DIR DATA_JSON OUT_GRADS -> prints {"losses", "ids", "grad_norms", "versions"} and saves
      the gradients of the first batch's loss as OUT_GRADS (safetensors, transformers' names)

DATA_JSON is {"batches": [[text, ...], ...], "labels": [[id, ...], ...], "lr", "weight_decay", "max_len"}. The
model is the AutoModelForSequenceClassification in MODEL_DIR with dropout off (eval mode); each batch is
padded to its longest text; AdamW from torch.optim with transformers' decay rule (no decay on biases and
LayerNorm weights), a constant learning rate and no gradient clipping. `losses[i]` is the loss of batch i
before step i.
"""
import json
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main(model_dir, data_path, out_grads):
    data = json.load(open(data_path))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or "LayerNorm" in n or "layer_norm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith(".bias") or "LayerNorm" in n or "layer_norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": data["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                            lr=data["lr"])
    losses, ids, norms = [], [], {}
    for i, (texts, labels) in enumerate(zip(data["batches"], data["labels"])):
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=data["max_len"])
        ids.append(enc["input_ids"].tolist())
        loss = model(**enc, labels=torch.tensor(labels)).loss
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if i == 0:
            grads = {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}
            norms = {n: g.norm().item() for n, g in grads.items()}
            save_file(grads, out_grads)
        opt.step()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"losses": losses, "ids": ids, "grad_norms": norms, "versions": versions}))


if __name__ == "__main__":
    main(*sys.argv[1:])
