//! Retention through the real binary, with retentions of seconds (log time
//! follows the clock here: the embedded log ticks): a closed order leaves
//! the live view for the history store and is answered from disk, then 404
//! `expired`; an idempotency key is a new request after its window; a
//! rider resuming from a seq no longer kept gets a `gap` message first,
//! over the WebSocket and SSE. A restart on the same data dir keeps each.

mod common;
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Retentions of seconds, and a checkpoint every second.
const SHORT: &[&str] = &[
    "--order-retention",
    "2s",
    "--history-retention",
    "8s",
    "--idempotency-window",
    "3s",
    "--stream-retention",
    "2s",
    "--checkpoint-interval",
    "1s",
];

/// `GET /v1/ops/metrics`.
async fn metrics(s: &Server) -> Value {
    s.call("GET", "/v1/ops/metrics", &s.token("ops", None), None)
        .await
        .1
}

/// Waits (up to 20 s) until `check` holds of the metrics.
async fn until_metrics(s: &Server, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(s).await;
        if check(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "never {what}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restarts `s` on its data dir after a `kill -9`, ready.
async fn restart(mut s: Server) -> Server {
    s.kill9();
    let s = Server::start(&s.dir.clone(), SHORT);
    s.wait_ready().await;
    s
}

/// The close time of an order's answer (its last step's `at`).
fn closed_at(order: &Value) -> u64 {
    order["history"].as_array().unwrap().last().unwrap()["at"]
        .as_u64()
        .unwrap()
}

/// Sleeps until the log time `at` (ms; log time follows the clock) has
/// passed by 300 ms.
async fn until_log_time(at: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now) + 300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_order_is_answered_from_disk_then_expires_across_restarts() {
    let dir = temp_dir();
    let s = Server::start(&dir, SHORT);
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    s.order(&app, "O1").await;
    s.order(&app, "O2").await;
    let (st, body) = s.call("POST", "/v1/orders/O1/cancel", &app, None).await;
    assert_eq!(st, 202, "{body}");
    // Closed, and still in the live view (with O2, open).
    let live = until_metrics(&s, "O1 closed", |m| m["orders_by_state"]["closed"] == 1).await;
    assert_eq!(live["orders"], 2, "{live}");
    let (st, closed) = s.call("GET", "/v1/orders/O1", &app, None).await;
    assert_eq!((st, &closed["state"]), (200, &json!("closed")), "{closed}");
    let close = closed_at(&closed);
    // Two seconds on, it has left the view: answered whole from disk.
    let shrunk = until_metrics(&s, "O1 archived", |m| m["orders"] == 1).await;
    assert_eq!(shrunk["orders_archived"], 1, "{shrunk}");
    assert_eq!(shrunk["orders_by_state"]["closed"], 0, "{shrunk}");
    let (st, body) = s.call("GET", "/v1/orders/O1", &app, None).await;
    assert_eq!((st, &body), (200, &closed));
    // A restart from the checkpoint (and the log after it) gives the same.
    let s = restart(s).await;
    let (st, body) = s.call("GET", "/v1/orders/O1", &app, None).await;
    assert_eq!((st, &body), (200, &closed));
    let m = metrics(&s).await;
    assert_eq!(
        (&m["orders"], &m["orders_archived"]),
        (&json!(1), &json!(1)),
        "{m}"
    );
    // An order never seen is not found; O1, past the history retention, has
    // expired: on this run and the next.
    let (st, body) = s.call("GET", "/v1/orders/O404", &app, None).await;
    assert_eq!((st, &body["error"]["code"]), (404, &json!("not_found")));
    until_log_time(close + 8_000).await;
    let (st, body) = s.call("GET", "/v1/orders/O1", &app, None).await;
    assert_eq!(
        (st, &body["error"]["code"]),
        (404, &json!("expired")),
        "{body}"
    );
    assert_eq!(body["error"]["field"], "order_id");
    let s = restart(s).await;
    let (st, body) = s.call("GET", "/v1/orders/O1", &app, None).await;
    assert_eq!(
        (st, &body["error"]["code"]),
        (404, &json!("expired")),
        "{body}"
    );
    // The open order is untouched.
    let (st, body) = s.call("GET", "/v1/orders/O2", &app, None).await;
    assert_eq!(st, 200, "{body}");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `PUT /v1/merchants/M1` with `Idempotency-Key: K1`.
async fn put_keyed(s: &Server, app: &str) -> (u16, Value) {
    let body = json!({"lat": 31.23, "lon": 121.47});
    s.call_keyed("PUT", "/v1/merchants/M1", app, "K1", body)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_a_new_request_after_its_window() {
    let dir = temp_dir();
    let s = Server::start(&dir, SHORT);
    s.wait_ready().await;
    let app = s.token("app", None);
    let (st, first) = put_keyed(&s, &app).await;
    assert_eq!(st, 202, "{first}");
    // Within the window: the same answer, nothing appended.
    let (st, again) = put_keyed(&s, &app).await;
    assert_eq!((st, &again), (202, &first));
    // After a restart, still within it: the same.
    let s = restart(s).await;
    let (st, again) = put_keyed(&s, &app).await;
    assert_eq!((st, &again), (202, &first));
    // Past the window: a new append.
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    let (st, fresh) = put_keyed(&s, &app).await;
    assert_eq!(st, 202, "{fresh}");
    assert_ne!(fresh["offset"], first["offset"], "{fresh} {first}");
    assert_ne!(fresh["event_id"], first["event_id"]);
    // Its window starts again: a repeat (after a restart too) gets it.
    let (st, again) = put_keyed(&s, &app).await;
    assert_eq!((st, &again), (202, &fresh));
    let s = restart(s).await;
    let (st, again) = put_keyed(&s, &app).await;
    assert_eq!((st, &again), (202, &fresh));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SSE events of `rider` after `after` (as `Last-Event-ID`) until one
/// whose data names `until`: (id, data) pairs.
async fn sse(s: &Server, rider: &str, token: &str, after: u64, until: &str) -> Vec<(u64, Value)> {
    let resp = s
        .http
        .get(format!("{}/v1/riders/{rider}/stream", s.url))
        .bearer_auth(token)
        .header("Last-Event-ID", after.to_string())
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains(until) || !text.ends_with("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.split("\n\n")
        .filter_map(|event| {
            let id = event.lines().find_map(|l| l.strip_prefix("id: "))?;
            let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((id.parse().unwrap(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

/// The first messages on a WebSocket resumed after `after`, up to the one
/// naming `until`.
async fn ws_until(s: &Server, rider: &str, token: &str, after: u64, until: &str) -> Vec<Value> {
    let mut ws = s.ws(rider, token, after).await;
    let mut got = Vec::new();
    loop {
        let m = expect_msg(&mut ws, |_| true).await;
        let done = m["order_id"] == until;
        got.push(m);
        if done {
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_resuming_from_a_trimmed_seq_gets_a_gap_first() {
    let dir = temp_dir();
    let s = Server::start(&dir, SHORT);
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = s.ws("R1", &r1, 0).await;
    s.order(&app, "O1").await;
    let first = expect_msg(&mut ws, is("offer", "O1")).await;
    let seen = first["seq"].as_u64().unwrap();
    drop(ws);
    // The offer ages out of the ring (2 s); the next message starts the
    // stream over above it.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    s.order(&app, "O2").await;
    let got = ws_until(&s, "R1", &r1, seen, "O2").await;
    let offer = got.last().unwrap().clone();
    let next = offer["seq"].as_u64().unwrap();
    assert!(next > seen + 1, "{got:?}");
    assert_eq!(got[0], json!({"type": "gap", "first_seq": next}), "{got:?}");
    assert_eq!(got.len(), 2, "the gap, then the offer: {got:?}");
    // SSE: the gap's id is the seq before the first one it can have.
    let events = sse(&s, "R1", &r1, seen, "\"O2\"").await;
    assert_eq!(
        events,
        vec![
            (next - 1, json!({"type": "gap", "first_seq": next})),
            (next, offer.clone())
        ]
    );
    // From the offer's own seq minus one: no gap.
    let events = sse(&s, "R1", &r1, next - 1, "\"O2\"").await;
    assert_eq!(events, vec![(next, offer.clone())]);
    // A restart gives the same seqs and the same gap.
    let s = restart(s).await;
    let got = ws_until(&s, "R1", &r1, seen, "O2").await;
    assert_eq!(
        got,
        vec![json!({"type": "gap", "first_seq": next}), offer.clone()]
    );
    let events = sse(&s, "R1", &r1, seen, "\"O2\"").await;
    assert_eq!(
        events[0],
        (next - 1, json!({"type": "gap", "first_seq": next}))
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET /v1/riders/R1`.
async fn get_rider(s: &Server, app: &str) -> (u16, Value) {
    s.call("GET", "/v1/riders/R1", app, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_idle_past_its_retention_is_forgotten_and_comes_back_off_shift() {
    let dir = temp_dir();
    let args = [
        "--rider-ttl",
        "1s",
        "--grab-timeout",
        "1s",
        "--rider-retention",
        "2s",
    ];
    let s = Server::start(&dir, &args);
    s.wait_ready().await;
    let r1 = s.token("rider", Some("R1"));
    let shift = json!({"online": true, "capacity": 2});
    let ping = json!({"lat": 31.23, "lon": 121.47});
    let (status, _) = s.call("PUT", "/v1/riders/R1/shift", &r1, Some(shift)).await;
    assert_eq!(status, 202);
    let (status, _) = s
        .call("POST", "/v1/riders/R1/location", &r1, Some(ping.clone()))
        .await;
    assert_eq!(status, 202);
    let app = s.token("app", None);
    let rider = |s| get_rider(s, &app);
    // Known, on shift, at its position.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, r) = rider(&s).await;
        if status == 200 && r["lat"].is_number() {
            assert_eq!(r["online"], true, "{r}");
            assert_eq!(r["capacity"], 2, "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "never known: {status} {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Silent past its retention: forgotten by the dataflow and the view.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, r) = rider(&s).await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "never forgotten: {status} {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back with a ping: off shift (its old shift is forgotten) until a new one.
    let (status, _) = s
        .call("POST", "/v1/riders/R1/location", &r1, Some(ping))
        .await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, r) = rider(&s).await;
        if status == 200 {
            assert_eq!(r["online"], false, "{r}");
            assert_eq!(r["indexed"], Value::Null, "{r}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ping never came back: {status} {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
