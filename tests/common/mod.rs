//! Shared by the end-to-end tests: the real binary on a free port, and
//! clients that drive it over real HTTP and WebSocket.
#![allow(dead_code)]

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    pub http: reqwest::Client,
}

pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "grabflow-e2e-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How `child` exited, if it did within `within`.
pub fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Starts `cmd` (a `grabflow` role with `--listen 127.0.0.1:0`) and reads
/// the URL it prints as it starts listening.
pub fn spawn_listening(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
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
    (child, url)
}

pub fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

impl Server {
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::start_role("serve", dir, extra)
    }

    /// Starts `grabflow {role}` (serve, ingress or egress) on a free port.
    pub fn start_role(role: &str, dir: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_grabflow"));
        cmd.args([role, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra);
        Server::from_command(cmd, dir)
    }

    /// Starts `cmd`, a server listening on a free port, and waits for the
    /// line that says where.
    pub fn from_command(mut cmd: Command, dir: &Path) -> Server {
        let (child, url) = spawn_listening(&mut cmd);
        Server {
            child,
            url,
            dir: dir.to_path_buf(),
            http: reqwest::Client::new(),
        }
    }

    pub fn token(&self, role: &str, id: Option<&str>) -> String {
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

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request(method, path, Some(token), None, body).await
    }

    /// [`Server::call`] with `Idempotency-Key: key`.
    pub async fn call_keyed(
        &self,
        method: &str,
        path: &str,
        token: &str,
        key: &str,
        body: Value,
    ) -> (u16, Value) {
        self.request(method, path, Some(token), Some(key), Some(body))
            .await
    }

    /// `method path` (any case) with the token and `Idempotency-Key`
    /// given: the status and the JSON answer (its text if not JSON).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(
            method.to_uppercase().parse().unwrap(),
            format!("{}{path}", self.url),
        );
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The Prometheus text of `GET /metrics`, read with `token`.
    pub async fn prometheus(&self, token: &str) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics' text")
    }

    pub async fn wait_ready(&self) {
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

    pub async fn ws(&self, rider: &str, token: &str, after: u64) -> Ws {
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
    pub async fn city(&self, app: &str, riders: &[(&str, &str, f64)]) {
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

    pub async fn order(&self, app: &str, id: &str) {
        let body = json!({"order_id": id, "merchant_id": "M1", "dropoff": {"lat": 31.22, "lon": 121.48}, "promised_minutes": 30});
        let (s, b) = self.call("POST", "/v1/orders", app, Some(body)).await;
        assert_eq!(s, 202, "{b}");
    }

    pub fn kill9(&mut self) {
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
pub async fn expect_msg(ws: &mut Ws, want: impl Fn(&Value) -> bool) -> Value {
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

pub fn is(kind: &'static str, order: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["type"] == kind && v["order_id"] == order
}

pub async fn order_states(s: &Server, app: &str, order: &str) -> Vec<(String, String)> {
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

/// One order from placement to delivery: events through `s` (ingress), the
/// rider stream and queries from `e` (egress; the same server when not split).
pub async fn life_cycle_on(s: &Server, e: &Server) {
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let mut ws = e.ws("R1", &r1, 0).await;
    s.order(&app, "O1").await;
    let offer = expect_msg(&mut ws, is("offer", "O1")).await;
    assert_eq!(offer["merchant_id"], "M1");
    assert!((offer["distance_m"].as_u64().unwrap() as i64 - 100).abs() <= 1);
    let (status, body) = s.call("POST", "/v1/orders/O1/grab", &r1, None).await;
    assert_eq!((status, body), (200, json!({"result": "won"})));
    expect_msg(&mut ws, is("grab_result", "O1")).await;
    expect_msg(&mut ws, is("assigned", "O1")).await;
    // Another rider's pickup waits for its decision: 409, kept in the
    // order's history; the assigned rider's answers the state it made.
    let r2 = s.token("rider", Some("R2"));
    let (status, body) = s.call("POST", "/v1/orders/O1/pickup", &r2, None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("not_assigned")),
        "{body}"
    );
    let (status, body) = s.call("POST", "/v1/orders/O1/pickup", &r1, None).await;
    assert_eq!(
        (status, &body["state"]),
        (200, &json!("delivering")),
        "{body}"
    );
    assert_eq!(body["order_id"], "O1");
    let (status, body) = s.call("POST", "/v1/orders/O1/pickup", &r1, None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("wrong_state")),
        "a second pickup: {body}"
    );
    let (status, body) = s.call("POST", "/v1/orders/O1/delivered", &r1, None).await;
    assert_eq!((status, &body["state"]), (200, &json!("closed")), "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut states = Vec::new();
    while Instant::now() < deadline {
        states = order_states(e, &app, "O1").await;
        if states.last().map(|s| s.0.as_str()) == Some("closed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want: Vec<(String, String)> = [
        ("created", "placed"),
        ("notified", "offered"),
        ("delivering", "grabbed"),
        ("delivering", "rejected"),
        ("delivering", "picked_up"),
        ("delivering", "rejected"),
        ("received", "delivered"),
        ("closed", "completed"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(states, want);
    let (_, order) = e.call("GET", "/v1/orders/O1", &app, None).await;
    let rejected: Vec<&Value> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["reason"] == "rejected")
        .map(|i| &i["rejected"])
        .collect();
    assert_eq!(rejected, [&json!("not_assigned"), &json!("wrong_state")]);
    assert!(
        order["history"][0]["event_id"].is_string(),
        "each step names its cause: {order}"
    );
    let (_, rider) = e.call("GET", "/v1/riders/R1", &r1, None).await;
    assert_eq!(
        (rider["load"].as_u64(), rider["online"].as_bool()),
        (Some(0), Some(true))
    );
    let near = |v: &Value, x: f64| v.as_f64().is_some_and(|v| (v - x).abs() < 1e-6);
    assert!(near(&rider["lat"], 31.23 + 100.0 / 111_195.0), "{rider}");
    assert!(rider["indexed"].is_object(), "{rider}");
    // A rider off shift that only pings: its last position, not indexed.
    for lat in [31.24, 31.25] {
        let ping = json!([{"rider_id": "P9", "lat": lat, "lon": 121.48}]);
        let (st, _) = s
            .call("POST", "/v1/locations:batch", &app, Some(ping))
            .await;
        assert_eq!(st, 202);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let p9 = loop {
        let (st, p9) = e.call("GET", "/v1/riders/P9", &app, None).await;
        if (st == 200 && near(&p9["lat"], 31.25)) || Instant::now() > deadline {
            break p9;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(near(&p9["lat"], 31.25) && near(&p9["lon"], 121.48), "{p9}");
    assert_eq!(
        (&p9["online"], &p9["indexed"]),
        (&json!(false), &Value::Null)
    );
    assert_eq!(e.call("GET", "/v1/riders/N0", &app, None).await.0, 404);
}
