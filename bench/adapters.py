"""Many LoRA adapters over one base, served from one process (issue 20's serving goals).

  python3 bench/adapters.py BINARY ADAPTER_DIR [--n 1000] [--clients 32] [--seconds 12] [--rounds 3]

Lays out a models dir with all-minilm-l6-v2 (a link to ../shared) and N copies of ADAPTER_DIR (a
peft adapter over it; `tests/parity/golden/peft-adapter` will do: copies are separate adapters to
the server), starts `BINARY serve` on it, then measures:
  1. every adapter's first predict (it loads then) and a second one (loaded): p50 of each, and
     the server's peak RSS once all N answered;
  2. texts/s of CLIENTS concurrent clients sending one text per request, each to a different
     adapter, against the same clients all calling one adapter; the two setups alternate, ROUNDS
     times, and the medians are compared.
Uses only the standard library; prints a JSON report.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés", "unflinchingly bleak and desperate",
         "it's a charming and often affecting journey.", "too bland to be interesting", "a masterpiece of quiet grace"]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def throughput(base, names, clients, seconds):
    """Texts/s of `clients` threads, client i calling names[i % len(names)] one text at a time."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def client(i):
        url = f"{base}/v1/models/{names[i % len(names)]}/predict"
        k = i
        while time.monotonic() < stop:
            post(url, {"inputs": [TEXTS[k % len(TEXTS)]]})
            done[i] += 1
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("adapter")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapter-cache-mib", type=int, default=512)
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="adapters-bench-")
    models = os.path.join(work, "models")
    os.makedirs(models)
    os.symlink(os.path.abspath(os.path.join(SHARED, "models", "all-minilm-l6-v2")), os.path.join(models, "all-minilm-l6-v2"))
    names = [f"adapter-{i:04d}" for i in range(a.n)]
    for name in names:
        d = os.path.join(models, name)
        os.makedirs(d)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(os.path.join(a.adapter, f), d)
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([a.binary, "serve", "--models-dir", models, "--data-dir", os.path.join(work, "data"),
                               "--addr", f"127.0.0.1:{port}", "--adapter-cache-mib", str(a.adapter_cache_mib)],
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "server.log"), "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit(f"the server did not start; see {work}/server.log")
                time.sleep(0.2)
        listed = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=60).read())["data"]
        registered = sum(1 for m in listed if m.get("method") == "lora")
        cold, warm = [], []
        for i, name in enumerate(names):
            url = f"{base}/v1/models/{name}/predict"
            for bucket in (cold, warm):
                t = time.perf_counter()
                post(url, {"inputs": [TEXTS[i % len(TEXTS)]]})
                bucket.append((time.perf_counter() - t) * 1e3)
        rss_after_all = peak_rss_mib(server.pid)
        different, same = [], []
        for _ in range(a.rounds):
            different.append(throughput(base, names[: a.clients], a.clients, a.seconds))
            same.append(throughput(base, names[:1], a.clients, a.seconds))
        report = {
            "adapters": a.n,
            "registered": registered,
            "first_request_p50_ms": statistics.median(cold),
            "loaded_request_p50_ms": statistics.median(warm),
            "first_over_loaded": statistics.median(cold) / statistics.median(warm),
            "peak_rss_mib": rss_after_all,
            "clients": a.clients,
            "texts_per_s_each_client_its_own_adapter": different,
            "texts_per_s_all_clients_one_adapter": same,
            "ratio_of_medians": statistics.median(different) / statistics.median(same),
            "adapter_cache_mib": a.adapter_cache_mib,
        }
        print(json.dumps(report, indent=1))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
