//! Strict input through the real binary: bodies are JSON objects (a batch
//! an array) sent as JSON, amounts are in range, and a grab on an unknown
//! order is refused before anything is appended.

mod common;

use common::*;
use serde_json::{json, Value};

/// Sends `body` as is with `content_type` (if any); the status and the
/// error code of the answer.
async fn raw(
    s: &Server,
    method: &str,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: &'static str,
) -> (u16, Value) {
    let mut req = s
        .http
        .request(method.parse().unwrap(), format!("{}{path}", s.url))
        .bearer_auth(token)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_json_objects_amounts_are_in_range_and_unknown_orders_are_not_grabbed() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let (app, r1) = (s.token("app", None), s.token("rider", Some("R1")));
    s.city(&app, &[("R1", &r1, 100.0)]).await;
    let json = Some("application/json");

    // An array, a number or `[]` where an object is expected: 400.
    for body in ["[31.23,121.47,true]", "[]", "42"] {
        let (status, b) = raw(&s, "PUT", "/v1/merchants/M2", &app, json, body).await;
        assert_eq!(
            (status, b["error"]["code"].as_str()),
            (400, Some("invalid_json")),
            "{body}: {b}"
        );
    }
    let (status, _) = raw(&s, "POST", "/v1/orders/O1/grab", &r1, json, "[]").await;
    assert_eq!(status, 400);
    // A batch is an array.
    let (status, b) = raw(&s, "POST", "/v1/locations:batch", &app, json, "{}").await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );

    // Not JSON by its Content-Type: 415. `curl -d`'s form type is read as JSON.
    let ping = r#"{"lat":31.231,"lon":121.47}"#;
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
    ] {
        let (status, b) = raw(&s, "POST", "/v1/riders/R1/location", &r1, Some(ct), ping).await;
        assert_eq!(
            (status, b["error"]["code"].as_str()),
            (415, Some("unsupported_media_type")),
            "{ct}: {b}"
        );
    }
    for ct in [
        Some("application/x-www-form-urlencoded"),
        Some("application/json; charset=utf-8"),
        Some("application/merge-patch+json"),
        None,
    ] {
        let (status, b) = raw(&s, "POST", "/v1/riders/R1/location", &r1, ct, ping).await;
        assert_eq!(status, 202, "{ct:?}: {b}");
    }

    // Compensation within 1 to 10 000 000 cents.
    s.order(&app, "O1").await;
    for amount in ["0", "18446744073709551615", "10000001"] {
        let body: &'static str =
            Box::leak(format!(r#"{{"amount_cents":{amount}}}"#).into_boxed_str());
        let (status, b) = raw(&s, "POST", "/v1/orders/O1/compensation", &app, json, body).await;
        assert_eq!(
            (status, b["error"]["field"].as_str()),
            (422, Some("amount_cents")),
            "{amount}: {b}"
        );
    }
    let (status, _) = s
        .call(
            "POST",
            "/v1/orders/O1/compensation",
            &app,
            Some(json!({"amount_cents": 500})),
        )
        .await;
    assert_eq!(status, 202);

    // A grab on an unknown order: 404, and nothing is appended (the next
    // event's offset follows the last one's).
    let m3 = || {
        s.call(
            "PUT",
            "/v1/merchants/M3",
            &app,
            Some(json!({"lat": 31.2, "lon": 121.4})),
        )
    };
    let (_, before) = m3().await;
    let (status, b) = raw(&s, "POST", "/v1/orders/NOPE/grab", &r1, None, "").await;
    assert_eq!(
        (
            status,
            b["error"]["code"].as_str(),
            b["error"]["field"].as_str()
        ),
        (404, Some("not_found"), Some("order_id")),
        "{b}"
    );
    let (_, after) = m3().await;
    assert_eq!(
        after["offset"].as_u64(),
        before["offset"].as_u64().map(|o| o + 1),
        "{before} {after}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let dir = temp_dir();
    let s = Server::start(&dir, &[]);
    s.wait_ready().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .args([
            "token",
            "--role",
            "rider",
            "--id",
            "R1",
            "--ttl",
            "1s",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let short = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let ping = Some(json!({"lat": 31.23, "lon": 121.47}));
    let (status, _) = s
        .call("POST", "/v1/riders/R1/location", &short, ping.clone())
        .await;
    assert_eq!(status, 202);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, b) = s.call("POST", "/v1/riders/R1/location", &short, ping).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{b}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
