//! End-to-end: the real `grabflow serve` binary on a free port, driven over
//! real HTTP and WebSocket, as apps, riders and ops would.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_order_life_cycle_over_http_and_websocket() {
    life_cycle(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_order_life_cycle_at_two_timely_workers() {
    life_cycle(&["--workers", "2"]).await;
}

async fn life_cycle(args: &[&str]) {
    let dir = temp_dir();
    let s = Server::start(&dir, args);
    s.wait_ready().await;
    life_cycle_on(&s, &s).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_riders_race_and_exactly_one_wins() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (app, r1, r2) = (
        s.token("app", None),
        s.token("rider", Some("R1")),
        s.token("rider", Some("R2")),
    );
    s.city(&app, &[("R1", &r1, 100.0), ("R2", &r2, 200.0)])
        .await;
    let (mut w1, mut w2) = (s.ws("R1", &r1, 0).await, s.ws("R2", &r2, 0).await);
    s.order(&app, "O1").await;
    expect_msg(&mut w1, is("offer", "O1")).await;
    expect_msg(&mut w2, is("offer", "O1")).await;
    let (a, b) = tokio::join!(
        s.call("POST", "/v1/orders/O1/grab", &r1, None),
        s.call("POST", "/v1/orders/O1/grab", &r2, None)
    );
    let results = [a.1.clone(), b.1.clone()];
    let won = results.iter().filter(|r| r["result"] == "won").count();
    let lost: Vec<_> = results.iter().filter(|r| r["result"] == "lost").collect();
    assert_eq!((a.0, b.0), (200, 200));
    assert_eq!(won, 1, "{results:?}");
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0]["reason"], "already_taken");
    let loser = if a.1["result"] == "lost" {
        &mut w1
    } else {
        &mut w2
    };
    let withdrawn = expect_msg(loser, is("withdrawn", "O1")).await;
    assert_eq!(withdrawn["reason"], "taken");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_nobody_grabs_times_out_and_is_offered_again() {
    let dir = temp_dir();
    let s = Server::start(&dir, &["--grab-timeout", "1s"]);
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = s.ws("R1", &r1, 0).await;
    s.order(&app, "O1").await;
    let first = expect_msg(&mut ws, is("offer", "O1")).await;
    let expired = expect_msg(&mut ws, is("withdrawn", "O1")).await;
    assert_eq!(expired["reason"], "expired");
    let second = expect_msg(&mut ws, is("offer", "O1")).await;
    assert_eq!(
        second["expires_at"].as_u64().unwrap() - first["expires_at"].as_u64().unwrap(),
        1_000
    );
    let states = order_states(&s, &app, "O1").await;
    assert!(
        states.contains(&("created".into(), "grab_timeout".into())),
        "{states:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_rider_stream_misses_nothing() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = s.ws("R1", &r1, 0).await;
    s.order(&app, "O1").await;
    let first = expect_msg(&mut ws, is("offer", "O1")).await;
    let seen = first["seq"].as_u64().unwrap();
    ws.close(None).await.unwrap();
    drop(ws);
    for o in ["O2", "O3"] {
        s.order(&app, o).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ws = s.ws("R1", &r1, seen).await;
    let a = expect_msg(&mut ws, |_| true).await;
    let b = expect_msg(&mut ws, |_| true).await;
    assert_eq!(
        (a["seq"].as_u64(), a["order_id"].as_str()),
        (Some(seen + 1), Some("O2"))
    );
    assert_eq!(
        (b["seq"].as_u64(), b["order_id"].as_str()),
        (Some(seen + 2), Some("O3"))
    );
    // The SSE stream gives the same messages, ids being the seqs.
    let resp = s
        .http
        .get(format!("{}/v1/riders/R1/stream?after={seen}", s.url))
        .bearer_auth(&r1)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains(&format!("id: {}", seen + 2)) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains(&format!("id: {}\ndata: ", seen + 1)) && text.contains("\"O2\""),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_loses_no_acknowledged_event() {
    let dir = temp_dir();
    let mut s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    // Four clients place orders concurrently; the server is killed mid-stream.
    let url = s.url.clone();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (url, app) = (url.clone(), app.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut acked = Vec::new();
            for n in 0..10_000 {
                let id = format!("C{c}-{n}");
                let body = json!({"order_id": id, "merchant_id": "M1", "dropoff": {"lat": 31.22, "lon": 121.48}});
                match http.post(format!("{url}/v1/orders")).bearer_auth(&app).json(&body).send().await {
                    Ok(r) if r.status().as_u16() == 202 => acked.push(id),
                    _ => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.kill9();
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    assert!(
        acked.len() > 20,
        "the clients got going before the kill: {}",
        acked.len()
    );
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let mut missing = Vec::new();
    for id in &acked {
        let (status, body) = s.call("GET", &format!("/v1/orders/{id}"), &app, None).await;
        if status != 200 || body["history"][0]["state"] != "created" {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged orders lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    // The state before the crash is back: the first order is still offered to R1.
    let (_, o) = s
        .call("GET", &format!("/v1/orders/{}", acked[0]), &app, None)
        .await;
    assert_eq!(o["state"], "notified");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_4xx_naming_the_field_and_reach_no_log() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (app, r1, r2) = (
        s.token("app", None),
        s.token("rider", Some("R1")),
        s.token("rider", Some("R2")),
    );
    let (_, first) = s
        .call(
            "PUT",
            "/v1/merchants/M1",
            &app,
            Some(json!({"lat": 31.23, "lon": 121.47})),
        )
        .await;
    let raw = |path: &str, body: &'static str| {
        s.http
            .post(format!("{}{path}", s.url))
            .bearer_auth(&app)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = raw("/v1/orders", "{not json").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    /// method, path, who, body, status, code, field
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<Value>,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/orders",
            "app",
            Some(json!({"order_id": "O1", "merchant_id": "M1", "dropoff": {"lat": 91, "lon": 0}})),
            422,
            "invalid_field",
            Some("dropoff.lat"),
        ),
        (
            "POST",
            "/v1/orders",
            "app",
            Some(
                json!({"order_id": "O1", "merchant_id": "M1", "dropoff": {"lat": 1, "lon": 0}, "tip": 1}),
            ),
            400,
            "unknown_field",
            Some("tip"),
        ),
        (
            "POST",
            "/v1/orders",
            "app",
            Some(json!({"order_id": "O 1", "merchant_id": "M1", "dropoff": {"lat": 1, "lon": 0}})),
            422,
            "invalid_field",
            Some("order_id"),
        ),
        (
            "POST",
            "/v1/orders",
            "app",
            Some(json!({"order_id": "O1", "merchant_id": "M9", "dropoff": {"lat": 1, "lon": 0}})),
            404,
            "not_found",
            Some("merchant_id"),
        ),
        (
            "POST",
            "/v1/orders",
            "app",
            Some(json!({"order_id": "O1", "merchant_id": "M1"})),
            422,
            "invalid_field",
            Some("dropoff"),
        ),
        (
            "POST",
            "/v1/riders/R1/location",
            "r1",
            Some(json!({"lat": "north", "lon": 0})),
            422,
            "invalid_field",
            Some("lat"),
        ),
        (
            "POST",
            "/v1/riders/R1/location",
            "r2",
            Some(json!({"lat": 1, "lon": 0})),
            403,
            "forbidden",
            None,
        ),
        (
            "POST",
            "/v1/riders/R1/location",
            "none",
            Some(json!({"lat": 1, "lon": 0})),
            401,
            "unauthorized",
            None,
        ),
        (
            "PUT",
            "/v1/riders/R1/shift",
            "r1",
            Some(json!({"online": true, "capacity": 0})),
            422,
            "invalid_field",
            Some("capacity"),
        ),
        (
            "POST",
            "/v1/orders/NOPE/cancel",
            "app",
            None,
            404,
            "not_found",
            Some("order_id"),
        ),
        (
            "POST",
            "/v1/locations:batch",
            "app",
            Some(
                json!([{"rider_id": "R1", "lat": 1, "lon": 0}, {"rider_id": "R2", "lat": 1, "lon": 181}]),
            ),
            422,
            "invalid_field",
            Some("[1].lon"),
        ),
        (
            "POST",
            "/v1/locations:batch",
            "app",
            Some(json!([{"rider_id": "R 1", "lat": 1, "lon": 0}])),
            422,
            "invalid_field",
            Some("[0].rider_id"),
        ),
        (
            "POST",
            "/v1/ops/orders/NOPE/redispatch",
            "app",
            None,
            403,
            "forbidden",
            None,
        ),
    ];
    for (method, path, who, body, status, code, field) in cases {
        let token = match who {
            "app" => app.as_str(),
            "r1" => r1.as_str(),
            "r2" => r2.as_str(),
            _ => "garbage",
        };
        let (got, b) = s.call(method, path, token, body).await;
        assert_eq!(
            (got, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {b}"
        );
        assert_eq!(b["error"]["field"].as_str(), field, "{method} {path}: {b}");
    }
    let huge = format!(
        "{{\"lat\": 1, \"lon\": 2, \"pad\": \"{}\"}}",
        "x".repeat(200_000)
    );
    let r = s
        .http
        .post(format!("{}/v1/riders/R1/location", s.url))
        .bearer_auth(&r1)
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(
        r.headers()["connection"],
        "close",
        "the connection is not reused"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "too_large"
    );
    // Nothing rejected reached the log: the next event directly follows the first.
    let (_, next) = s
        .call(
            "POST",
            "/v1/riders/R1/location",
            &r1,
            Some(json!({"lat": 1, "lon": 2})),
        )
        .await;
    assert_eq!(
        next["offset"].as_u64().unwrap(),
        first["offset"].as_u64().unwrap() + 1
    );
    // A retried request with the same Idempotency-Key is answered once, appended once.
    let ping = json!({"lat": 1, "lon": 2});
    let post = || {
        s.call_keyed(
            "POST",
            "/v1/riders/R1/location",
            &r1,
            "retry-1",
            ping.clone(),
        )
    };
    let (_, a) = post().await;
    let (_, b) = post().await;
    assert_eq!(a, b);
    assert_eq!(
        a["offset"].as_u64().unwrap(),
        next["offset"].as_u64().unwrap() + 1
    );
    // The same key on a different request is refused, not answered with the
    // first answer (that would acknowledge an event never appended).
    let (status, e) = s
        .call_keyed(
            "PUT",
            "/v1/riders/R1/shift",
            &r1,
            "retry-1",
            json!({"online": true}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(e["error"]["field"], "Idempotency-Key", "{e}");
    let (_, last) = s
        .call(
            "POST",
            "/v1/riders/R1/location",
            &r1,
            Some(json!({"lat": 1, "lon": 2})),
        )
        .await;
    assert_eq!(
        last["offset"].as_u64().unwrap(),
        a["offset"].as_u64().unwrap() + 1,
        "neither the repeat nor the refused request appended anything"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_see_metrics_dataflow_figures_and_the_contract() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (app, ops, r1) = (
        s.token("app", None),
        s.token("ops", None),
        s.token("rider", Some("R1")),
    );
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    s.order(&app, "O1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, m) = s.call("GET", "/v1/ops/metrics", &ops, None).await;
    assert_eq!(st, 200);
    assert_eq!(m["orders_by_state"]["notified"], 1, "{m}");
    assert_eq!(m["events"]["location_pinged"], 1);
    let (st, d) = s.call("GET", "/v1/ops/dataflow", &ops, None).await;
    assert_eq!(st, 200);
    let names: Vec<&str> = d["operators"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    for op in ["Dedup", "TrackRiders", "Decide"] {
        assert!(names.contains(&op), "{names:?}");
    }
    let decide = d["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "Decide")
        .unwrap();
    assert!(
        decide["records_in"].as_i64().unwrap() >= 3 && decide["schedules"].as_u64().unwrap() > 0,
        "{decide}"
    );
    // What the stateful operators hold: one merchant, one live order with
    // its grab timer, one rider tracked.
    let state = |name: &str| {
        d["operators"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    let decide = state("Decide");
    assert_eq!(
        (&decide["orders"], &decide["merchants"]),
        (&json!(1), &json!(1)),
        "{decide}"
    );
    assert!(decide["timer_times"].as_i64().unwrap() >= 1, "{decide}");
    assert_eq!(state("TrackRiders")["riders"], 1, "{d}");
    assert!(state("Dedup")["ids"].as_i64().unwrap() >= 3, "{d}");
    assert_eq!(s.call("GET", "/v1/ops/metrics", &app, None).await.0, 403);
    let prom = s.prometheus(&ops).await;
    assert!(
        prom.contains("grabflow_orders_by_state{state=\"notified\"} 1"),
        "{prom}"
    );
    assert!(
        prom.contains("grabflow_operator_state{operator=\"Decide\",part=\"orders\"} 1\n"),
        "{prom}"
    );
    let api: Value = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/orders",
        "/v1/orders/{order_id}/grab",
        "/v1/riders/{rider_id}/ws",
        "/v1/locations:batch",
    ] {
        assert!(
            api["paths"][path].is_object(),
            "{path} missing from openapi.json"
        );
    }
    let (st, near) = s
        .call("GET", "/v1/merchants/M1/riders?limit=5", &app, None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(near["riders"][0]["rider_id"], "R1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_placed_once_whatever_key_its_requests_carry() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let app = s.token("app", None);
    s.city(&app, &[]).await;
    let order = json!({"order_id": "O1", "merchant_id": "M1",
        "dropoff": {"lat": 31.22, "lon": 121.48}});
    let place = |key: &'static str| s.call_keyed("POST", "/v1/orders", &app, key, order.clone());
    let (status, first) = place("a").await;
    assert_eq!(status, 202);
    let (status, e) = place("b").await;
    assert_eq!(status, 409, "a new key does not place the order again");
    assert_eq!(e["error"]["field"], "order_id", "{e}");
    let (status, again) = place("a").await;
    assert_eq!(status, 202);
    assert_eq!(again, first, "the first key's repeat");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let placed = order_states(&s, &app, "O1").await;
    assert_eq!(
        placed.first().map(|(st, _)| st.as_str()),
        Some("created"),
        "{placed:?}"
    );
    let (_, m) = s
        .call("GET", "/v1/ops/metrics", &s.token("ops", None), None)
        .await;
    assert_eq!(m["events"]["order_placed"], 1, "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The answer `s` gives to `method path` (ids filled in) with `token`.
async fn answer(s: &Server, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let path = path
        .replace("{order_id}", "O9")
        .replace("{rider_id}", "R9")
        .replace("{merchant_id}", "M9");
    s.request(method, &path, token, None, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_documents_the_errors_the_server_gives() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let api: Value = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Every schema it refers to is in it.
    let text = api.to_string();
    for at in text.split("\"#/components/schemas/").skip(1) {
        let name = at.split('"').next().unwrap();
        assert!(
            api["components"]["schemas"][name].is_object(),
            "{name} is referred to, not defined"
        );
    }
    let message = &api["components"]["schemas"]["RiderMessage"]["oneOf"];
    // offer, withdrawn, grab_result, assigned, and gap (a resume from a
    // seq no longer kept).
    assert_eq!(message.as_array().map(Vec::len), Some(5), "{message}");
    let schemes = &api["components"]["securitySchemes"];
    let id = &api["components"]["schemas"]["Id"];
    assert_eq!(id["pattern"], "^[A-Za-z0-9_.:-]{1,64}$", "{id}");
    let error = "#/components/schemas/Error";
    let ops_token = s.token("ops", None);
    let mut checked = 0;
    for (path, item) in api["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let documented = |code: &str| {
                op["responses"][code]["content"]["application/json"]["schema"]["$ref"] == error
            };
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            for p in params.iter().filter(|p| p["in"] == "path") {
                assert_eq!(
                    p["schema"]["$ref"], "#/components/schemas/Id",
                    "{method} {path}"
                );
            }
            if method != "get" {
                assert!(
                    params
                        .iter()
                        .any(|p| p["in"] == "header" && p["name"] == "Idempotency-Key"),
                    "{method} {path}"
                );
            }
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if secured {
                for requirement in op["security"].as_array().unwrap() {
                    for scheme in requirement.as_object().unwrap().keys() {
                        assert!(schemes[scheme].is_object(), "{scheme} undefined");
                    }
                }
                // Without a token: a documented 401 in the error shape.
                let (status, body) = answer(&s, method, path, None).await;
                assert_eq!(status, 401, "{method} {path}: {body}");
                assert!(documented("401") && documented("403"), "{method} {path}");
                assert_eq!(body["error"]["code"], "unauthorized", "{method} {path}");
                checked += 1;
            }
            if params.iter().any(|p| p["in"] == "query") {
                // An unknown query parameter: a documented 400 naming it.
                let (status, body) =
                    answer(&s, method, &format!("{path}?bogus=1"), Some(&ops_token)).await;
                assert!(
                    documented(&status.to_string()),
                    "{method} {path}: {status} {body}"
                );
                assert_eq!(body["error"]["field"], "bogus", "{method} {path}: {body}");
            }
        }
    }
    assert!(checked >= 18, "{checked} secured operations");
    // A plain GET on the WebSocket path: the documented 426.
    let r1 = s.token("rider", Some("R9"));
    let (status, body) = answer(&s, "get", "/v1/riders/{rider_id}/ws", Some(&r1)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (426, &json!("upgrade_required"))
    );
    let ws = &api["paths"]["/v1/riders/{rider_id}/ws"]["get"];
    assert_eq!(
        ws["responses"]["426"]["content"]["application/json"]["schema"]["$ref"],
        error
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_and_exits_cleanly() {
    sigterm_on(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_and_exits_cleanly_at_two_workers() {
    sigterm_on(&["--workers", "2"]).await;
}

async fn sigterm_on(flags: &[&str]) {
    let dir = temp_dir();
    let mut s = Server::start(&dir, flags);
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = s.ws("R1", &r1, 0).await;
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // The open stream is closed by the server...
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(_) = msg {
                return true;
            }
        }
        true
    })
    .await;
    assert_eq!(closed, Ok(true), "the stream ends on shutdown");
    // ...and the process exits on its own, successfully.
    let status = exit_within(&mut s.child, Duration::from_secs(10))
        .expect("the server did not exit after SIGTERM");
    assert!(status.success(), "{status:?}");
    // Everything acknowledged before the signal is there after a restart.
    let s = Server::start(&dir, flags);
    s.wait_ready().await;
    let (_, rider) = s.call("GET", "/v1/riders/R1", &r1, None).await;
    assert_eq!(rider["online"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
