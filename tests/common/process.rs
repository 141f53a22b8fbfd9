//! Our real binary as a child process: started on a free port, killed when dropped.

use serde_json::Value;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many of the server's last log lines a failing test prints.
const LOG_TAIL: usize = 200;

/// A server process, killed when dropped (so a failing test leaves none behind). When it is
/// dropped because the test panicked, the tail of its log is printed with the failure.
pub struct Server(pub Child, Arc<Mutex<VecDeque<String>>>);

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let tail = self.1.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("--- the last {} lines of server {}'s log ---", tail.len(), self.0.id());
            tail.iter().for_each(|l| eprintln!("{l}"));
        }
    }
}

/// Starts `finetuned serve` on a free port; returns the child and its base URL.
pub fn start(data: &Path, models: &Path) -> (Server, String) {
    start_with(data, models, &[])
}

/// As [`start`], with extra options.
pub fn start_with(data: &Path, models: &Path, extra: &[&str]) -> (Server, String) {
    start_with_env(data, models, extra, &[])
}

/// As [`start_with`], with extra environment variables.
pub fn start_with_env(data: &Path, models: &Path, extra: &[&str], env: &[(String, String)]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_finetuned"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["serve", "--addr", "127.0.0.1:0", "--device", "cpu"])
        .args(extra)
        .args(
            super::test_database_url(data)
                .filter(|_| !extra.iter().any(|a| a.starts_with("--database-url")))
                .map(|url| format!("--database-url={url}")),
        )
        .arg("--data-dir")
        .arg(data)
        .arg("--models-dir")
        .arg(models)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Split on bytes, not `lines()`: a line that is not UTF-8 must not stop the draining.
    let mut lines =
        BufReader::new(child.stderr.take().unwrap()).split(b'\n').map(|l| l.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()));
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
    let url = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        tail.lock().unwrap().push_back(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().trim_end_matches(|c: char| !c.is_ascii_digit()).to_string();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe; keep its tail.
    let kept = tail.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            while kept.len() >= LOG_TAIL {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    });
    (Server(child, tail), url)
}

pub async fn wait_for(client: &reqwest::Client, url: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "not reached in {secs}s: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a job object has ended.
pub fn ended(j: &Value) -> bool {
    ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
}

/// Sends a request that must succeed and returns its JSON body.
pub async fn post(body: reqwest::RequestBuilder) -> Value {
    let r = body.send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}
