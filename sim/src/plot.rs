//! PNG charts of the simulated day (plotters).

use crate::report::Minute;
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers a font for labels; without one the charts are drawn unlabelled.
fn font() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| match std::fs::read(FONT) {
        Ok(bytes) => plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .is_ok(),
        Err(_) => false,
    })
}

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn chart(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<(), String> {
    let title = title.to_string();
    let labels = font();
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let xs = series.iter().flat_map(|s| s.2.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
    let y1 = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if labels {
        builder.caption(&title, ("sans-serif", 24));
    }
    let mut chart = builder
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc("hour of the day")
            .y_desc(y_label)
            .x_label_formatter(&|h| format!("{:02}:{:02}", *h as u32, ((h.fract()) * 60.0) as u32));
    } else {
        mesh.disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (name, colour, points) in series {
        let drawn = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
        if labels {
            let c = *colour;
            drawn.label(*name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
            });
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Writes `orders.png` (orders per minute by what happened to them) and
/// `latency.png` (median order → first offer per minute) into `dir`.
pub fn write(dir: &Path, minutes: &[Minute]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    // Long runs are averaged over wider windows (about 60 points in all) so
    // the day's shape shows through minute-to-minute noise.
    let window = (minutes.len() / 60).max(1);
    let line = |f: fn(&Minute) -> u64| {
        minutes
            .chunks(window)
            .map(|c| {
                (
                    c[0].hour,
                    c.iter().map(|m| f(m) as f64).sum::<f64>() / c.len() as f64,
                )
            })
            .collect::<Vec<_>>()
    };
    chart(
        &dir.join("orders.png"),
        &if window > 1 {
            format!("orders per minute ({window}-minute averages)")
        } else {
            "orders per minute".to_string()
        },
        "orders",
        &[
            ("placed", BLUE, line(|m| m.placed)),
            ("grabbed", GREEN, line(|m| m.grabbed)),
            ("delivered", BLACK, line(|m| m.delivered)),
            ("cancelled", RED, line(|m| m.cancelled)),
        ],
    )?;
    let offers: Vec<(f64, f64)> = minutes
        .iter()
        .filter(|m| m.offer_p50_ms > 0.0)
        .map(|m| (m.hour, m.offer_p50_ms))
        .collect();
    chart(
        &dir.join("latency.png"),
        "order → first offer, median per minute",
        "ms",
        &[("p50", MAGENTA, offers)],
    )
}
