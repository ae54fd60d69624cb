//! The embedded log's integrity through the real binary: a damaged byte in
//! the middle of the log stops the start (it used to be cut away with every
//! record after it), `grabflow log verify` reports it, and `grabflow log
//! repair` keeps every whole record, quarantining the damaged bytes.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `grabflow ARGS`, returning its exit success, stdout and stderr.
fn grabflow(args: &[&str], dir: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The orders of `orders` that `s` does not answer.
async fn missing_orders(s: &Server, app: &str, orders: &[String]) -> Vec<String> {
    let mut missing = Vec::new();
    for id in orders {
        let (status, _) = s.call("GET", &format!("/v1/orders/{id}"), app, None).await;
        if status != 200 {
            missing.push(id.clone());
        }
    }
    missing
}

/// After a repair: the log verifies, and a server started on `dir` with
/// `flags` answers every one of `orders` but at most the damaged record's,
/// the last one (placed after the damage) among them.
async fn all_but_the_damaged_back(
    dir: &std::path::Path,
    flags: &[&str],
    app: &str,
    orders: &[String],
) {
    let (ok, out, _) = grabflow(&["log", "verify"], dir);
    assert!(ok, "{out}");
    let s = Server::start(dir, flags);
    s.wait_ready().await;
    let missing = missing_orders(&s, app, orders).await;
    assert!(
        missing.len() <= 1,
        "lost more than the damaged record: {missing:?}"
    );
    assert!(!missing.contains(orders.last().expect("orders")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_stops_the_start_and_a_repair_keeps_every_whole_record() {
    let dir = temp_dir();
    let mut s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let app = s.token("app", None);
    s.city(&app, &[]).await;
    let orders: Vec<String> = (0..100).map(|n| format!("O{n}")).collect();
    for id in &orders {
        s.order(&app, id).await;
    }
    assert!(Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = exit_within(&mut s.child, Duration::from_secs(20)).expect("stops on SIGTERM");
    assert!(status.success(), "{status}");

    // One flipped byte near the start: most acknowledged orders follow it.
    let log = dir.join("log").join("00000000000000000000.seg");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&log)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, 3000).unwrap();
    f.write_all_at(&[!b[0]], 3000).unwrap();
    drop(f);
    let size = std::fs::metadata(&log).unwrap().len();

    // The start is refused, naming the file, the offset and the command.
    let stderr = refused_start(&dir, &[], "a damaged log must not open");
    assert!(
        stderr.contains("00000000000000000000.seg")
            && stderr.contains("damaged")
            && stderr.contains("grabflow log repair"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        size,
        "nothing is cut"
    );

    let (ok, out, _) = grabflow(&["log", "verify"], &dir);
    assert!(!ok, "verify fails on a damaged log: {out}");
    assert!(
        out.contains("damaged:") && out.contains("follow the first damage"),
        "{out}"
    );

    let (ok, out, err) = grabflow(&["log", "repair"], &dir);
    assert!(ok, "{out}{err}");
    let quarantined: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".quarantine-"))
        .collect();
    assert_eq!(quarantined.len(), 2, "the damaged bytes and their index");
    all_but_the_damaged_back(&dir, &[], &app, &orders).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_segment_cut_short_stops_the_start_and_verify_and_repair_go_through_every_segment()
{
    let dir = temp_dir();
    // Small segments, and no checkpoint: a start reads every segment.
    let flags = ["--log-segment-bytes", "1024", "--checkpoint-interval", "0"];
    let mut s = Server::start(&dir, &flags);
    s.wait_ready().await;
    let app = s.token("app", None);
    s.city(&app, &[]).await;
    let orders: Vec<String> = (0..60).map(|n| format!("O{n}")).collect();
    for id in &orders {
        s.order(&app, id).await;
    }
    assert!(Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    exit_within(&mut s.child, Duration::from_secs(20)).expect("stops on SIGTERM");
    let mut segments: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() > 3, "{segments:?}");
    // A sealed segment loses its last bytes (a torn write is only ever the
    // log's last): damage, not a tail to cut.
    let middle = segments[segments.len() / 2].clone();
    let name = middle.file_name().unwrap().to_str().unwrap().to_string();
    let len = std::fs::metadata(&middle).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&middle)
        .unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);

    let stderr = refused_start(&dir, &flags, "a damaged sealed segment must not open");
    assert!(
        stderr.contains(&name) && stderr.contains("grabflow log verify"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&middle).unwrap().len(),
        len - 3,
        "nothing is cut"
    );

    let (ok, out, _) = grabflow(&["log", "verify"], &dir);
    assert!(!ok, "verify fails: {out}");
    assert!(out.contains(&name) && out.contains("damaged:"), "{out}");
    let (ok, out, err) = grabflow(&["log", "repair"], &dir);
    assert!(ok, "{out}{err}");
    all_but_the_damaged_back(&dir, &flags, &app, &orders).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct Volume(std::path::PathBuf);

impl Volume {
    /// A tmpfs of `mib` MiB, if this process may mount one (root).
    fn mount(mib: u32) -> Option<Volume> {
        let dir = temp_dir();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Volume(dir))
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `PUT /v1/merchants/{id}`: its status and, when acked, its log offset.
async fn put_merchant(s: &Server, app: &str, id: &str) -> (u16, Option<u64>) {
    let body = serde_json::json!({"lat": 31.23, "lon": 121.47});
    let (status, v) = s
        .call("PUT", &format!("/v1/merchants/{id}"), app, Some(body))
        .await;
    (status, v["offset"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_leaves_no_gap_in_the_offsets() {
    let Some(volume) = Volume::mount(16) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let dir = volume.0.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    // Another file takes most of the volume: the log soon has no room.
    let filler = volume.0.join("filler");
    std::fs::write(&filler, vec![1u8; 12 << 20]).unwrap();
    let mut s = Server::start(&dir, &["--checkpoint-interval", "0"]);
    s.wait_ready().await;
    let app = s.token("app", None);
    // Batches of pings until the disk refuses one.
    let batch: Vec<serde_json::Value> = (0..2000)
        .map(|i| serde_json::json!({"rider_id": format!("R{i}"), "lat": 31.23, "lon": 121.47}))
        .collect();
    let mut refused = false;
    for _ in 0..1000 {
        let (status, _) = s
            .call(
                "POST",
                "/v1/locations:batch",
                &app,
                Some(batch.clone().into()),
            )
            .await;
        if status == 503 {
            refused = true;
            break;
        }
        assert_eq!(status, 202);
    }
    assert!(refused, "the disk never filled up");
    // Single events, one at a time, until the disk refuses them too.
    let mut acked = Vec::new();
    let mut refusals = 0;
    for n in 0..100_000 {
        match put_merchant(&s, &app, &format!("M{n}")).await {
            (202, Some(offset)) => acked.push(offset),
            (503, _) => {
                refusals += 1;
                if refusals == 20 {
                    break;
                }
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(refusals, 20, "the disk never refused a single event");
    // Room again: appends are taken again, at the next offset.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut taken = 0;
    let mut n = 1_000_000;
    while taken < 20 {
        n += 1;
        match put_merchant(&s, &app, &format!("M{n}")).await {
            (202, Some(offset)) => {
                acked.push(offset);
                taken += 1;
            }
            (503, _) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("not taken again once there was room: {other:?}"),
        }
    }
    assert!(
        acked.windows(2).all(|w| w[1] == w[0] + 1),
        "the offsets of acked events have gaps: {acked:?}"
    );
    // A restart goes on at the next offset: nothing acked was lost, and
    // nothing refused was kept.
    assert!(Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = exit_within(&mut s.child, Duration::from_secs(20)).expect("stops on SIGTERM");
    assert!(status.success(), "{status}");
    let s = Server::start(&dir, &["--checkpoint-interval", "0"]);
    s.wait_ready().await;
    let (status, offset) = put_merchant(&s, &app, "after-restart").await;
    assert_eq!((status, offset), (202, Some(acked.last().unwrap() + 1)));
}

/// Starts `grabflow serve` on `dir` with `flags`, asserts the start fails
/// (`why` it must), and returns what it said on stderr.
fn refused_start(dir: &std::path::Path, flags: &[&str], why: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(20)).expect("the start ends");
    assert!(!status.success(), "{why}: {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}
