// The README's walk-through with a client generated from openapi.yaml by @hey-api/openapi-ts (run by
// scripts/client-test.sh with tsx): upload, job (with metadata, then found by it), poll, predict,
// download. GEN_DIR is the generated client's folder; BASE, API_KEY, MODEL_NAME and DATASET_DIR
// come from the script.
import { readFileSync } from "node:fs";
import { join } from "node:path";

const { BASE, API_KEY, MODEL_NAME, DATASET_DIR, GEN_DIR } = process.env as Record<string, string>;
const sdk = await import(join(GEN_DIR, "sdk.gen.ts"));
const { client } = await import(join(GEN_DIR, "client.gen.ts"));
client.setConfig({ baseUrl: BASE, auth: () => API_KEY });

function check(ok: unknown, what: string): void {
  if (!ok) {
    console.error(`FAIL: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what.slice(0, 150)}`);
}

const file = (name: string) => new Blob([readFileSync(join(DATASET_DIR, name))]);
const model = `${MODEL_NAME}-ts`;

// Raw JSON Lines bodies (the spec's first media type for uploads, application/jsonl).
const train = await sdk.createDataset({ body: file("train.jsonl"), query: { name: "train-ts" } });
check(train.data?.rows > 0, `upload (raw JSON Lines): ${JSON.stringify(train.data ?? train.error)}`);
const val = await sdk.createDataset({ body: file("validation.jsonl"), query: { name: "val-ts" } });
check(val.data?.rows > 0, `upload the validation set: ${JSON.stringify(val.data ?? val.error)}`);

const hyperparameters = { epochs: 4, batch_size: 16, learning_rate: 1e-4, max_seq_len: 64 };
const created = await sdk.createJob({
  body: {
    base_model: "all-minilm-l6-v2", training_dataset: train.data.id, validation_dataset: val.data.id, model_name: model, hyperparameters,
    metadata: { client: "openapi-ts", run: model },
  },
});
check(created.data?.id, `create a job: ${JSON.stringify(created.data ?? created.error)}`);
// The list filter is a deepObject query parameter: metadata[client]=…&metadata[run]=….
const found = await sdk.listJobs({ query: { metadata: { client: "openapi-ts", run: model } } });
const foundIds = found.data?.data?.map((j: { id: string }) => j.id);
check(JSON.stringify(foundIds) === JSON.stringify([created.data.id]), `list jobs by metadata: ${JSON.stringify(found.data ?? found.error)}`);

const deadline = Date.now() + 600_000;
let job = created.data;
while (!["succeeded", "failed", "cancelled"].includes(job.status)) {
  if (Date.now() > deadline) check(false, `job ${job.id} still ${job.status} after 600 s`);
  await new Promise((r) => setTimeout(r, 1000));
  const polled = await sdk.getJob({ path: { id: job.id } });
  if (!polled.data) check(false, `poll: ${JSON.stringify(polled.error)}`);
  job = polled.data;
}
check(job.status === "succeeded", `job ${job.id} ${job.status}: ${JSON.stringify(job.error)}`);

const texts = ["a gorgeous, witty, seductive movie", "dull and far too long"];
const predicted = await sdk.predict({ path: { id: model }, body: { inputs: texts, top_k: 1 } });
const labels = predicted.data?.predictions?.map((p: { label: string }[]) => p[0].label);
check(JSON.stringify(labels) === JSON.stringify(["positive", "negative"]), `predict: ${JSON.stringify(predicted.data ?? predicted.error)}`);

const downloaded = await sdk.downloadModel({ path: { id: model }, parseAs: "blob" });
const bytes = new Uint8Array(await (downloaded.data as Blob).arrayBuffer());
check(bytes.length > 1000 && bytes[0] === 0x1f && bytes[1] === 0x8b, `download: ${bytes.length} bytes of gzip`);
// The reranker client-test.py trained: texts ordered best first.
const reranked = await sdk.rerank({ path: { id: "client-rerank" }, body: { query: "The cat sat on the mat.", texts: ["Stocks fell.", "A cat was sitting on the mat."] } });
const scores = reranked.data?.results?.map((r: { score: number }) => r.score) ?? [];
check(scores.length === 2 && scores[0] >= scores[1], `rerank: ${JSON.stringify(reranked.data ?? reranked.error)}`);
console.log("all @hey-api/openapi-ts checks passed");
