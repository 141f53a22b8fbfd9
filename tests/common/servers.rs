//! Servers the tests start through the repo's scripts (`scripts/postgres.sh`,
//! `scripts/s3-server.sh`): each in a temp dir of its own, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A server started by `scripts/<name> start DIR`.
pub struct Script {
    name: &'static str,
    dir: PathBuf,
    /// What `start` printed: the server's URL.
    pub url: String,
}

impl Script {
    /// Starts a fresh one.
    pub fn start(name: &'static str) -> Self {
        let dir = tempfile::Builder::new().prefix("finetuned-server-").tempdir().unwrap().keep();
        let mut s = Self { name, dir, url: String::new() };
        s.url = s.run("start");
        s
    }

    /// Runs `scripts/<name> what DIR` (`stop`, `resume`) and returns what it printed.
    pub fn run(&self, what: &str) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(self.name);
        let out = Command::new("bash").arg(script).arg(what).arg(&self.dir).output().unwrap();
        assert!(out.status.success(), "{} {what}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(self.name);
        let _ = Command::new("bash").arg(script).arg("stop").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
