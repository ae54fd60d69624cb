//! Connection limits through the real binary: with the open-file limit at
//! 1024 and 1 100 idle connections held, a new request is still answered
//! within a second; a request head sent too slowly, and a keep-alive
//! connection left idle, are closed after `--header-timeout`.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_cannot_shut_out_a_new_request() {
    let dir = temp_dir();
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        "ulimit -n 1024 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_grabflow"),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--header-timeout",
        "2s",
        "--data-dir",
    ])
    .arg(&dir);
    let s = Server::from_command(cmd, &dir);
    s.wait_ready().await;
    let url = s.url.clone();
    let addr = url.trim_start_matches("http://").to_string();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // 1 100 connections that send nothing, more than the server has
    // descriptors for.
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await
        {
            idle.push(c);
        }
    }
    assert!(idle.len() >= 1000, "connected {}", idle.len());

    // A new request is answered within a second, more than once.
    for _ in 0..3 {
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            http.get(format!("{url}/healthz")).send(),
        )
        .await
        .expect("answered within a second")
        .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    drop(idle);

    // A head dribbled out too slowly is cut off after the header timeout.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(6), slow.read(&mut buf))
            .await
            .expect("closed within the header timeout")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // A keep-alive connection left idle after its answer is closed too.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            if kept.read(&mut buf).await.unwrap_or(0) == 0 {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle keep-alive connection is closed");

    // Still serving.
    let r = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server's peak resident memory, from `/proc`.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_pings_is_held_back_with_503s_not_memory() {
    let dir = temp_dir();
    // A backlog of two batches: the pings' own 10 ms cadence exceeds it.
    let s = Server::start(&dir, &["--max-backlog", "2000"]);
    s.wait_ready().await;
    let app = s.token("app", None);
    let url = s.url.clone();
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut clients = Vec::new();
    for c in 0..6u64 {
        let (url, app) = (url.clone(), app.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut acked, mut held_back, mut other) = (0u64, 0u64, Vec::new());
            let mut n = c;
            while Instant::now() < deadline {
                let items: Vec<_> = (0..1000u64)
                    .map(|i| {
                        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407 + i);
                        let north = (n >> 33) as f64 / (1u64 << 31) as f64 - 0.5;
                        serde_json::json!({"rider_id": format!("R{}", n % 50_000), "lat": 31.23 + north * 0.2, "lon": 121.47})
                    })
                    .collect();
                let r = http
                    .post(format!("{url}/v1/locations:batch"))
                    .bearer_auth(&app)
                    .json(&items)
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    202 => acked += 1000,
                    503 => {
                        assert!(r.headers().contains_key("retry-after"));
                        held_back += 1;
                    }
                    s => other.push(s),
                }
            }
            (acked, held_back, other)
        }));
    }
    let (mut acked, mut held_back) = (0, 0);
    for c in clients {
        let (a, h, other) = c.await.unwrap();
        assert!(other.is_empty(), "only 202 and 503: {other:?}");
        acked += a;
        held_back += h;
    }
    let peak = peak_rss_mib(s.child.id());
    println!("flood: {acked} pings acked, {held_back} batches answered 503, peak RSS {peak} MiB");
    assert!(acked > 100_000, "the flood got going: {acked}");
    assert!(held_back > 0, "the backlog bound answered 503s");
    assert!(peak <= 300, "peak RSS {peak} MiB over the 300 MiB bound");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_tokenless_addresses_are_rate_limited_with_429s() {
    let dir = temp_dir();
    let s = Server::start(&dir, &["--rate-limit", "30", "--rate-limit-address", "20"]);
    s.wait_ready().await;
    let (r1, r2) = (s.token("rider", Some("R1")), s.token("rider", Some("R2")));
    let ping = serde_json::json!({"lat": 31.23, "lon": 121.47});
    let post = |rider: &'static str, token: String| {
        let (http, url, ping) = (s.http.clone(), s.url.clone(), ping.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/riders/{rider}/location"))
                .bearer_auth(token)
                .json(&ping)
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (r.status().as_u16(), retry)
        }
    };
    // One rider's token: a second's worth, then 429 with Retry-After.
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..100 {
        statuses.push(post("R1", r1.clone()).await);
    }
    // A second's worth at once, then 30 a second.
    let most = 30 + (30.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    let accepted = statuses.iter().filter(|(s, _)| *s == 202).count();
    let limited: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(
        (30..=most).contains(&accepted),
        "{accepted} accepted, at most {most}"
    );
    assert!(!limited.is_empty() && limited.iter().all(|(_, r)| r.is_some_and(|r| r >= 1)));
    assert_eq!(accepted + limited.len(), 100, "only 202 and 429");
    // Another token has its own budget.
    assert_eq!(post("R2", r2).await.0, 202);
    // Bad tokens count against the address: 401s, then 429s.
    let mut bad = Vec::new();
    for n in 0..200 {
        bad.push(post("R1", format!("forged-{n}")).await.0);
    }
    assert!(bad.iter().take(20).all(|&s| s == 401), "{bad:?}");
    assert!(bad.contains(&429), "{bad:?}");
    // The budget comes back with time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post("R1", r1).await.0, 202);
    let _ = std::fs::remove_dir_all(&dir);
}
