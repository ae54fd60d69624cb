//! The subcommands that are not roles: `token` (mint a token), `sim`
//! (drive a running server like a city), `log verify` / `log repair` (the
//! embedded log's damage), `replay` (run a JSON-lines event log through the
//! dataflow and print every decision).

use anyhow::{bail, Context};
use clap::Args;
use grabflow_api::{DispatchConfig, Event, Id, Time};
use grabflow_dataflow::replay::{replay, ReplayPlan};
use grabflow_http::auth::{default_ttl, Claims, Role, Secret};
use grabflow_log::embedded;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Prints a token for `role` (and rider `id`) signed with the secret in
/// `data_dir`, lasting `ttl` (else the role's default).
pub fn token(
    role: Role,
    id: Option<String>,
    data_dir: &Path,
    ttl: Option<Duration>,
) -> anyhow::Result<()> {
    let id = id.map(|i| Id::new(&i)).transpose().context("--id")?;
    if role == Role::Rider && id.is_none() {
        bail!("a rider token needs --id");
    }
    let secret = Secret::load_or_create(data_dir)?;
    let claims = Claims { role, id };
    if ttl.is_some_and(|t| t < Duration::from_secs(1)) {
        bail!("--ttl must be at least 1s");
    }
    let ttl = ttl.unwrap_or_else(|| default_ttl(role));
    println!("{}", secret.sign_for(&claims, ttl));
    Ok(())
}

/// `sim` settings.
#[derive(Args)]
pub struct SimArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's data dir (its secret signs the simulator's tokens).
    #[arg(long, env = "GRABFLOW_DATA_DIR", default_value = "./grabflow-data")]
    data_dir: PathBuf,
    /// Simulated seconds per real second. Run the server with timings scaled
    /// alike (e.g. `--grab-timeout 3s --rider-ttl 6s` at `--speed 10`).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Seed of the city and of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Riders.
    #[arg(long, default_value_t = 200)]
    riders: usize,
    /// Merchants.
    #[arg(long, default_value_t = 100)]
    merchants: usize,
    /// Orders per minute at the day's base (the lunch peak is ~5× that).
    #[arg(long, default_value_t = 5.0)]
    orders_per_min: f64,
    /// Simulated start time, HH:MM.
    #[arg(long, default_value = "11:00")]
    start: String,
    /// Simulated minutes to run.
    #[arg(long, default_value_t = 120.0)]
    minutes: f64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write PNG charts (orders.png, latency.png) into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
}

impl SimArgs {
    /// The simulator's configuration, checked.
    fn config(&self) -> anyhow::Result<grabflow_sim::SimConfig> {
        let (h, m) = self.start.split_once(':').context("--start is HH:MM")?;
        let start_hour = h.parse::<f64>().context("--start hour")?
            + m.parse::<f64>().context("--start minute")? / 60.0;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.speed)
            || self.riders == 0
            || self.merchants == 0
            || !positive(self.minutes)
        {
            bail!("--speed, --riders, --merchants and --minutes must be positive");
        }
        Ok(grabflow_sim::SimConfig {
            url: self.url.trim_end_matches('/').to_string(),
            data_dir: self.data_dir.clone(),
            speed: self.speed,
            seed: self.seed,
            riders: self.riders,
            merchants: self.merchants,
            orders_per_min: self.orders_per_min,
            start_hour,
            minutes: self.minutes,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            tag: String::new(),
        })
    }
}

/// Runs the simulator against a server and prints (and writes) its report.
pub async fn sim(args: SimArgs) -> anyhow::Result<()> {
    let report = grabflow_sim::run(args.config()?).await?;
    print!("{}", report.render());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = args.plot {
        grabflow_sim::plot::write(&dir, &report.minutes).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Reads a JSON-lines event log (`-`: standard input), in log order.
pub fn read_events(log: &str) -> anyhow::Result<Vec<Event>> {
    let reader: Box<dyn BufRead> = if log == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(log).with_context(|| format!("opening {log}"))?,
        ))
    };
    let mut events = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if !line.trim().is_empty() {
            events.push(
                serde_json::from_str::<Event>(&line).with_context(|| format!("line {}", n + 1))?,
            );
        }
    }
    events.sort_by_key(|e| (e.time, e.offset));
    Ok(events)
}

/// Replays `events` at `workers` workers, the clock running `settle` past
/// the last, and prints every decision as a JSON line.
pub fn replay_log(events: Vec<Event>, workers: usize, settle: Duration) -> anyhow::Result<()> {
    let end = events.last().map_or(0, |e| e.time) + settle.as_millis() as Time + 1;
    let plan = ReplayPlan {
        workers: workers.max(1),
        step: 1_000,
        end,
    };
    let mut out = std::io::stdout().lock();
    for (time, output) in replay(Arc::new(events), &DispatchConfig::default(), &plan) {
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({ "time": time, "output": output }),
        )?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Prints what each segment of the embedded log in `data_dir` holds and
/// any damage; an error (non-zero exit) when the log would not open.
pub fn verify_log(data_dir: &Path) -> anyhow::Result<()> {
    // A 0.12 data dir is read where it is: verifying changes nothing.
    let legacy = data_dir.join(embedded::segments::LEGACY);
    let segments = if legacy.exists() {
        vec![embedded::Segment {
            first: 0,
            path: legacy,
        }]
    } else {
        log_segments(data_dir)?
    };
    let mut refused = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        let path = &segment.path;
        let mut report =
            embedded::verify(path).with_context(|| format!("reading {}", path.display()))?;
        // Only the last segment may end in a torn write.
        report.torn_tail &= i + 1 == segments.len();
        print_report(path, &report);
        if report.refused() {
            refused.push(path.display().to_string());
        }
    }
    if !refused.is_empty() {
        bail!(
            "{} damaged; `grabflow log repair --data-dir {}` keeps every whole record",
            refused.join(", "),
            data_dir.display()
        );
    }
    Ok(())
}

/// Repairs each segment of the embedded log in `data_dir` (see
/// `grabflow_log::embedded::repair`).
pub fn repair_log(data_dir: &Path) -> anyhow::Result<()> {
    for segment in log_segments(data_dir)? {
        let path = &segment.path;
        let repaired =
            embedded::repair(path).with_context(|| format!("repairing {}", path.display()))?;
        print_report(path, &repaired.report);
        match repaired.quarantine {
            Some(q) => println!(
                "repaired: kept {} whole records; the damaged bytes are in {} (offsets in {}.txt)",
                repaired.report.records,
                q.display(),
                q.display()
            ),
            None => println!("nothing to repair"),
        }
    }
    Ok(())
}

/// The segments of the log in `data_dir` (a 0.12 `events.log` moved into
/// place first, as a start would).
fn log_segments(data_dir: &Path) -> anyhow::Result<Vec<embedded::Segment>> {
    embedded::segments::migrate(data_dir)?;
    let segments = embedded::segments::list(data_dir)?;
    if segments.is_empty() {
        println!(
            "{}: no log segments",
            embedded::segments::dir(data_dir).display()
        );
    }
    Ok(segments)
}

fn print_report(path: &Path, report: &embedded::Report) {
    println!(
        "{}: {} whole records ({} events)",
        path.display(),
        report.records,
        report.events
    );
    for (offset, len) in &report.damaged {
        println!("damaged: {len} bytes at byte {offset}");
    }
    if report.torn_tail {
        println!("the damage is a torn tail (a write cut short): opening the log cuts it");
    } else if !report.damaged.is_empty() {
        println!(
            "{} whole records follow the first damage: the log will not open until repaired",
            report.after_damage
        );
    }
}
