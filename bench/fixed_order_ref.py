"""PyTorch's side of a step-by-step comparison of the two trainers: `finetune_ref.py`'s model,
optimizer, schedule and clipping, run on the batches our trainer would run (the order printed
by `examples/batch_order.rs` for these sequences' lengths), so that the only differences left
are the trainers' own. Prints and saves the mean loss of every LOG_EVERY steps, and the final
weights' test accuracy.

Usage: python bench/fixed_order_ref.py --model DIR --data DIR --order-bin PATH --out JSON [--epochs 3 ...]
"""
import argparse
import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../shared/bench/reference"))
import finetune_ref as ref  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    for name, kind, default in [("--model", str, None), ("--data", str, None), ("--order-bin", str, None),
                                ("--out", str, None), ("--epochs", int, 3), ("--batch-size", int, 32),
                                ("--lr", float, 5e-5), ("--weight-decay", float, 0.01), ("--warmup-ratio", float, 0.06),
                                ("--max-grad-norm", float, 1.0), ("--max-len", int, 128), ("--seed", int, 42),
                                ("--threads", int, 2), ("--log-every", int, 25)]:
        ap.add_argument(name, type=kind, default=default, required=default is None)
    ap.add_argument("--group-by-length", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref.set_seed(args.seed)
    rows = ref.read_jsonl(os.path.join(args.data, "train.jsonl"))
    labels = sorted({str(r["label"]) for r in rows})
    label2id = {n: i for i, n in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), label2id=label2id, id2label={i: n for n, i in label2id.items()},
        ignore_mismatched_sizes=True)
    ids = ref.encode(tok, rows, args.max_len)
    ys = [label2id[str(r["label"])] for r in rows]
    lengths = "\n".join(str(len(x)) for x in ids)
    cmd = [args.order_bin, str(args.batch_size), str(args.seed), str(args.epochs), "1" if args.group_by_length else "0"]
    order = json.loads(subprocess.run(cmd, input=lengths, capture_output=True, text=True, check=True).stdout)

    markers = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    decay = [p for n, p in model.named_parameters() if not any(m in n for m in markers)]
    no_decay = [p for n, p in model.named_parameters() if any(m in n for m in markers)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = math.ceil(len(ids) / args.batch_size)
    total = per_epoch * args.epochs
    sched = get_linear_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * total), total)
    step, running, log = 0, [], []
    for epoch in range(args.epochs):
        model.train()
        for idx in order[epoch]:
            batch, _ = ref.collate([ids[i] for i in idx], tok.pad_token_id, True)
            loss = model(**batch, labels=torch.tensor([ys[i] for i in idx])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            running.append(float(loss.detach()))
            if step % args.log_every == 0 or step == total:
                log.append({"step": step, "loss": round(sum(running) / len(running), 5)})
                print(f"epoch {epoch + 1} step {step}/{total} loss {log[-1]['loss']:.4f}", flush=True)
                running = []
    # Test accuracy of the final weights, as finetune_ref.py reports it.
    test_rows = ref.read_jsonl(os.path.join(args.data, "test.jsonl"))
    test_y = [label2id[str(r["label"])] for r in test_rows]
    acc, f1, _, _ = ref.evaluate(model, ref.encode(tok, test_rows, args.max_len), test_y, tok.pad_token_id, True, 64)
    print(f"test accuracy {acc:.4f} macro-F1 {f1:.4f}", flush=True)
    json.dump({"loss_log": log, "test_accuracy": acc, "test_macro_f1": f1}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
