//! The simulator drives a real `grabflow serve` through a short, fast-forwarded
//! day; its report must agree with the server's own figures.

mod common;

use common::spawn_listening;
use serde_json::Value;
use std::process::Command;

#[test]
fn a_fast_forwarded_lunch_is_consistent_with_the_server_and_charted() {
    let dir = std::env::temp_dir().join(format!("grabflow-sim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Server timings scaled by the simulation speed (180×): 30 s to grab, 60 s TTL.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grabflow"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--grab-timeout",
        "170ms",
        "--rider-ttl",
        "340ms",
        "--tick",
        "10ms",
    ])
    .arg("--data-dir")
    .arg(&dir);
    let (mut server, url) = spawn_listening(&mut cmd);
    let (json, plots) = (dir.join("report.json"), dir.join("plots"));
    let out = Command::new(env!("CARGO_BIN_EXE_grabflow"))
        .args([
            "sim",
            "--url",
            &url,
            "--speed",
            "180",
            "--start",
            "11:00",
            "--minutes",
            "150",
        ])
        .args([
            "--riders",
            "40",
            "--merchants",
            "30",
            "--orders-per-min",
            "2",
            "--seed",
            "7",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plots)
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("server agrees        true"), "{text}");
    assert_eq!(r["consistent_with_server"], true, "{r:#}");
    assert_eq!(r["double_winners"], 0);
    assert_eq!(
        r["errors"].as_object().unwrap().len(),
        0,
        "errors: {}",
        r["errors"]
    );
    let placed = r["orders_placed"].as_u64().unwrap();
    assert!(placed > 60, "placed {placed}");
    let finals: u64 = r["final_states"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        finals, placed,
        "every placed order is in exactly one final state"
    );
    assert!(
        r["orders_delivered"].as_u64().unwrap() > 0 && r["orders_grabbed"].as_u64().unwrap() > 0
    );
    for l in [
        "order_to_first_offer",
        "grab_to_result",
        "location_to_index",
    ] {
        assert!(r[l]["samples"].as_u64().unwrap() > 0, "no {l} samples");
    }
    // The lunch peak shows: orders per minute around 12:15 well above 11:00–11:25.
    let minutes = r["minutes"].as_array().unwrap();
    let mean = |from: f64, to: f64| {
        let v: Vec<f64> = minutes
            .iter()
            .filter(|m| (from..to).contains(&m["hour"].as_f64().unwrap()))
            .map(|m| m["placed"].as_f64().unwrap())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (edge, peak) = (mean(11.0, 11.42), mean(11.83, 12.67));
    assert!(
        peak > 2.0 * edge,
        "lunch peak {peak:.2}/min vs {edge:.2}/min before it"
    );
    for name in ["orders.png", "latency.png"] {
        let img = image::open(plots.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .to_rgb8();
        assert_eq!(img.dimensions(), (1000, 500));
        let first = *img.get_pixel(0, 0);
        assert!(img.pixels().any(|p| *p != first), "{name} is blank");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
