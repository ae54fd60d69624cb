//! The ops console, end to end: the real `grabflow serve` under a short
//! `grabflow sim` load, the console at `/ops` in a real headless Chromium
//! driven over WebDriver (Debian's `chromium` and `chromium-driver`, which
//! `scripts/test` installs), and the live feed behind it.
//!
//! The browser test skips, saying so loudly, only when no chromium or
//! chromedriver can be found at all. It writes a screenshot of the console
//! to `target/tmp/ops-console.png`; with `GRABFLOW_OPS_SHOT_AFTER=SECS` it
//! lets the charts fill for that long first (and runs the load longer), for
//! the picture in `docs/`.

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The first of `names` found on the `PATH` (or as an absolute path).
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        let direct = PathBuf::from(name);
        if direct.is_absolute() && direct.is_file() {
            return Some(direct);
        }
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// A chromedriver on a free loopback port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(program: &PathBuf) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let status = format!("{url}/status");
        wait_for("chromedriver to be ready", Duration::from_secs(20), || {
            let req = http.get(&status).send();
            async move {
                let r = req.await.ok()?;
                let v: Value = r.json().await.ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await;
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped (the simulator).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` until it gives `Some`, or panics naming `what` after
/// `within`.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `script` in the page and returns what it returns.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, Vec::new()).await.expect("script runs")
}

/// The page's `data-metric` figures, as numbers (absent: not a number).
async fn figures(c: &Client) -> Value {
    js(
        c,
        "const out = {};
         for (const e of document.querySelectorAll('[data-metric]')) {
           const v = Number(e.textContent);
           if (e.textContent !== '' && !Number.isNaN(v)) out[e.dataset.metric] = v;
         }
         return out;",
    )
    .await
}

async fn browser(chromium: &PathBuf, driver: &Driver) -> Client {
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--hide-scrollbars", "--window-size=1440,1560", "--force-device-scale-factor=1"],
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session")
}

/// The states and reasons of `order`'s history, from the API.
async fn history(s: &Server, app: &str, order: &str) -> Vec<(String, String)> {
    order_states(s, app, order).await
}

/// Places orders at the test's own merchant until the test's rider wins
/// one (the simulator's riders may grab them too): the order won.
async fn place_and_grab(s: &Server, app: &str, rider_token: &str) -> String {
    let (st, _) = s
        .call(
            "PUT",
            "/v1/riders/OPS-R/shift",
            rider_token,
            Some(json!({"online": true})),
        )
        .await;
    assert_eq!(st, 202);
    for n in 1..=5 {
        let (st, _) = s
            .call(
                "POST",
                "/v1/riders/OPS-R/location",
                rider_token,
                Some(json!({"lat": 31.2301, "lon": 121.4701})),
            )
            .await;
        assert_eq!(st, 202);
        let mut ws = s.ws("OPS-R", rider_token, 0).await;
        let order = format!("OPS-O{n}");
        let body = json!({"order_id": order, "merchant_id": "OPS-M",
                          "dropoff": {"lat": 31.225, "lon": 121.475}, "promised_minutes": 30});
        let (st, b) = s.call("POST", "/v1/orders", app, Some(body)).await;
        assert_eq!(st, 202, "{b}");
        let offered = order.clone();
        expect_msg(&mut ws, move |v| {
            v["type"] == "offer" && v["order_id"] == offered.as_str()
        })
        .await;
        let (st, b) = s
            .call(
                "POST",
                &format!("/v1/orders/{order}/grab"),
                rider_token,
                None,
            )
            .await;
        assert_eq!(st, 200, "{b}");
        if b["result"] == "won" {
            return order;
        }
    }
    panic!("the test's rider lost five grab races in a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_live_city_and_explains_and_redispatches_an_order() {
    let (Some(chromium), Some(chromedriver)) = (
        find_program(&[
            "chromium",
            "chromium-browser",
            "google-chrome",
            "/usr/bin/chromium",
        ]),
        find_program(&[
            "chromedriver",
            "/usr/bin/chromedriver",
            "/usr/lib/chromium/chromedriver",
        ]),
    ) else {
        eprintln!(
            "\n\n*** SKIPPED the ops console browser test: no chromium and chromedriver found. \
             Install them (Debian: apt-get install chromium chromium-driver; scripts/test does) ***\n"
        );
        return;
    };
    let dir = temp_dir();
    let s = Server::start(&dir, &["--grab-timeout", "1500ms", "--rider-ttl", "3s"]);
    s.wait_ready().await;
    let (app, ops) = (s.token("app", None), s.token("ops", None));
    let rider = s.token("rider", Some("OPS-R"));
    let metrics = || async { s.call("GET", "/v1/ops/metrics", &ops, None).await.1 };
    let prometheus = || s.prometheus(&ops);

    // A short load: the simulator at 20×, about 20 s of real time (3 s a
    // simulated minute), longer by what the screenshot waits.
    let shot_after: u64 = std::env::var("GRABFLOW_OPS_SHOT_AFTER")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let minutes = (7 + shot_after / 3).to_string();
    let sim = Killed(
        Command::new(env!("CARGO_BIN_EXE_grabflow"))
            .args(["sim", "--url", &s.url, "--data-dir"])
            .arg(&dir)
            .args([
                "--speed",
                "20",
                "--start",
                "11:00",
                "--minutes",
                &minutes,
                "--riders",
                "60",
                "--merchants",
                "30",
                "--orders-per-min",
                "4",
                "--seed",
                "7",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the simulator starts"),
    );
    let (st, _) = s
        .call(
            "PUT",
            "/v1/merchants/OPS-M",
            &app,
            Some(json!({"lat": 31.23, "lon": 121.47})),
        )
        .await;
    assert_eq!(st, 202);
    // Nobody has watched yet: no summary was ever computed.
    let text = prometheus().await;
    assert!(text.contains("grabflow_ops_summaries_total 0\n"), "{text}");
    assert!(text.contains("grabflow_ops_consoles 0\n"), "{text}");

    let driver = Driver::start(&chromedriver).await;
    let c = browser(&chromium, &driver).await;
    c.goto(&format!("{}/ops#token={ops}", s.url)).await.unwrap();

    // Signed in from the fragment, which the page then drops from the URL.
    wait_for(
        "the console to show live figures",
        Duration::from_secs(30),
        || async {
            let f = figures(&c).await;
            f["riders_indexed"].as_f64().filter(|n| *n > 0.0)
        },
    )
    .await;
    let url = c.current_url().await.unwrap();
    assert!(
        !url.as_str().contains("token="),
        "the token stays in the URL: {url}"
    );

    // An order placed and grabbed while the console watches: its trail
    // (offer rounds, grab race) is kept, for the inspector.
    let order = place_and_grab(&s, &app, &rider).await;
    let (st, trail) = s
        .call("GET", &format!("/v1/ops/orders/{order}/trail"), &ops, None)
        .await;
    assert_eq!(st, 200, "{trail}");
    assert_eq!(trail["recorded"], true, "{trail}");
    let offered = trail["rounds"][0]["offers"].as_array().expect("a round");
    let mine = offered
        .iter()
        .find(|o| o["rider_id"] == "OPS-R")
        .expect("offered to OPS-R");
    assert!(mine["distance_m"].as_u64().unwrap() < 30, "{trail}");
    let won: Vec<_> = trail["grabs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["result"] == "won")
        .collect();
    assert_eq!(won.len(), 1, "{trail}");
    assert_eq!(won[0]["rider_id"], "OPS-R");
    let path = format!("/v1/ops/orders/{order}/trail");
    assert_eq!(s.call("GET", &path, &app, None).await.0, 403);
    assert_eq!(
        s.call("GET", "/v1/ops/orders/NO-SUCH/trail", &ops, None)
            .await
            .0,
        404
    );

    // The figures agree with /v1/ops/metrics (both move under load: read
    // them back to back until a reading of each matches).
    wait_for(
        "the page's figures to agree with /v1/ops/metrics",
        Duration::from_secs(40),
        || async {
            let page = figures(&c).await;
            let m = metrics().await;
            let open: i64 = m["orders_by_state"]
                .as_object()?
                .iter()
                .filter(|(state, _)| *state != "closed")
                .map(|(_, n)| n.as_i64().unwrap_or(0))
                .sum();
            let agree = page["riders_indexed"] == m["riders_indexed"]
                && page["orders_open"].as_f64() == Some(open as f64)
                && page["merchants"] == m["merchants"];
            agree.then_some(())
        },
    )
    .await;
    let page = figures(&c).await;
    for name in ["pings_per_s", "orders_per_s", "lag_ms"] {
        assert!(
            page[name].as_f64().is_some(),
            "{name} is not a number: {page}"
        );
    }
    assert!(page["pings_per_s"].as_f64().unwrap() > 0.0, "{page}");
    wait_for(
        "order → offer p99 on the page",
        Duration::from_secs(30),
        || async { figures(&c).await["order_offer_p99_ms"].as_f64() },
    )
    .await;

    // The map draws riders; the dataflow graph its operators.
    let drawn = js(
        &c,
        "const m = document.getElementById('map').dataset;
                        return [Number(m.riders), Number(m.cells), Number(m.orders),
                                Number(document.getElementById('graph').dataset.operators)];",
    )
    .await;
    assert!(drawn[0].as_f64().unwrap() > 0.0, "no rider drawn: {drawn}");
    assert!(drawn[1].as_f64().unwrap() > 0.0, "no cell drawn: {drawn}");
    assert!(
        drawn[3].as_f64().unwrap() >= 5.0,
        "the dataflow graph: {drawn}"
    );

    // The charts move between two readings.
    let chart = "const c = document.getElementById('chart-pings');
                 return [Number(c.dataset.samples), c.toDataURL()];";
    let first = js(&c, chart).await;
    let second = wait_for("the charts to move", Duration::from_secs(10), || async {
        let now = js(&c, chart).await;
        (now[0].as_f64() > first[0].as_f64()).then_some(now)
    })
    .await;
    assert_ne!(
        first[1], second[1],
        "the pings chart drew the same picture twice"
    );

    // The inspector shows the order's history as the API has it.
    let input = c.find(Locator::Id("order-id")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(&order).await.unwrap();
    c.find(Locator::Css("#find button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let timeline = "return [...document.querySelectorAll('#timeline li[data-kind=transition]')]
                      .map(li => [li.dataset.state, li.dataset.reason]);";
    wait_for(
        "the inspector's timeline to match the API",
        Duration::from_secs(30),
        || async {
            let want = history(&s, &app, &order).await;
            let shown: Vec<(String, String)> =
                serde_json::from_value(js(&c, timeline).await).unwrap_or_default();
            (shown == want && want.iter().any(|(_, r)| r == "grabbed")).then_some(())
        },
    )
    .await;
    let shown: Vec<(String, String)> = serde_json::from_value(js(&c, timeline).await).unwrap();
    assert_eq!(shown[0], ("created".to_string(), "placed".to_string()));
    // ...with the offer round's riders and the grab race.
    let race = js(
        &c,
        "const d = document.querySelector('#timeline li[data-reason=offered] .detail');
         const won = [...document.querySelectorAll('#timeline li[data-kind=grab][data-result=won]')];
         return [d ? Number(d.dataset.riders) : 0, d ? d.textContent : '', won.map(li => li.dataset.rider)];",
    )
    .await;
    assert!(
        race[0].as_f64().unwrap() >= 1.0,
        "no offer round shown: {race}"
    );
    assert!(race[1].as_str().unwrap().contains("OPS-R"), "{race}");
    assert_eq!(race[2], json!(["OPS-R"]), "{race}");

    // A screenshot of the console under load (docs/ops-console.png is one).
    tokio::time::sleep(Duration::from_secs(shot_after)).await;
    let png = c.screenshot().await.unwrap();
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ops-console.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("ops console screenshot: {}", shot.display());

    // A redispatch clicked on the page reaches the order's history.
    c.find(Locator::Id("act-redispatch"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let result = wait_for(
        "the redispatch's answer",
        Duration::from_secs(30),
        || async {
            let r = js(
                &c,
                "const r = document.getElementById('action-result');
                        return r.dataset.ok ? [r.dataset.ok, r.textContent] : null;",
            )
            .await;
            (!r.is_null()).then_some(r)
        },
    )
    .await;
    assert_eq!(result[0], "true", "the redispatch failed: {result}");
    wait_for(
        "the redispatch in the order's history and on the page",
        Duration::from_secs(30),
        || async {
            let api = history(&s, &app, &order).await;
            let shown: Vec<(String, String)> =
                serde_json::from_value(js(&c, timeline).await).unwrap_or_default();
            let redispatched = |h: &[(String, String)]| h.iter().any(|(_, r)| r == "redispatched");
            (redispatched(&api) && redispatched(&shown)).then_some(())
        },
    )
    .await;
    // ...and came as an ops event.
    wait_for("the redispatch among the ops events", Duration::from_secs(30), || async {
        let kinds = js(&c, "return [...document.querySelectorAll('#events li')]
                              .map(li => [li.dataset.order, li.querySelector('.kind')?.dataset.kind]);")
        .await;
        kinds
            .as_array()?
            .iter()
            .any(|k| k[0] == order.as_str() && k[1] == "redispatched")
            .then_some(())
    })
    .await;

    // Signed out, the page asks for a token: a wrong one is refused, the
    // ops token pasted signs in again.
    c.find(Locator::Id("signout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let shown = |id: &'static str| {
        let c = &c;
        async move {
            let script = format!("return !document.getElementById('{id}').hidden;");
            js(c, &script).await.as_bool().filter(|b| *b)
        }
    };
    wait_for("the sign-in form", Duration::from_secs(10), || {
        shown("signin")
    })
    .await;
    let field = c.find(Locator::Id("token")).await.unwrap();
    field.send_keys("not-a-token").await.unwrap();
    c.find(Locator::Css("#signin-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the wrong token refused",
        Duration::from_secs(10),
        || async {
            let e = js(
                &c,
                "return document.getElementById('signin-error').textContent;",
            )
            .await;
            e.as_str().filter(|t| !t.is_empty()).map(str::to_string)
        },
    )
    .await;
    field.clear().await.unwrap();
    field.send_keys(&ops).await.unwrap();
    c.find(Locator::Css("#signin-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the console again", Duration::from_secs(10), || {
        shown("console")
    })
    .await;
    wait_for("the stream live again", Duration::from_secs(10), || async {
        let state = js(
            &c,
            "return document.getElementById('status').dataset.state;",
        )
        .await;
        (state == "live").then_some(())
    })
    .await;

    c.close().await.unwrap();
    drop(sim);
    // Nobody watches any more: the summary task stops.
    let stopped = wait_for("the summaries to stop", Duration::from_secs(10), || async {
        let text = prometheus().await;
        text.contains("grabflow_ops_consoles 0\n").then_some(text)
    })
    .await;
    let count = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("grabflow_ops_summaries_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .expect("grabflow_ops_summaries_total")
    };
    let before = count(&stopped);
    assert!(before > 0);
    // The task sees it at its next tick, within a second; then no more.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let after = count(&prometheus().await);
    assert!(
        after <= before + 1,
        "summaries went on with nobody watching: {before} then {after}"
    );
    let settled = after;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        count(&prometheus().await),
        settled,
        "summaries went on with nobody watching"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads SSE `summary` events' `at` from a stream response.
async fn summary_times(resp: reqwest::Response, want: usize) -> Vec<u64> {
    use futures_util::StreamExt;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut times = Vec::new();
    let mut event = String::new();
    while times.len() < want {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("a summary within 10 s")
            .expect("the stream is open")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                if event == "summary" {
                    let v: Value = serde_json::from_str(data).unwrap();
                    times.push(v["at"].as_u64().unwrap());
                }
            }
        }
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_consoles_share_one_summary_a_second_and_the_stream_is_for_ops_only() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (ops, app) = (s.token("ops", None), s.token("app", None));
    let stream = format!("{}/v1/ops/stream", s.url);
    // Ops only: no token, another role's token, a forged one.
    assert_eq!(s.http.get(&stream).send().await.unwrap().status(), 401);
    let as_app = s.http.get(&stream).bearer_auth(&app).send().await.unwrap();
    assert_eq!(as_app.status(), 403);
    let forged = s
        .http
        .get(format!("{stream}?access_token=x.y.z"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);

    let mut streams = Vec::new();
    for i in 0..5 {
        // Header or query parameter, as EventSource clients must.
        let req = if i % 2 == 0 {
            s.http.get(&stream).bearer_auth(&ops)
        } else {
            s.http.get(format!("{stream}?access_token={ops}"))
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        streams.push(tokio::spawn(summary_times(resp, 4)));
    }
    let mut all = Vec::new();
    for t in streams {
        all.push(t.await.unwrap());
    }
    // Every console received the same summaries (the same `at`, computed
    // once), not one computed for each.
    let last: Vec<u64> = all.iter().map(|t| *t.last().unwrap()).collect();
    let common = all
        .iter()
        .map(|t| t.iter().copied().collect::<std::collections::BTreeSet<_>>())
        .reduce(|a, b| &a & &b)
        .unwrap();
    assert!(
        common.len() >= 2,
        "the consoles saw different summaries: {all:?}"
    );
    let text = s.prometheus(&ops).await;
    let computed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("grabflow_ops_summaries_total "))
        .unwrap()
        .parse()
        .unwrap();
    let received: usize = all.iter().map(Vec::len).sum();
    assert!(
        (computed as usize) < received / 2,
        "{computed} summaries computed for {received} received by five consoles ({last:?})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `grabflow_…` metric names `text` mentions.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("grabflow_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_pass_promtool_and_the_alerts_and_dashboard_name_metrics_the_server_exports() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let alerts = root.join("docs/ops/alerts.yml");
    let dashboard = root.join("docs/ops/grafana.json");
    match find_program(&["promtool"]) {
        Some(promtool) => {
            let out = Command::new(promtool)
                .args(["check", "rules"])
                .arg(&alerts)
                .output()
                .expect("promtool runs");
            assert!(
                out.status.success(),
                "promtool check rules docs/ops/alerts.yml:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => eprintln!(
            "\n\n*** SKIPPED promtool check rules: no promtool found. Install it (Debian: \
             apt-get install prometheus; scripts/test does) ***\n"
        ),
    }
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).expect("JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels
        .iter()
        .all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())));

    // Every metric they use is one the server exports, but the checkpoint
    // age (which comes with checkpoints).
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let ops = s.token("ops", None);
    let (app, rider) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &rider, 100.0)]).await;
    s.order(&app, "O1").await;
    let exported = wait_for(
        "the order's offer in /metrics",
        Duration::from_secs(10),
        || async {
            let text = s
                .http
                .get(format!("{}/metrics", s.url))
                .bearer_auth(&ops)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("grabflow_order_offer_ms_count 1\n")
                .then_some(text)
        },
    )
    .await;
    let exported = metric_names(&exported);
    let used: std::collections::BTreeSet<String> = metric_names(
        &(std::fs::read_to_string(&alerts).unwrap()
            + &std::fs::read_to_string(&dashboard).unwrap()),
    );
    let missing: Vec<_> = used
        .iter()
        .filter(|m| !exported.contains(*m) && *m != "grabflow_checkpoint_age_seconds")
        .collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");
    assert!(used.contains("grabflow_checkpoint_age_seconds"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tile server on a free loopback port: the same small PNG for every
/// path; how many requests it has answered.
async fn tile_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut png = Vec::new();
    image::RgbImage::from_pixel(256, 256, image::Rgb([40, 60, 80]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = std::sync::Arc::new(AtomicU64::new(0));
    let count = std::sync::Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (png, count) = (png.clone(), std::sync::Arc::clone(&count));
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                if conn.read(&mut head).await.unwrap_or(0) == 0 {
                    return;
                }
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    png.len()
                );
                let _ = conn.write_all(header.as_bytes()).await;
                let _ = conn.write_all(&png).await;
                count.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    (url, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_map_tiles_the_map_draws_them_under_the_city() {
    let (Some(chromium), Some(chromedriver)) = (
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
        find_program(&["chromedriver", "/usr/lib/chromium/chromedriver"]),
    ) else {
        eprintln!(
            "\n\n*** SKIPPED the map tiles browser test: no chromium and chromedriver found ***\n"
        );
        return;
    };
    let (tiles, served) = tile_server().await;
    let dir = temp_dir();
    let template = format!("{tiles}/{{z}}/{{x}}/{{y}}.png");
    let s = Server::start(&dir, &["--map-tiles", &template]);
    s.wait_ready().await;
    let (app, ops, rider) = (
        s.token("app", None),
        s.token("ops", None),
        s.token("rider", Some("R1")),
    );
    s.city(&app, &[("R1", &rider, 300.0)]).await;
    let page = s.http.get(format!("{}/ops", s.url)).send().await.unwrap();
    let html = page.text().await.unwrap();
    assert!(
        html.contains(&format!("content=\"{template}\"")),
        "the template is not in the page"
    );
    let driver = Driver::start(&chromedriver).await;
    let c = browser(&chromium, &driver).await;
    c.goto(&format!("{}/ops#token={ops}", s.url)).await.unwrap();
    wait_for(
        "tiles drawn under the map",
        Duration::from_secs(20),
        || async {
            let drawn = js(
                &c,
                "return Number(document.getElementById('map').dataset.tiles || 0);",
            )
            .await;
            (drawn.as_f64()? > 0.0).then_some(())
        },
    )
    .await;
    assert!(served.load(std::sync::atomic::Ordering::Relaxed) > 0);
    c.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
