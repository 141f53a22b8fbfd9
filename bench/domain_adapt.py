#!/usr/bin/env python3
"""Domain adaptation through the running server: masked-LM pre-training on a data set's training
texts (labels dropped), then fine-tuning the new base and the original base on the same few
labeled rows with the same settings, both scored on the test set through predict.

  python3 bench/domain_adapt.py --url http://127.0.0.1:8099 --model all-minilm-l6-v2 \
      --data ../shared/datasets/banking77 --labeled 1000 --out domain.json

--mlm-anchor-weight sets the masked-LM job's sentence-embedding anchor (0 turns it off);
--only-adapted skips the parent's fine-tunes (deterministic: the same figures every run).

With --scratch-config '{"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2}' the
masked-LM job starts from a fresh model of that shape (--model only lends its tokenizer), and
--baseline names the model it is compared with (e.g. a random init of the same shape made by
bench/make_random_base.py). --seeds runs the fine-tuning once per seed (the masked-LM job once) and
reports each base's mean. --corpus takes the masked-LM texts from several data sets' training
splits (their labels dropped); fine-tuning and the test still use --data.
"""
import argparse, json

from api_finetune import read_jsonl, run_job, score, upload, write_report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--labeled", type=int, default=1000)
    ap.add_argument("--mlm-epochs", type=int, default=1)
    ap.add_argument("--mlm-lr", type=float, default=5e-5)
    ap.add_argument("--mlm-group-by-length", action="store_true", help="batch the masked-LM texts by length")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--seeds", type=int, nargs="+", help="fine-tune once per seed (default: --seed)")
    ap.add_argument("--scratch-config", help="JSON config: pre-train from scratch")
    ap.add_argument("--baseline", help="model to compare with (default: --model)")
    ap.add_argument("--corpus", nargs="+", help="data set dirs whose training texts make the masked-LM corpus (default: --data)")
    ap.add_argument("--mlm-anchor-weight", type=float, help="the masked-LM job's mlm_anchor_weight (default: the job's own)")
    ap.add_argument("--only-adapted", action="store_true", help="fine-tune only the adapted base (the parent's runs are deterministic: reuse them)")
    ap.add_argument("--out")
    a = ap.parse_args()
    u = a.url.rstrip("/")

    train = read_jsonl(f"{a.data}/train.jsonl")
    corpus = [{"text": r["text"]} for d in (a.corpus or [a.data]) for r in read_jsonl(f"{d}/train.jsonl")]
    texts = upload(u, corpus, "domain-texts")
    hp = {"epochs": a.mlm_epochs, "batch_size": a.batch_size, "learning_rate": a.mlm_lr, "max_seq_len": a.max_len, "seed": a.seed,
          "group_by_length": a.mlm_group_by_length}
    if a.mlm_anchor_weight is not None:
        hp["mlm_anchor_weight"] = a.mlm_anchor_weight
    job = {"base_model": a.model, "training_dataset": texts, "task": "mlm", "model_name": "domain-base", "hyperparameters": hp}
    if a.scratch_config:
        job["config"] = json.loads(a.scratch_config)
    mlm = run_job(u, job)

    labeled = upload(u, train[: a.labeled], "few-labeled")
    val = upload(u, read_jsonl(f"{a.data}/validation.jsonl"), "validation")
    test = read_jsonl(f"{a.data}/test.jsonl")
    results = {}
    for seed in a.seeds or [a.seed]:
        hp = {"epochs": a.epochs, "batch_size": a.batch_size, "learning_rate": a.lr, "max_seq_len": a.max_len,
              "seed": seed, "pooling": a.pooling}
        for base in ["domain-base"] + ([] if a.only_adapted else [a.baseline or a.model]):
            job = run_job(u, {"base_model": base, "training_dataset": labeled, "validation_dataset": val, "hyperparameters": hp})
            accuracy, f1 = score(u, job["model"], test)
            results.setdefault(base, {"runs": {}})["runs"][seed] = {"test_accuracy": accuracy, "test_macro_f1": f1,
                                                                  "validation": job["metrics"], "wall_seconds": job["wall_seconds"]}
            print(f"seed {seed} {base}: test accuracy {accuracy:.4f}, macro-F1 {f1:.4f}", flush=True)
    for r in results.values():
        runs = r["runs"].values()
        r["mean_test_accuracy"] = sum(x["test_accuracy"] for x in runs) / len(runs)
        r["mean_test_macro_f1"] = sum(x["test_macro_f1"] for x in runs) / len(runs)
    report = {"corpus": a.corpus or [a.data], "corpus_texts": len(corpus), "mlm": {"metrics": mlm["metrics"], "wall_seconds": mlm["wall_seconds"], "hyperparameters": mlm["hyperparameters"]},
              "fine_tune_hyperparameters": hp, "labeled_rows": a.labeled, "results": results}
    write_report(report, a.out)


if __name__ == "__main__":
    main()
