//! `grabflow`: the command line. Parses arguments and hands them to the
//! library (`grabflow::service` for the roles, `grabflow::commands` for
//! the rest); settings are layered by `grabflow::settings`.

use clap::{Parser, Subcommand};
use grabflow::commands::{self, SimArgs};
use grabflow::service;
use grabflow::settings::{Dur, Settings};
use grabflow_http::auth::Role;
use std::future::Future;
use std::path::PathBuf;

/// mimalloc: the service allocates per request and per event on several
/// threads, where glibc's malloc showed up at ~15% of a busy server's time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run ingress, dataflow and egress in one process (embedded log, or Kafka).
    Serve(Settings),
    /// Run only ingress (HTTP → Kafka); needs `--kafka`.
    Ingress(Settings),
    /// Run only the dataflow (Kafka → Kafka, Redis); needs `--kafka`.
    Dataflow(Settings),
    /// Run only egress (Kafka → rider streams, queries); needs `--kafka`.
    Egress(Settings),
    /// Print a token signed with the secret in the data dir.
    Token {
        /// app, rider or ops.
        #[arg(long)]
        role: Role,
        /// The rider id (role rider).
        #[arg(long)]
        id: Option<String>,
        /// The data dir holding `secret.key` (created if missing).
        #[arg(long, env = "GRABFLOW_DATA_DIR", default_value = "./grabflow-data")]
        data_dir: PathBuf,
        /// How long the token lasts [default: 12h for riders and ops, 30 days
        /// for apps].
        #[arg(long)]
        ttl: Option<Dur>,
    },
    /// Drive a running grabflow like a city's traffic and report what happened.
    Sim(SimArgs),
    /// Check the embedded log for damage, or repair it.
    Log {
        #[command(subcommand)]
        action: LogAction,
    },
    /// Replay an event log (one JSON event per line) and print every decision.
    Replay {
        /// The log file; `-` reads standard input.
        #[arg(long, default_value = "-")]
        log: String,
        /// Timely worker threads.
        #[arg(long, default_value_t = 1, env = "GRABFLOW_WORKERS")]
        workers: usize,
        /// Run the clock this long past the last event, so timers fire.
        #[arg(long, default_value = "1h")]
        settle: Dur,
    },
}

#[derive(Subcommand)]
enum LogAction {
    /// Report what the log holds and any damage; changes nothing. Exits
    /// non-zero when the log would not open.
    Verify {
        /// The data dir holding the log (`log/*.seg`).
        #[arg(long, env = "GRABFLOW_DATA_DIR", default_value = "./grabflow-data")]
        data_dir: PathBuf,
    },
    /// Keep every whole record (those after damage too) and move the
    /// damaged bytes to a quarantine file beside the log. Stop the server first.
    Repair {
        /// The data dir holding the log (`log/*.seg`).
        #[arg(long, env = "GRABFLOW_DATA_DIR", default_value = "./grabflow-data")]
        data_dir: PathBuf,
    },
}

fn block_on(f: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(s) => block_on(service::serve(s.plan()?)),
        Command::Ingress(s) => block_on(service::ingress(s.plan()?)),
        Command::Dataflow(s) => block_on(service::dataflow(s.plan()?)),
        Command::Egress(s) => block_on(service::egress(s.plan()?)),
        Command::Sim(args) => block_on(commands::sim(args)),
        Command::Token {
            role,
            id,
            data_dir,
            ttl,
        } => commands::token(role, id, &data_dir, ttl.map(|t| t.0)),
        Command::Log {
            action: LogAction::Verify { data_dir },
        } => commands::verify_log(&data_dir),
        Command::Log {
            action: LogAction::Repair { data_dir },
        } => commands::repair_log(&data_dir),
        Command::Replay {
            log,
            workers,
            settle,
        } => commands::replay_log(commands::read_events(&log)?, workers, settle.0),
    }
}
