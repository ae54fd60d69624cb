//! Shared by the benchmarks: the real `grabflow serve` started and
//! stopped, tokens for it, and its memory from `/proc`.
#![allow(dead_code)]

use grabflow_api::Id;
use grabflow_http::auth::{Claims, Role, Secret};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `cmd` (a server that prints where it listens as its first line)
/// and reads that URL.
pub fn spawn(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if std::env::var("BENCH_STDERR").is_ok() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    (child, url)
}

/// A token of `role` (and rider `id`) signed with `dir`'s secret.
pub fn token(dir: &std::path::Path, role: &str, id: Option<&str>) -> String {
    let secret = Secret::load_or_create(dir).expect("secret");
    let role: Role = role.parse().expect("role");
    secret.sign(&Claims {
        role,
        id: id.map(|i| Id::new(i).expect("id")),
    })
}

/// The peak and current RSS of process `pid`, MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Starts `grabflow serve` on `dir` with `extra`; waits for `/readyz`:
/// the process, its URL and how long it took to be ready.
pub async fn start_ready(dir: &std::path::Path, extra: &[&str]) -> (Child, String, Duration) {
    let t0 = Instant::now();
    let (child, url) = spawn(
        Command::new(env!("CARGO_BIN_EXE_grabflow"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--data-dir")
            .arg(dir),
    );
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status().is_success() {
                return (child, url, t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops `child` with SIGTERM and waits for it.
pub fn sigterm(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
