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
    let mut child = Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(20)).expect("the start ends");
    assert!(!status.success(), "a damaged log must not open: {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
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
    let (ok, out, _) = grabflow(&["log", "verify"], &dir);
    assert!(ok, "{out}");

    // Every order but the damaged record's is back, those after it too.
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let mut missing = Vec::new();
    for id in &orders {
        let (status, _) = s.call("GET", &format!("/v1/orders/{id}"), &app, None).await;
        if status != 200 {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.len() <= 1,
        "lost more than the damaged record: {missing:?}"
    );
    assert!(!missing.contains(&"O99".to_string()));
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

    let mut child = Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(20)).expect("the start ends");
    assert!(!status.success(), "a damaged sealed segment must not open");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
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
    let (ok, out, _) = grabflow(&["log", "verify"], &dir);
    assert!(ok, "{out}");

    // Every order but the damaged record's is back, those after it too.
    let s = Server::start(&dir, &flags);
    s.wait_ready().await;
    let mut missing = Vec::new();
    for id in &orders {
        let (status, _) = s.call("GET", &format!("/v1/orders/{id}"), &app, None).await;
        if status != 200 {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.len() <= 1,
        "lost more than the damaged record: {missing:?}"
    );
    assert!(!missing.contains(&"O59".to_string()));
    let _ = std::fs::remove_dir_all(&dir);
}
