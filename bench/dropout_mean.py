import json, sys, math, torch
from transformers import AutoTokenizer, AutoModelForSequenceClassification
d, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForSequenceClassification.from_pretrained(d)
rows = [json.loads(l) for l in open(data)][:32]
enc = tok([r["text"] for r in rows], [r["text_pair"] for r in rows], truncation=True, max_length=128, padding=True, return_tensors="pt")
labels = torch.tensor([int(r["label"] != "equivalent") for r in rows])
model.eval()
with torch.no_grad():
    ev = model(**enc, labels=labels).loss.item()
model.train()
losses, norms = [], []
for draw in range(n):
    torch.manual_seed(1000 + draw)
    model.zero_grad()
    out = model(**enc, labels=labels)
    out.loss.backward()
    norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)))
    losses.append(out.loss.item())
def ms(xs):
    m = sum(xs) / len(xs); v = sum((x - m) ** 2 for x in xs) / (len(xs) - 1); return [round(m, 6), round(math.sqrt(v / len(xs)), 6)]
print(json.dumps({"side": "torch", "eval_loss": round(ev, 6), "train_loss": ms(losses), "grad_norm": ms(norms), "draws": n}))
