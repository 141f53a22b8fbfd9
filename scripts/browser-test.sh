#!/usr/bin/env bash
# Browser test of the dashboard: headless Chromium, driven with Selenium, against a live server.
#
#   scripts/browser-test.sh [path/to/finetuned]      (default: target/debug/finetuned)
#
# Starts the binary on a free port with --api-key, a throw-away data dir and a models dir linking
# ../shared/models/all-minilm-l6-v2 (relative to the repo root), then in the page: sees it ask for the
# key, enters it, uploads ../shared/datasets/tiny/train.jsonl, starts a 2-epoch job, waits for the chart
# to draw training and validation points and for the job to succeed, checks the per-epoch, per-class
# and confusion tables, predicts with the new model and checks the scores. Saves a screenshot to
# ${ARTIFACTS_DIR:-target/artifacts}/dashboard.png (also on failure) and exits non-zero on any failure.
#
# Needs /usr/bin/chromium and /usr/bin/chromedriver (installed with apt-get when missing) and
# Selenium from PyPI (installed into a temp venv). Environment (all optional):
#   BROWSER_VENV      virtualenv to (re)use; created and given selenium==$SELENIUM_VERSION if missing
#   BROWSER_TIMEOUT   seconds to wait for the job to succeed (default 600)
set -euo pipefail

SELENIUM_VERSION=4.27.1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_ARG=${1:-$ROOT/target/debug/finetuned}
if [[ ! -x $BIN_ARG ]]; then
    echo "usage: $0 [path/to/finetuned]  ($BIN_ARG is not an executable: build it first)" >&2
    exit 2
fi
BIN=$(cd "$(dirname "$BIN_ARG")" && pwd)/$(basename "$BIN_ARG")
MODEL_SRC=$ROOT/../shared/models/all-minilm-l6-v2
DATASET=$ROOT/../shared/datasets/tiny/train.jsonl
ARTIFACTS=${ARTIFACTS_DIR:-$ROOT/target/artifacts}
mkdir -p "$ARTIFACTS"
ARTIFACTS=$(cd "$ARTIFACTS" && pwd)

for f in "$MODEL_SRC/config.json" "$MODEL_SRC/tokenizer.json" "$MODEL_SRC/model.safetensors" "$DATASET"; do
    [[ -f $f ]] || { echo "missing $f" >&2; exit 2; }
done

# --- browser and driver -----------------------------------------------------------------------------
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "installing chromium and chromium-driver from Debian"
    SUDO=; [[ $EUID -eq 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
fi

# shellcheck source=server-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/server-lib.sh"
make_work browser

VENV=${BROWSER_VENV:-$WORK/venv}
if ! "$VENV/bin/python" -c "import selenium, sys; sys.exit(selenium.__version__ != '$SELENIUM_VERSION')" 2>/dev/null; then
    echo "installing selenium==$SELENIUM_VERSION into $VENV"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "selenium==$SELENIUM_VERSION"
fi

# --- server -------------------------------------------------------------------------------------------
KEY="dash-$RANDOM$RANDOM$RANDOM"
start_server "$BIN" "$MODEL_SRC" --api-key "$KEY"

# --- the browser session ------------------------------------------------------------------------------
cat >"$WORK/drive.py" <<'EOF'
"""Drives the dashboard in headless Chromium; any failed step raises, after a screenshot."""
import json, os, re, sys, time, urllib.request
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

base, key, dataset, shot, profile = sys.argv[1:6]
job_timeout = float(os.environ.get("BROWSER_TIMEOUT", "600"))

opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage", "--window-size=1440,1000", "--user-data-dir=" + profile]:
    opts.add_argument(a)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
d.set_script_timeout(30)

def by(id_):
    return d.find_element(By.ID, id_)

def text(id_):
    return by(id_).text

def wait(what, cond, timeout=30.0):
    # The page re-renders its tables as events arrive, so an element read mid-render can go
    # stale: any error in `cond` counts as "not yet" and the wait polls on until the deadline.
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        try:
            got = cond()
            if got:
                return got
        except Exception as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {time.time() - t0:.0f}s waiting for {what} (last error: {last!r})")

def step(msg):
    print(f"[browser] {msg}", flush=True)

def screenshot():
    # Grow the window to the whole page so one screenshot shows every panel.
    h = d.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    d.set_window_size(1440, min(max(h + 140, 900), 4000))
    time.sleep(0.6)
    d.save_screenshot(shot)
    step(f"screenshot saved to {shot}")

try:
    d.get(base + "/")
    wait("the page to ask for the API key", lambda: "API key" in text("key-status"))
    step("page asks for the key: " + text("key-status"))
    by("api-key").send_keys(key)
    by("key-save").click()
    wait("the page to connect", lambda: text("key-status").startswith("Connected"))

    by("dataset-file").send_keys(dataset)
    by("dataset-name").send_keys("tiny-sentiment")
    by("dataset-upload").click()
    wait("the upload to succeed", lambda: "ok" in by("upload-status").get_attribute("class"))
    step("upload: " + text("upload-status"))
    assert "64 rows" in text("upload-status"), text("upload-status")
    wait("the dataset to be listed", lambda: "tiny-sentiment" in text("datasets-table"))

    ds = Select(by("job-dataset")).first_selected_option.text
    assert ds.startswith("tiny-sentiment"), ds
    Select(by("job-base")).select_by_value("all-minilm-l6-v2")
    for id_, v in [("job-name", "dash-sentiment"), ("job-epochs", "2"), ("job-lr", "0.0002"),
                   ("job-batch", "4"), ("job-maxlen", "32")]:
        by(id_).clear()
        by(id_).send_keys(v)
    by("job-start").click()
    wait("the job to be queued", lambda: "ok" in by("job-status").get_attribute("class"), 30)
    step("start: " + text("job-status"))
    wait("the job detail to open", lambda: by("job-detail").is_displayed())

    points = lambda kind: int(by("loss-chart").get_attribute(f"data-{kind}-points") or 0)
    saw_live = False
    t0 = time.time()
    while True:
        try:
            status = text("detail-status")
            if status == "running" and points("train") > 0:
                saw_live = True
        except Exception:  # the detail pane re-rendered under us: read again
            status = ""
        if status in ("succeeded", "failed", "cancelled"):
            break
        assert time.time() - t0 < job_timeout, f"job still {status} after {job_timeout:.0f}s"
        time.sleep(0.3)
    assert status == "succeeded", f"job ended {status}: {text('detail-summary')}"
    step(f"job succeeded in {time.time() - t0:.0f}s; chart drew points while running: {saw_live}")
    wait("the chart to draw 2 epochs", lambda: points("train") >= 2 and points("val") >= 2)
    step(f"chart: {points('train')} training points, {points('val')} validation points")
    # The canvas holds drawn pixels in the training-loss colour, not just data attributes.
    drawn = d.execute_script("""
        const c = document.getElementById('loss-chart'), g = c.getContext('2d');
        const px = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < px.length; i += 4) if (px[i] < 80 && px[i+1] > 70 && px[i+1] < 110 && px[i+2] > 190) n++;
        return n;""")
    assert drawn > 200, f"the chart has only {drawn} pixels of the training-loss line"
    wait("the epoch table", lambda: len(by("epoch-table").find_elements(By.CSS_SELECTOR, "tbody tr td.num")) >= 12)
    wait("the per-class table", lambda: {"negative", "positive"} <= {
        r.find_element(By.TAG_NAME, "td").text for r in by("per-class-table").find_elements(By.CSS_SELECTOR, "tbody tr")})
    wait("the confusion matrix", lambda: len(by("confusion-matrix").find_elements(By.CSS_SELECTOR, "td.cell")) == 4)
    log = text("event-log")
    assert "job succeeded" in log, log
    # The per-class table and the confusion matrix are of the epoch the job kept, as its log says.
    kept = re.search(r"kept the weights of epoch (\d+)", log)
    assert kept, log
    # (The heading is shown in capitals by the style sheet.)
    wait(f"the per-class title to name the kept epoch {kept.group(1)}", lambda: f"epoch {kept.group(1)}, kept" in text("per-class-title").lower())

    try_button = lambda: by("models-table").find_elements(By.CSS_SELECTOR, 'tr[data-model="dash-sentiment"] button')
    wait("the new model in the models table", lambda: try_button(), 30)
    try_button()[0].click()
    chosen = Select(by("predict-model")).first_selected_option.get_attribute("value")
    assert chosen == "dash-sentiment", f"Try picked {chosen}"
    by("predict-input").clear()
    by("predict-input").send_keys("a gripping, beautifully acted film\ndull, lifeless and far too long")
    by("predict-run").click()
    wait("the prediction", lambda: len(by("predict-result").find_elements(By.CSS_SELECTOR, ".pred-row")) == 4)
    rows = [r.text.split("\n") for r in by("predict-result").find_elements(By.CSS_SELECTOR, ".pred-row")]
    step(f"predict: {text('predict-result')!r}")
    for pair in (rows[:2], rows[2:]):
        labels = {r[0] for r in pair}
        scores = [float(r[-1]) for r in pair]
        assert labels == {"negative", "positive"}, pair
        assert scores[0] >= scores[1] and abs(sum(scores) - 1) < 1e-3, pair

    # The form's method, LoRA rank and epochs "auto": the job stored says what was chosen, and
    # the learning rate left empty resolves to the method's own default.
    Select(by("job-method")).select_by_value("lora")
    by("job-lora-r").clear()
    by("job-lora-r").send_keys("4")
    by("job-epochs-auto").click()
    by("job-lr").clear()
    by("job-name").clear()
    by("job-name").send_keys("dash-lora")
    first = text("job-status")
    by("job-start").click()
    wait("the LoRA job to be queued", lambda: text("job-status").startswith("Queued") and text("job-status") != first, 30)
    job_id = text("job-status").split()[1].rstrip(".")
    req = lambda path, method="GET": json.load(urllib.request.urlopen(urllib.request.Request(
        base + path, method=method, headers={"Authorization": "Bearer " + key})))
    hp = req(f"/v1/jobs/{job_id}")["hyperparameters"]
    step(f"LoRA job from the form: {hp}")
    assert hp["method"] == "lora" and hp["lora"]["r"] == 4 and hp["auto_epochs"] is True, hp
    assert hp["learning_rate"] == 0.002, hp
    req(f"/v1/jobs/{job_id}/cancel", "POST")

    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not errors, "errors in the browser console: " + json.dumps(errors)
    d.execute_script("window.scrollTo(0, 0)")
    screenshot()
    step("all checks passed")
except BaseException:
    try:
        screenshot()
        print("[browser] key status:", text("key-status"), "| upload:", text("upload-status"),
              "| job:", text("job-status"), "| stream:", text("stream-status"), file=sys.stderr)
        print("[browser] console:", json.dumps(d.get_log("browser"))[:4000], file=sys.stderr)
    except Exception as e:
        print(f"[browser] could not save the failure screenshot: {e}", file=sys.stderr)
    raise
finally:
    d.quit()
EOF

mkdir -p "$WORK/profile"
"$VENV/bin/python" "$WORK/drive.py" "$BASE" "$KEY" "$(cd "$(dirname "$DATASET")" && pwd)/train.jsonl" \
    "$ARTIFACTS/dashboard.png" "$WORK/profile"
echo "browser test passed; screenshot: $ARTIFACTS/dashboard.png"
