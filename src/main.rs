//! `grabflow`: the command line. Parses arguments and wires components; the
//! work is done by the library crates.
//!
//! ## Layout
//!
//! - `replay`: runs a JSON-lines event log through the dispatch dataflow and
//!   prints every decision as a JSON line (`{"time": …, "output": …}`).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use grabflow_api::{DispatchConfig, Event, Time};
use grabflow_dataflow::replay::{replay, ReplayPlan};
use std::io::{BufRead, Write};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "grabflow",
    version,
    about = "Real-time dispatch for on-demand food delivery, as one incremental dataflow"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay an event log (one JSON event per line) and print every decision.
    Replay {
        /// The log file; `-` reads standard input.
        #[arg(long, default_value = "-")]
        log: String,
        /// Timely worker threads.
        #[arg(long, default_value_t = 1, env = "GRABFLOW_WORKERS")]
        workers: usize,
        /// Run the clock this many milliseconds past the last event, so timers fire.
        #[arg(long, default_value_t = 3_600_000)]
        settle_ms: Time,
        /// Dispatch configuration as JSON (fields of `DispatchConfig`); defaults otherwise.
        #[arg(long)]
        config: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Replay {
            log,
            workers,
            settle_ms,
            config,
        } => {
            let cfg: DispatchConfig = match config {
                Some(json) => serde_json::from_str(&json).context("--config")?,
                None => DispatchConfig::default(),
            };
            if let Err((field, why)) = cfg.validate() {
                bail!("config field {field} {why}");
            }
            let reader: Box<dyn BufRead> = if log == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&log).with_context(|| format!("opening {log}"))?,
                ))
            };
            let mut events = Vec::new();
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let event: Event =
                    serde_json::from_str(&line).with_context(|| format!("line {}", n + 1))?;
                events.push(event);
            }
            events.sort_by_key(|e| (e.time, e.offset));
            let end = events.last().map_or(0, |e| e.time) + settle_ms + 1;
            let plan = ReplayPlan {
                workers: workers.max(1),
                step: 1_000,
                end,
            };
            let mut out = std::io::stdout().lock();
            for (time, output) in replay(Arc::new(events), &cfg, &plan) {
                serde_json::to_writer(
                    &mut out,
                    &serde_json::json!({ "time": time, "output": output }),
                )?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }
    }
}
