//! Checkpoints through the real binary: a restart replays only the log
//! after the latest checkpoint and gives back the same state; `kill -9`
//! while checkpoints are being written loses nothing acknowledged; a
//! damaged latest checkpoint falls back to the one before.

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// Every order's answer, every rider's, the business counters, and the
/// riders' streams from the start: what a restart must give back.
async fn state(s: &Server, app: &str, orders: &[String], riders: &[(&str, String)]) -> Value {
    let mut out = serde_json::Map::new();
    for id in orders {
        let (status, body) = s.call("GET", &format!("/v1/orders/{id}"), app, None).await;
        out.insert(format!("order {id}"), json!([status, body]));
    }
    for (rider, token) in riders {
        let (_, mut body) = s
            .call("GET", &format!("/v1/riders/{rider}"), token, None)
            .await;
        // Where the rider was last seen is kept; its index entry too.
        body.as_object_mut().map(|b| b.remove("indexed"));
        out.insert(format!("rider {rider}"), body);
    }
    let (_, m) = s
        .call("GET", "/v1/ops/metrics", &s.token("ops", None), None)
        .await;
    for k in [
        "orders_by_state",
        "decisions",
        "grabs_won",
        "grabs_lost",
        "orders",
    ] {
        out.insert(k.to_string(), m[k].clone());
    }
    Value::Object(out)
}

/// Waits until the dataflow has caught up with every event appended.
async fn settled(s: &Server) {
    let ops = s.token("ops", None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = s.call("GET", "/v1/ops/metrics", &ops, None).await;
        let d = &m["dataflow"];
        if d["frontier_ms"].as_u64() > d["last_event_ms"].as_u64() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the dataflow never caught up: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The checkpoint figures of `/v1/ops/metrics`.
async fn checkpoint(s: &Server) -> Value {
    let (_, m) = s
        .call("GET", "/v1/ops/metrics", &s.token("ops", None), None)
        .await;
    m["checkpoint"].clone()
}

/// Some traffic: a merchant, riders on shift, orders placed, grabbed,
/// picked up and delivered (one of each kind of step), keyed requests.
async fn traffic(s: &Server, app: &str, riders: &[(&str, String)], orders: &[String]) {
    let city: Vec<(&str, &str, f64)> = riders
        .iter()
        .enumerate()
        .map(|(i, (r, t))| (*r, t.as_str(), 50.0 + 40.0 * i as f64))
        .collect();
    s.city(app, &city).await;
    for (rider, token) in riders {
        let shift = json!({"online": true, "capacity": 50});
        let (st, _) = s
            .call(
                "PUT",
                &format!("/v1/riders/{rider}/shift"),
                token,
                Some(shift),
            )
            .await;
        assert_eq!(st, 202);
    }
    for (i, id) in orders.iter().enumerate() {
        s.order(app, id).await;
        let (rider, token) = &riders[i % riders.len()];
        // The grab waits for the offer (placed and grabbed in one
        // millisecond, it would find the order not yet offered).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (st, body) = s
                .call("POST", &format!("/v1/orders/{id}/grab"), token, None)
                .await;
            if (st, &body["result"]) == (200, &json!("won")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "grab {id} by {rider}: {st} {body}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if i % 3 != 2 {
            let (st, body) = s
                .call("POST", &format!("/v1/orders/{id}/pickup"), token, None)
                .await;
            assert_eq!(st, 200, "pickup {id} by {rider}: {body}");
        }
        if i % 3 == 0 {
            let (st, body) = s
                .call("POST", &format!("/v1/orders/{id}/delivered"), token, None)
                .await;
            assert_eq!(st, 200, "delivery of {id} by {rider}: {body}");
        }
    }
}

fn sigterm(s: &mut Server) {
    assert!(Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = exit_within(&mut s.child, Duration::from_secs(30)).expect("stops on SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replays_only_what_follows_the_latest_checkpoint_and_gives_back_the_same_state() {
    let dir = temp_dir();
    let flags = ["--checkpoint-interval", "100ms", "--workers", "2"];
    let mut s = Server::start(&dir, &flags);
    s.wait_ready().await;
    let app = s.token("app", None);
    let riders: Vec<(&str, String)> = ["R1", "R2", "R3"]
        .iter()
        .map(|r| (*r, s.token("rider", Some(r))))
        .collect();
    let orders: Vec<String> = (0..12).map(|n| format!("O{n}")).collect();
    traffic(&s, &app, &riders, &orders).await;
    let keyed =
        json!({"order_id": "K1", "merchant_id": "M1", "dropoff": {"lat": 31.22, "lon": 121.48}});
    let first = s
        .call_keyed("POST", "/v1/orders", &app, "key-1", keyed.clone())
        .await;
    assert_eq!(first.0, 202);
    settled(&s).await;
    // Checkpoints are taken as the log's clock moves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while checkpoint(&s).await["written"].as_u64().unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "no checkpoint written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut all = orders.clone();
    all.push("K1".into());
    let before = state(&s, &app, &all, &riders).await;
    let mut ws = s.ws("R1", &riders[0].1, 0).await;
    let mut stream = Vec::new();
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout(Duration::from_millis(300), futures_next(&mut ws)).await
    {
        stream.push(m);
    }
    drop(ws);
    assert!(!stream.is_empty(), "R1 had offers");
    sigterm(&mut s);
    let files = std::fs::read_dir(dir.join("checkpoints")).unwrap().count();
    assert!(
        (1..=3).contains(&files),
        "the newest checkpoints are kept: {files}"
    );

    // A graceful stop checkpoints at its end: the restart replays nothing.
    let s = Server::start(&dir, &flags);
    s.wait_ready().await;
    let c = checkpoint(&s).await;
    assert_eq!(c["replayed_events"], 0, "{c}");
    assert!(c["started_from_ms"].as_u64().unwrap() > 0, "{c}");
    settled(&s).await;
    assert_eq!(state(&s, &app, &all, &riders).await, before);
    // The rider's stream is the same, seq for seq.
    let mut ws = s.ws("R1", &riders[0].1, 0).await;
    let mut again = Vec::new();
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout(Duration::from_millis(300), futures_next(&mut ws)).await
    {
        again.push(m);
    }
    assert_eq!(again, stream);
    // The idempotency key is known: the repeat gets the first answer.
    let repeat = s
        .call_keyed("POST", "/v1/orders", &app, "key-1", keyed)
        .await;
    assert_eq!(repeat, first);
    // Riders and orders go on where they were.
    let (st, body) = s
        .call("POST", "/v1/orders/O1/delivered", &riders[1].1, None)
        .await;
    assert_eq!((st, &body["state"]), (200, &json!("closed")), "{body}");
}

async fn futures_next(ws: &mut Ws) -> Option<Result<String, ()>> {
    use futures_util::StreamExt;
    loop {
        match ws.next().await? {
            Ok(tokio_tungstenite::tungstenite::Message::Text(t)) => return Some(Ok(t.to_string())),
            Ok(_) => continue,
            Err(_) => return Some(Err(())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_checkpoints_are_written_loses_nothing_acknowledged() {
    let dir = temp_dir();
    // A checkpoint every few milliseconds of log time: a kill lands in the
    // middle of writing one more often than not. Small segments, and a
    // retention that lets them go as soon as the checkpoints do: kills
    // land while segments roll and are deleted too.
    let flags = [
        "--checkpoint-interval",
        "5ms",
        "--log-segment-bytes",
        "1024",
        "--log-retention",
        "1ms",
    ];
    let app_riders = ["R1", "R2"];
    let mut placed: Vec<String> = Vec::new();
    for round in 0..4 {
        let mut s = Server::start(&dir, &flags);
        s.wait_ready().await;
        let app = s.token("app", None);
        let riders: Vec<(&str, String)> = app_riders
            .iter()
            .map(|r| (*r, s.token("rider", Some(r))))
            .collect();
        if round > 0 {
            // Everything acknowledged before the kill is there.
            settled(&s).await;
            for id in &placed {
                let (st, body) = s.call("GET", &format!("/v1/orders/{id}"), &app, None).await;
                assert_eq!(st, 200, "round {round}: {id} lost: {body}");
            }
        }
        let orders: Vec<String> = (0..6).map(|n| format!("O{round}-{n}")).collect();
        traffic(&s, &app, &riders, &orders).await;
        placed.extend(orders);
        settled(&s).await;
        let before = state(&s, &app, &placed, &riders).await;
        s.kill9();
        let s = Server::start(&dir, &flags);
        s.wait_ready().await;
        settled(&s).await;
        let after = state(&s, &app, &placed, &riders).await;
        for (k, v) in before.as_object().unwrap() {
            assert_eq!(
                &after[k], v,
                "round {round}: {k} after kill -9 and restart (left), before (right)"
            );
        }
        let c = checkpoint(&s).await;
        assert!(
            c["started_from_ms"].as_u64() > Some(0),
            "round {round}: {c}"
        );
        drop(s);
    }
    assert!(segment_files(&dir).len() > 1, "{:?}", segment_files(&dir));
}

/// The first offsets of the log's segment files in `dir`.
fn segment_files(dir: &std::path::Path) -> Vec<u64> {
    let mut firsts: Vec<u64> = std::fs::read_dir(dir.join("log"))
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let name = e.ok()?.file_name().into_string().ok()?;
                    name.strip_suffix(".seg")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    firsts.sort();
    firsts
}

/// The log figures of `/v1/ops/metrics`.
async fn log_figures(s: &Server) -> Value {
    let (_, m) = s
        .call("GET", "/v1/ops/metrics", &s.token("ops", None), None)
        .await;
    m["log"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_segments_and_a_kill_9_after_gives_back_the_same_state() {
    let dir = temp_dir();
    let flags = [
        "--checkpoint-interval",
        "20ms",
        "--log-segment-bytes",
        "1024",
        "--log-retention",
        "1ms",
    ];
    let mut s = Server::start(&dir, &flags);
    s.wait_ready().await;
    let app = s.token("app", None);
    let riders: Vec<(&str, String)> = ["R1", "R2"]
        .iter()
        .map(|r| (*r, s.token("rider", Some(r))))
        .collect();
    let orders: Vec<String> = (0..30).map(|n| format!("O{n}")).collect();
    traffic(&s, &app, &riders, &orders).await;
    settled(&s).await;
    let rolled = segment_files(&dir);
    assert!(rolled.len() > 2, "segments rolled: {rolled:?}");
    // Once the checkpoints pass them, the old segments go.
    let deadline = Instant::now() + Duration::from_secs(20);
    while segment_files(&dir).first() == Some(&0) {
        assert!(
            Instant::now() < deadline,
            "nothing deleted: {:?}",
            segment_files(&dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = segment_files(&dir);
    let figures = log_figures(&s).await;
    assert!(
        figures["segments"].as_u64() >= Some(1) && figures["bytes"].as_u64() > Some(0),
        "{figures}"
    );
    let text = s.prometheus(&s.token("ops", None)).await;
    assert!(
        text.contains("grabflow_log_segments ") && text.contains("grabflow_log_bytes "),
        "{text}"
    );
    let before = state(&s, &app, &orders, &riders).await;

    // Killed right after the deletion: the restart starts from a
    // checkpoint the kept segments follow on from, and answers the same.
    s.kill9();
    let s = Server::start(&dir, &flags);
    s.wait_ready().await;
    settled(&s).await;
    assert_eq!(state(&s, &app, &orders, &riders).await, before);
    assert!(segment_files(&dir).first() >= kept.first());
    // And goes on where it was.
    let (st, body) = s
        .call("POST", "/v1/orders/O1/delivered", &riders[1].1, None)
        .await;
    assert!(st == 200 || st == 409, "{st} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_0_12_with_one_events_log_is_moved_into_segments_and_loses_nothing() {
    let dir = temp_dir();
    let mut s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let app = s.token("app", None);
    let riders: Vec<(&str, String)> = vec![("R1", s.token("rider", Some("R1")))];
    let orders: Vec<String> = (0..5).map(|n| format!("O{n}")).collect();
    traffic(&s, &app, &riders, &orders).await;
    settled(&s).await;
    let before = state(&s, &app, &orders, &riders).await;
    sigterm(&mut s);
    // The data dir as 0.12 left it: the whole log in events.log, and no
    // checkpoint (the whole log is replayed).
    assert_eq!(segment_files(&dir), vec![0]);
    std::fs::rename(
        dir.join("log").join("00000000000000000000.seg"),
        dir.join("events.log"),
    )
    .unwrap();
    std::fs::remove_dir(dir.join("log")).unwrap();
    std::fs::remove_dir_all(dir.join("checkpoints")).unwrap();

    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    settled(&s).await;
    assert!(!dir.join("events.log").exists());
    assert_eq!(segment_files(&dir), vec![0]);
    assert_eq!(state(&s, &app, &orders, &riders).await, before);
    let c = checkpoint(&s).await;
    assert!(c["replayed_events"].as_u64() > Some(0), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_latest_checkpoint_is_skipped_for_the_one_before() {
    let dir = temp_dir();
    // Checkpoints at the graceful stops only: one after the first run's
    // orders, one after the second's.
    let flags = ["--checkpoint-interval", "1h"];
    let mut s = Server::start(&dir, &flags);
    s.wait_ready().await;
    let app = s.token("app", None);
    let riders: Vec<(&str, String)> = vec![("R1", s.token("rider", Some("R1")))];
    let first: Vec<String> = (0..3).map(|n| format!("A{n}")).collect();
    traffic(&s, &app, &riders, &first).await;
    sigterm(&mut s);
    let s2 = Server::start(&dir, &flags);
    let mut s = s2;
    s.wait_ready().await;
    let second: Vec<String> = (0..3).map(|n| format!("B{n}")).collect();
    traffic(&s, &app, &riders, &second).await;
    settled(&s).await;
    let orders: Vec<String> = first.iter().chain(&second).cloned().collect();
    let before = state(&s, &app, &orders, &riders).await;
    sigterm(&mut s);
    let mut files: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    let newest = files.last().unwrap().clone();
    let older: u64 = files[0]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&newest, bytes).unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grabflow"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args(flags)
        .stderr(std::process::Stdio::piped());
    let mut s = Server::from_command(cmd, &dir);
    s.wait_ready().await;
    settled(&s).await;
    let c = checkpoint(&s).await;
    assert_eq!(c["started_from_ms"].as_u64(), Some(older), "{c}");
    assert!(c["replayed_events"].as_u64() > Some(0), "{c}");
    assert_eq!(state(&s, &app, &orders, &riders).await, before);
    // Loudly: the skipped file is named in the log.
    let _ = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status();
    let _ = exit_within(&mut s.child, Duration::from_secs(30));
    let mut err = String::new();
    use std::io::Read;
    s.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("skipping a checkpoint")
            && err.contains(newest.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}
