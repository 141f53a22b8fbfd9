"""Real clients against a live server (run by scripts/client-test.sh, which sets the environment).

1. A client generated from openapi.yaml by openapi-python-client (importable as `finetuned_client`)
   runs the README's walk-through: upload (multipart `file` and a raw JSON Lines body), a job (JSON and
   multipart), poll, predict, download.
2. huggingface_hub's InferenceClient.text_classification against /v1/models/{id}/predict and against
   the TEI route /predict (the server's --default-model) gives our own predict route's labels and scores.
3. TEI's own /predict examples (single, batch, raw scores, truncation) answer in TEI's shapes.
4. The JSON job's webhooks reach a receiver that verifies each with the `standardwebhooks` package
   (the server has a `whsec_` secret): queued, running, succeeded.
5. A tagger (CoNLL-2003's first sentences) and a reranker (MRPC's pairs) trained through the
   generated client: InferenceClient.token_classification gives our predict route's entities, and
   TEI's /rerank (X-Model) answers what our /v1/models/{id}/rerank does.
"""

import io
import json
import math
import os
import sys
import tarfile
import time

import http.server
import threading

import httpx
from standardwebhooks.webhooks import Webhook
from finetuned_client import AuthenticatedClient
from finetuned_client.api.datasets import create_dataset
from finetuned_client.api.jobs import create_job, get_job
from finetuned_client.api.models import download_model, predict, rerank
from finetuned_client.models import CreateDatasetFilesBody, CreateJobFilesBody, Dataset, Job, JobRequest, JobSpec, PredictRequest, RerankRequest
from finetuned_client.types import File
from huggingface_hub import InferenceClient

BASE, KEY, MODEL = os.environ["BASE"], os.environ["API_KEY"], os.environ["MODEL_NAME"]
DATA = os.environ["DATASET_DIR"]
TEXTS = ["a gorgeous, witty, seductive movie", "dull and far too long"]


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")
    print(f"ok: {what.splitlines()[0][:150]}")


def read(name):
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def wait(client, job_id, secs=600):
    deadline = time.time() + secs
    while True:
        job = get_job.sync(job_id, client=client)
        if not isinstance(job, Job):
            sys.exit(f"FAIL: poll job {job_id}: {job}")
        if job.status.value in ("succeeded", "failed", "cancelled"):
            return job
        if time.time() > deadline:
            sys.exit(f"FAIL: job {job_id} still {job.status.value} after {secs}s")
        time.sleep(1)


class Receiver(http.server.BaseHTTPRequestHandler):
    """Verifies each delivery with the Standard Webhooks package; keeps the statuses verified."""

    verified, refused = [], []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        try:
            payload = Webhook(os.environ["WEBHOOK_SECRET"]).verify(body, {k.lower(): v for k, v in self.headers.items()})
            Receiver.verified.append(payload["status"])
        except Exception as e:  # noqa: BLE001 - any refusal is a failed check below
            Receiver.refused.append(repr(e))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def start_receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/hook"


def walk_through(client):
    train = create_dataset.sync(client=client, name="train", body=CreateDatasetFilesBody(file=File(payload=io.BytesIO(read("train.jsonl")), file_name="train.jsonl")))
    check(isinstance(train, Dataset) and train.rows > 0, f"upload multipart `file`: {train}")
    val = create_dataset.sync(client=client, name="val", body=File(payload=io.BytesIO(read("validation.jsonl"))))
    check(isinstance(val, Dataset) and val.rows > 0, f"upload a raw JSON Lines body: {val}")
    hp = {"epochs": 4, "batch_size": 16, "learning_rate": 1e-4, "max_seq_len": 64}
    req = JobRequest.from_dict({"base_model": "all-minilm-l6-v2", "training_dataset": train.id, "validation_dataset": val.id, "model_name": MODEL, "hyperparameters": hp, "webhook_url": start_receiver()})
    job = create_job.sync(client=client, body=req, idempotency_key="client-test-json")
    check(isinstance(job, Job), f"create a job (JSON): {job}")
    # A retry with the same Idempotency-Key gets the same job, not a second one.
    again = create_job.sync(client=client, body=req, idempotency_key="client-test-json")
    check(isinstance(again, Job) and again.id == job.id, f"retry with the same Idempotency-Key: {again}")
    # The one-call form: the files and the job spec as multipart parts.
    spec = JobSpec.from_dict({"base_model": "all-minilm-l6-v2", "model_name": MODEL + "-multipart", "hyperparameters": {**hp, "epochs": 1}})
    files = CreateJobFilesBody(training_file=File(payload=io.BytesIO(read("train.jsonl")), file_name="train.jsonl"), job=spec)
    job2 = create_job.sync(client=client, body=files)
    check(isinstance(job2, Job) and job2.training_dataset, f"create a job (multipart): {job2}")
    for j in (job, job2):
        done = wait(client, j.id)
        check(done.status.value == "succeeded", f"job {j.id} succeeded: {done.to_dict()}")
    deadline = time.time() + 60
    while len(Receiver.verified) < 3 and not Receiver.refused and time.time() < deadline:
        time.sleep(0.2)
    check(Receiver.verified == ["queued", "running", "succeeded"] and not Receiver.refused,
          f"webhooks verified by standardwebhooks: {Receiver.verified}, refused: {Receiver.refused}")
    out = predict.sync(MODEL, client=client, body=PredictRequest(inputs=TEXTS, top_k=1))
    labels = [p[0].label for p in out.predictions]
    check(labels == ["positive", "negative"], f"predict through the generated client: {labels}")
    archive = download_model.sync(MODEL, client=client)
    names = tarfile.open(fileobj=archive.payload, mode="r:gz").getnames()
    check(any(n.endswith("config.json") for n in names) and any(n.endswith("model.safetensors") for n in names), f"download: {names}")


def jsonl_upload(client, name, rows):
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    d = create_dataset.sync(client=client, name=name, body=File(payload=io.BytesIO(body)))
    check(isinstance(d, Dataset) and d.rows == len(rows), f"upload {name}: {d}")
    return d


def train(client, dataset, task, name, **more):
    hp = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-4, "max_seq_len": 64, **more}
    req = JobRequest.from_dict({"base_model": "all-minilm-l6-v2", "training_dataset": dataset.id, "task": task, "model_name": name, "hyperparameters": hp})
    job = create_job.sync(client=client, body=req)
    check(isinstance(job, Job), f"create a {task} job: {job}")
    done = wait(client, job.id)
    check(done.status.value == "succeeded", f"{task} job succeeded: {done.to_dict()}")


def entities_and_reranking(client):
    shared = os.path.dirname(DATA)
    rows = lambda d: [json.loads(l) for l in open(os.path.join(shared, d, "train.jsonl"))][:240]  # noqa: E731
    # Four epochs at 5e-4 are enough for the tagger to find this sentence's three entities.
    train(client, jsonl_upload(client, "ner", rows("conll2003")), "token_classification", "client-ner", epochs=4, learning_rate=5e-4)
    text = "Peter Blackburn flew from Brussels to Washington on Monday."
    auth = {"Authorization": f"Bearer {KEY}"}
    ours_r = httpx.post(f"{BASE}/v1/models/client-ner/predict", json={"inputs": [text]}, headers=auth)
    ours_r.raise_for_status()
    mine = [(e["entity_group"], e["start"], e["end"], e["word"], e["score"]) for e in ours_r.json()["predictions"][0]]
    check(len(mine) >= 2 and all(text[s:e] == w for _, s, e, w, _ in mine), f"the tagger finds entities: {mine}")
    hf = InferenceClient(model=f"{BASE}/v1/models/client-ner/predict", token=KEY)
    got = [(e.entity_group, e.start, e.end, e.word, e.score) for e in hf.token_classification(text)]
    check(got == mine, f"InferenceClient.token_classification: {got}")
    first = [(e.entity_group, e.start, e.end) for e in hf.token_classification(text, aggregation_strategy="first")]
    check(all(text[s:e] for _, s, e in first), f"InferenceClient.token_classification, first: {first}")

    pairs = [{"query": r["text"], "document": r["text_pair"], "label": 1 if r["label"] == "equivalent" else 0} for r in rows("mrpc")]
    train(client, jsonl_upload(client, "rerank", pairs), "rerank", "client-rerank")
    body = {"query": "The cat sat on the mat.", "texts": ["A cat was sitting on the mat.", "Stocks fell.", "The mat is red."], "return_text": True}
    out = rerank.sync("client-rerank", client=client, body=RerankRequest.from_dict(body))
    check(out is not None and hasattr(out, "results"), f"rerank through the generated client: {out}")
    results = [{"index": x.index, "score": x.score, "text": x.text} for x in out.results]
    check([x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True), f"rerank, best first: {results}")
    tei = httpx.post(f"{BASE}/rerank", json=body, headers={**auth, "X-Model": "client-rerank"})
    check(tei.status_code == 200 and tei.json() == results, f"TEI /rerank: {tei.text[:200]}")


def ours(text, **extra):
    r = httpx.post(f"{BASE}/v1/models/{MODEL}/predict", json={"inputs": text, **extra}, headers={"Authorization": f"Bearer {KEY}"})
    r.raise_for_status()
    return [(p["label"], p["score"]) for p in r.json()["predictions"][0]]


def hugging_face_clients():
    for url in (f"{BASE}/v1/models/{MODEL}/predict", f"{BASE}/predict"):
        hf = InferenceClient(model=url, token=KEY)
        for text in TEXTS:
            got = [(e.label, e.score) for e in hf.text_classification(text)]
            check(got == ours(text), f"InferenceClient.text_classification at {url}: {got}")
            got = [(e.label, e.score) for e in hf.text_classification(text, top_k=1)]
            check(got == ours(text, top_k=1), f"... with top_k=1: {got}")
            raw = ours(text, raw_scores=True)
            got = [(e.label, e.score) for e in hf.text_classification(text, function_to_apply="sigmoid")]
            want = [(label, 1 / (1 + math.exp(-s))) for label, s in raw]
            check(all(g[0] == w[0] and abs(g[1] - w[1]) < 1e-5 for g, w in zip(got, want)), f"... function_to_apply=sigmoid: {got}")


def tei_examples():
    post = lambda body: httpx.post(f"{BASE}/predict", json=body, headers={"Authorization": f"Bearer {KEY}"})  # noqa: E731
    single = post({"inputs": "I like you."}).json()
    check(isinstance(single, list) and {"label", "score"} <= set(single[0]), f"TEI single: a list of {{label, score}}: {single}")
    batch = post({"inputs": [["I like you."], ["I hate you."]]}).json()
    # The same text scored alone and beside another: the same labels, and scores equal up to float
    # rounding (a pass over two rows may round differently from one over a single row).
    same = lambda a, b: [p["label"] for p in a] == [p["label"] for p in b] and all(  # noqa: E731
        abs(p["score"] - q["score"]) < 1e-5 for p, q in zip(a, b))
    check(len(batch) == 2 and all(isinstance(b, list) for b in batch) and same(batch[0], single), f"TEI batch: a list of lists: {batch}")
    raw = post({"inputs": "I like you.", "raw_scores": True}).json()
    # Our probabilities are calibrated: the softmax of the logits over the model's temperature.
    model = httpx.get(f"{BASE}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {KEY}"}).json()
    temp = model["metrics"]["calibration"]["temperature"]
    exps = {p["label"]: math.exp(p["score"] / temp) for p in raw}
    softmax = {label: e / sum(exps.values()) for label, e in exps.items()}
    check(all(abs(softmax[p["label"]] - p["score"]) < 1e-5 for p in single), f"TEI raw_scores: the logits: {raw}")
    long = " ".join(["what a wonderful film"] * 200)
    r = post({"inputs": long, "truncate": False})
    check(r.status_code in (413, 422) and "error" in r.json(), f"TEI truncate false on a long input: {r.status_code} {r.text}")
    r = post({"inputs": long, "truncate": True, "truncation_direction": "Left"})
    check(r.status_code == 200 and isinstance(r.json(), list), f"TEI truncate true, Left: {r.status_code}")
    info = httpx.get(f"{BASE}/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    check(info["model_id"] == MODEL and "classifier" in info["model_type"], f"TEI /info: {json.dumps(info)[:200]}")
    toks = httpx.post(f"{BASE}/tokenize", json={"inputs": "I like you."}, headers={"Authorization": f"Bearer {KEY}"}).json()
    check(toks[0][0]["special"] and toks[0][1]["text"] == "I", f"TEI /tokenize: {toks}")


client = AuthenticatedClient(base_url=BASE, token=KEY, timeout=httpx.Timeout(120.0))
walk_through(client)
hugging_face_clients()
tei_examples()
entities_and_reranking(client)
print("all client checks passed")
