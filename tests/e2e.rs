//! End-to-end: the real `grabflow serve` binary on a free port, driven over
//! real HTTP and WebSocket, as apps, riders and ops would.

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Server {
    child: Child,
    url: String,
    dir: PathBuf,
    http: reqwest::Client,
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "grabflow-e2e-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_grabflow"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .rsplit(' ')
            .next()
            .expect("listening line")
            .to_string();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "unexpected first line {line:?}"
        );
        Server {
            child,
            url,
            dir: dir.to_path_buf(),
            http: reqwest::Client::new(),
        }
    }

    fn token(&self, role: &str, id: Option<&str>) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_grabflow"));
        cmd.args(["token", "--role", role, "--data-dir"])
            .arg(&self.dir);
        if let Some(id) = id {
            cmd.args(["--id", id]);
        }
        String::from_utf8(cmd.output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string()
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url))
            .bearer_auth(token);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ws(&self, rider: &str, token: &str, after: u64) -> Ws {
        let url = format!(
            "{}/v1/riders/{rider}/ws?after={after}&access_token={token}",
            self.url.replace("http", "ws")
        );
        tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects")
            .0
    }

    /// A city: merchant M1 and riders on shift at `metres` north of it.
    async fn city(&self, app: &str, riders: &[(&str, &str, f64)]) {
        let (s, _) = self
            .call(
                "PUT",
                "/v1/merchants/M1",
                app,
                Some(json!({"lat": 31.23, "lon": 121.47})),
            )
            .await;
        assert_eq!(s, 202);
        for (rider, token, north) in riders {
            let (s, _) = self
                .call(
                    "PUT",
                    &format!("/v1/riders/{rider}/shift"),
                    token,
                    Some(json!({"online": true})),
                )
                .await;
            assert_eq!(s, 202);
            let body = json!({"lat": 31.23 + north / 111_195.0, "lon": 121.47});
            let (s, _) = self
                .call(
                    "POST",
                    &format!("/v1/riders/{rider}/location"),
                    token,
                    Some(body),
                )
                .await;
            assert_eq!(s, 202);
        }
    }

    async fn order(&self, app: &str, id: &str) {
        let body = json!({"order_id": id, "merchant_id": "M1", "dropoff": {"lat": 31.22, "lon": 121.48}, "promised_minutes": 30});
        let (s, b) = self.call("POST", "/v1/orders", app, Some(body)).await;
        assert_eq!(s, 202, "{b}");
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next message on `ws` that satisfies `want`, within 5 s.
async fn expect_msg(ws: &mut Ws, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .expect("message in time")
            .expect("open")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if want(&v) {
                return v;
            }
        }
    }
}

fn is(kind: &'static str, order: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["type"] == kind && v["order_id"] == order
}

async fn order_states(s: &Server, app: &str, order: &str) -> Vec<(String, String)> {
    let (_, body) = s
        .call("GET", &format!("/v1/orders/{order}"), app, None)
        .await;
    body["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|i| {
                    (
                        i["state"].as_str().unwrap().to_string(),
                        i["reason"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

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
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = s.ws("R1", &r1, 0).await;
    s.order(&app, "O1").await;
    let offer = expect_msg(&mut ws, is("offer", "O1")).await;
    assert_eq!(offer["merchant_id"], "M1");
    assert!((offer["distance_m"].as_u64().unwrap() as i64 - 100).abs() <= 1);
    let (status, body) = s.call("POST", "/v1/orders/O1/grab", &r1, None).await;
    assert_eq!((status, body), (200, json!({"result": "won"})));
    expect_msg(&mut ws, is("grab_result", "O1")).await;
    expect_msg(&mut ws, is("assigned", "O1")).await;
    assert_eq!(
        s.call("POST", "/v1/orders/O1/pickup", &r1, None).await.0,
        202
    );
    assert_eq!(
        s.call("POST", "/v1/orders/O1/delivered", &r1, None).await.0,
        202
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut states = Vec::new();
    while Instant::now() < deadline {
        states = order_states(&s, &app, "O1").await;
        if states.last().map(|s| s.0.as_str()) == Some("closed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want: Vec<(String, String)> = [
        ("created", "placed"),
        ("notified", "offered"),
        ("delivering", "grabbed"),
        ("delivering", "picked_up"),
        ("received", "delivered"),
        ("closed", "completed"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(states, want);
    let (_, rider) = s.call("GET", "/v1/riders/R1", &r1, None).await;
    assert_eq!(
        (rider["load"].as_u64(), rider["online"].as_bool()),
        (Some(0), Some(true))
    );
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
    let post = || {
        s.http
            .post(format!("{}/v1/riders/R1/location", s.url))
            .bearer_auth(&r1)
            .header("Idempotency-Key", "retry-1")
            .json(&json!({"lat": 1, "lon": 2}))
            .send()
    };
    let a: Value = post().await.unwrap().json().await.unwrap();
    let b: Value = post().await.unwrap().json().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(
        a["offset"].as_u64().unwrap(),
        next["offset"].as_u64().unwrap() + 1
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
    assert_eq!(s.call("GET", "/v1/ops/metrics", &app, None).await.0, 403);
    let prom = s
        .http
        .get(format!("{}/metrics", s.url))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        prom.contains("grabflow_orders_by_state{state=\"notified\"} 1"),
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
async fn sigterm_closes_streams_and_exits_cleanly() {
    let dir = temp_dir();
    let mut s = Server::start(&dir, &[]);
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
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    // Everything acknowledged before the signal is there after a restart.
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (_, rider) = s.call("GET", "/v1/riders/R1", &r1, None).await;
    assert_eq!(rider["online"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
