"""MLM training speed of two builds, alternated: each runs the same from-scratch job for ~60 s."""
import json, subprocess, sys, time, shutil, os
sys.path.insert(0, "/work/main/bench")
from api_finetune import read_jsonl, upload, call
builds = {"old": "/tmp/sst/finetuned", "new": "/work/main/target/release/finetuned"}
texts = [{"text": r["text"]} for r in read_jsonl("/work/shared/datasets/sst2/train.jsonl")]
out = []
for rnd in range(2):
    for name, gbl in [("old", False), ("new", False), ("new", True)]:
        d = f"/tmp/s6/mlmspeed/{name}_{gbl}_{rnd}"
        shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
        srv = subprocess.Popen([builds[name], "serve", "--addr", "127.0.0.1:8097", "--data-dir", f"{d}/data", "--models-dir", "/tmp/sst2/models"], stdout=open(f"{d}/log", "w"), stderr=subprocess.STDOUT)
        u = "http://127.0.0.1:8097"
        for _ in range(100):
            try:
                call(f"{u}/healthz"); break
            except BaseException:
                time.sleep(0.1)
        ds = upload(u, texts, "t")
        hp = {"epochs": 1, "batch_size": 32, "learning_rate": 5e-4, "max_seq_len": 64, "seed": 42}
        if gbl:
            hp["group_by_length"] = True
        job = call(f"{u}/v1/jobs", "POST", {"base_model": "all-minilm-l6-v2", "training_dataset": ds, "task": "mlm", "model_name": "m", "config": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2}, "hyperparameters": hp})
        time.sleep(75)
        p = call(f"{u}/v1/jobs/{job['id']}")["progress"]
        srv.terminate(); srv.wait()
        row = {"round": rnd + 1, "build": name, "group_by_length": gbl, "examples_per_second": p["examples_per_second"], "step": p["step"]}
        print(json.dumps(row), flush=True)
        out.append(row)
json.dump(out, open("/tmp/s6/mlm_speed.json", "w"), indent=1)
