//! The roles a process plays, each wired from the library crates: `serve`
//! (everything in one process, over the embedded log or Kafka), and the
//! split roles `ingress`, `dataflow` and `egress` over Kafka.
//!
//! Every role keeps its background threads in one [`Threads`]: on SIGTERM
//! (or Ctrl-C), or as soon as one of them ends on its own (a panic), the
//! role stops taking requests, stops and joins them in order, and returns
//! an error naming any thread that panicked, so the process exits non-zero
//! with the panic in its log.

use crate::checkpoint::{self, SharedFigures};
use crate::contract;
use crate::rate::{self, RateLimits};
use crate::settings::Plan;
use anyhow::Context;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;
use grabflow_api::lifecycle::{Stop, Thread};
use grabflow_api::Time;
use grabflow_dataflow::checkpoint::{Checkpointing, DataflowState};
use grabflow_dataflow::runtime::{self, Fanout, Observer};
use grabflow_dataflow::stats::DataflowStats;
use grabflow_egress::console::{self, ConsoleConfig};
use grabflow_egress::history::History;
use grabflow_egress::kafka::{follow, OutputSink};
use grabflow_egress::ops::{OpsHub, Tapped};
use grabflow_egress::redis::RedisMirror;
use grabflow_egress::state::EgressState;
use grabflow_egress::verdicts::follow_verdicts;
use grabflow_egress::view::{self, Egress};
use grabflow_http::auth::Secret;
use grabflow_http::metrics;
use grabflow_http::waiter::Waiting;
use grabflow_ingress::Ingress;
use grabflow_log::checkpoints::CheckpointStore;
use grabflow_log::embedded::backlog::Backlog;
use grabflow_log::embedded::Retention;
use grabflow_log::kafka::{ensure_topics, KafkaSources};
use grabflow_log::{embedded, kafka, now_ms, LogHandle};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a process waits for the input topics to be read to their ends
/// before it gives up starting.
const CATCH_UP: Duration = Duration::from_secs(120);

/// How long a sink may take to deliver what it holds when the process stops.
const SINK_CLOSE: Duration = Duration::from_secs(10);

/// The whole HTTP service: ingress, egress, the contract, health and the
/// ops console, every response counted by status class.
pub fn app(ingress: Ingress, egress: EgressState, console: ConsoleConfig) -> Router {
    let responses = egress.responses.clone();
    grabflow_ingress::routes(ingress)
        .merge(egress_routes(egress, console))
        .layer(from_fn_with_state(responses, metrics::count))
}

/// A split ingress process's router: ingress and liveness.
pub fn ingress_app(ingress: Ingress) -> Router {
    grabflow_ingress::routes(ingress).route("/healthz", get(|| async { "ok" }))
}

/// A split egress process's router: egress, the contract and the ops
/// console, every response counted by status class.
pub fn egress_app(egress: EgressState, console: ConsoleConfig) -> Router {
    let responses = egress.responses.clone();
    egress_routes(egress, console).layer(from_fn_with_state(responses, metrics::count))
}

fn egress_routes(egress: EgressState, console: ConsoleConfig) -> Router {
    grabflow_egress::routes::routes(egress)
        .route("/openapi.json", get(contract::openapi))
        .merge(console::routes(console))
}

/// The ops console's settings from the plan.
fn console_config(plan: &Plan) -> ConsoleConfig {
    ConsoleConfig {
        map_tiles: plan.map_tiles.clone(),
    }
}

/// A role's background threads, stopped and joined together.
#[derive(Default)]
pub struct Threads(Vec<Thread>);

impl Threads {
    /// Adds `thread`; threads are stopped and joined in the order added.
    pub fn add(&mut self, thread: Thread) {
        self.0.push(thread);
    }

    /// Resolves once any thread has ended on its own (they end only when
    /// stopped, so this means a panic or a fatal error).
    pub async fn any_ended(&self) {
        loop {
            if let Some(t) = self.0.iter().find(|t| t.is_finished()) {
                tracing::error!(thread = t.name(), "a background thread ended; stopping");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops and joins every thread in order; an error naming each that
    /// panicked (each is also logged).
    pub fn finish(self) -> anyhow::Result<()> {
        let mut panics = Vec::new();
        for thread in self.0 {
            if let Err(p) = thread.stop_and_join() {
                tracing::error!("{p}");
                panics.push(p.to_string());
            }
        }
        if panics.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", panics.join("; "))
        }
    }
}

/// Stops and joins `threads`, then lets `sink` deliver what it holds.
async fn finish(threads: Threads, sink: Option<Arc<OutputSink>>) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let finished = threads.finish();
        if let Some(sink) = sink {
            sink.close(SINK_CLOSE);
            tracing::info!(
                skipped = sink.skipped.load(std::sync::atomic::Ordering::Relaxed),
                "output sink closed (decisions skipped: already on the topics before this start)"
            );
            sink.refusals().context(
                "stopped: a restart resends the refused decisions from the last checkpoint",
            )?;
        }
        finished
    })
    .await?
}

/// How long a checkpoint waits for the decisions before it to be acked.
const SINK_ACKS: Duration = Duration::from_secs(30);

/// Whether the broker has every decision `sink` was handed (a checkpoint
/// is written only then).
fn acked(sink: &OutputSink) -> Result<(), String> {
    sink.delivered(SINK_ACKS).map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Resolves when the process should stop: a signal, or a thread of
/// `threads` that ended on its own.
async fn stopping(threads: &Threads) {
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = threads.any_ended() => {}
    }
}

/// Serves `router` on the plan's address, within its limits, until
/// `until` resolves.
async fn serve_http(
    plan: &Plan,
    router: Router,
    secret: &Secret,
    until: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = RateLimits::new(plan.rate_limit, plan.rate_limit_address, secret.clone());
    let router = router.layer(axum::middleware::from_fn_with_state(limits, rate::limit));
    let listener = tokio::net::TcpListener::bind(&plan.listen)
        .await
        .with_context(|| format!("listening on {}", plan.listen))?;
    println!("grabflow listening on http://{}", listener.local_addr()?);
    tracing::info!(
        max_connections = plan.limits.max_connections,
        header_timeout = ?plan.limits.header_timeout,
        "serving"
    );
    crate::server::serve(listener, router, plan.limits, until).await?;
    Ok(())
}

/// The Redis mirror, when `--redis` is given, and its thread (which ends
/// once the dataflow, holding the mirror, has).
fn mirror(plan: &Plan) -> anyhow::Result<Option<(Arc<dyn Observer>, Thread)>> {
    Ok(match &plan.redis {
        Some((url, prefix)) => {
            let (mirror, thread) =
                RedisMirror::start(url, prefix, plan.dispatch.radius_m).context("--redis")?;
            Some((mirror as Arc<dyn Observer>, thread))
        }
        None => None,
    })
}

/// How long the view keeps stream messages, and the history store closed
/// orders go to (`history.redb` in the data dir).
fn view_retention(plan: &Plan) -> anyhow::Result<view::Retention> {
    std::fs::create_dir_all(&plan.data_dir)
        .with_context(|| format!("creating {}", plan.data_dir.display()))?;
    let history = History::open(&plan.data_dir, plan.retention.history_ms)
        .context("opening the order history store")?;
    Ok(view::Retention {
        stream_ms: plan.retention.stream_ms,
        history: Some(history),
    })
}

/// What the one-process service reads its events from.
struct Input {
    /// Where ingress appends.
    log: LogHandle,
    /// The dataflow workers' sources.
    sources: runtime::Sources,
    /// Ends the sources (Kafka); the embedded feed ends with the log.
    stop_sources: Stop,
    /// The log's time when the service starts.
    since: Time,
    /// The Kafka output sink, when decisions go to topics.
    sink: Option<Arc<OutputSink>>,
    /// The embedded log's backlog, told the dataflow's progress.
    backlog: Option<Arc<Backlog>>,
    /// The checkpoint the dataflow and the view start from, if any.
    restore: Option<Arc<DataflowState>>,
    /// Its observers' states, in the fanout's order (the view first, then
    /// the Kafka sink if there is one).
    saved: Vec<Vec<u8>>,
    /// Where checkpoints are written (and, over the embedded log, the
    /// ledger that goes with them), if they are taken.
    store: Option<(checkpoint::Store, Option<grabflow_log::LedgerSaver>)>,
    /// Checkpoint figures.
    figures: Option<SharedFigures>,
    /// What the checkpoints tell the embedded log's retention.
    needs: Option<checkpoint::Needs>,
}

/// Tells the embedded log's backlog how far the dataflow has got.
struct Progress(Arc<Backlog>);

impl Observer for Progress {
    fn events(&self, _: &[grabflow_api::Event]) {}
    fn decisions(&self, _: Vec<(Time, grabflow_api::Output)>) {}
    fn index(&self, _: Vec<(grabflow_dataflow::IndexEntry, Time, isize)>) {}
    fn progress(&self, time: Time) {
        self.0.progress(time);
    }
}

/// `grabflow serve`: ingress, dataflow and egress in this process, over
/// the embedded log, or over Kafka with `--kafka`.
pub async fn serve(plan: Plan) -> anyhow::Result<()> {
    let secret = Secret::load_or_create(&plan.data_dir)?;
    let mut threads = Threads::default();
    let input = match &plan.kafka {
        None => open_embedded(&plan, &mut threads)?,
        Some(k) => open_kafka(&plan, k.clone(), &mut threads).await?,
    };
    let riders = plan.rider_tables();
    let egress = Egress::new(
        plan.dispatch.clone(),
        input.since,
        riders.clone(),
        view_retention(&plan)?,
    );
    if input.restore.is_some() {
        egress
            .restore(input.saved.first().map_or(&[][..], Vec::as_slice))
            .context("restoring the view from the checkpoint")?;
        if let (Some(sink), Some(saved)) = (&input.sink, input.saved.get(1)) {
            sink.restore(saved)
                .context("restoring the output sink from the checkpoint")?;
        }
    }
    let stats = DataflowStats::default();
    let ops = Arc::new(OpsHub::default());
    // The console's feed reads the decisions on their way into the view.
    let tapped = Tapped {
        egress: egress.clone(),
        hub: Arc::clone(&ops),
    };
    let mut observers: Vec<Arc<dyn Observer>> = vec![Arc::new(tapped)];
    observers.extend(
        input
            .sink
            .iter()
            .map(|s| Arc::clone(s) as Arc<dyn Observer>),
    );
    observers.extend(
        input
            .backlog
            .map(|b| Arc::new(Progress(b)) as Arc<dyn Observer>),
    );
    let mirror = mirror(&plan)?;
    observers.extend(mirror.as_ref().map(|(m, _)| Arc::clone(m)));
    let (flushing, delivering) = (egress.clone(), input.sink.clone());
    let (checkpointed, checkpoints) = checkpointing(
        &plan,
        input.store,
        &input.figures,
        &input.restore,
        input.needs,
        move || {
            flushing.flush_history();
            delivering.as_ref().map_or(Ok(()), |s| acked(s))
        },
    )?;
    egress.set_checkpoints(input.figures.clone());
    let dataflow = runtime::spawn_checkpointed(
        plan.dispatch.clone(),
        plan.timely(),
        input.sources,
        Arc::new(Fanout(observers)),
        stats.clone(),
        riders,
        checkpointed,
    );
    threads.add(Thread::adopt(
        "grabflow-dataflow",
        dataflow,
        input.stop_sources,
    ));
    // Stopped after the dataflow, whose last checkpoint it writes.
    if let Some(thread) = checkpoints {
        threads.add(thread);
    }
    if let Some((handle, thread)) = mirror {
        // Only the dataflow holds the mirror from here: its thread ends
        // once the dataflow has.
        drop(handle);
        threads.add(thread);
    }
    let ingress = Ingress {
        log: input.log,
        secret: secret.clone(),
        waiter: egress.clone(),
    };
    let state = EgressState {
        ops,
        data_dir: Some(plan.data_dir.clone()),
        ..EgressState::new(egress.clone(), secret.clone(), stats)
    };
    let router = app(ingress, state, console_config(&plan));
    let threads = serve_then_close(&plan, router, &secret, Some(&egress), threads).await?;
    // The router (and with it every log handle) is gone: the embedded
    // writer stops, the feed closes, and the dataflow drains what the clock
    // has passed (Kafka's sources are stopped).
    let finished = finish(threads, input.sink).await;
    // The dataflow has stopped: what the view handed on goes to disk.
    egress.close_history();
    finished
}

/// Checkpoints: the dataflow gathers them, a thread of their own writes
/// them to `store`. What the dataflow takes part with (starting from
/// `restore`), and the writer's thread (which runs `before` ahead of each
/// write); none without a store.
#[allow(clippy::type_complexity)]
fn checkpointing(
    plan: &Plan,
    store: Option<(checkpoint::Store, Option<grabflow_log::LedgerSaver>)>,
    figures: &Option<SharedFigures>,
    restore: &Option<Arc<DataflowState>>,
    needs: Option<checkpoint::Needs>,
    before: impl Fn() -> Result<(), String> + Send + 'static,
) -> anyhow::Result<(
    Option<(Arc<Checkpointing>, Option<Arc<DataflowState>>)>,
    Option<Thread>,
)> {
    let (Some((store, ledger)), Some(figures)) = (store, figures) else {
        return Ok((None, None));
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let since = restore.as_ref().map_or(0, |r| r.at);
    let done = Mutex::new(tx);
    let checkpointing = Checkpointing::new(plan.checkpoint_interval, since, move |state| {
        let _ = done.lock().expect("checkpoints").send(state);
    });
    let thread = checkpoint::writer(store, ledger, rx, Arc::clone(figures), needs, before)?;
    Ok((
        Some((Arc::new(checkpointing), restore.clone())),
        Some(thread),
    ))
}

/// Serves `router` until the process should stop (a signal, or one of
/// `threads` ending), then ends the rider streams of `egress` if there is
/// one; hands `threads` back to be finished.
async fn serve_then_close(
    plan: &Plan,
    router: Router,
    secret: &Secret,
    egress: Option<&Arc<Egress>>,
    threads: Threads,
) -> anyhow::Result<Threads> {
    let threads = Arc::new(threads);
    let watched = Arc::clone(&threads);
    let closing = egress.map(Arc::clone);
    serve_http(plan, router, secret, async move {
        stopping(&watched).await;
        if let Some(egress) = closing {
            tracing::info!("shutting down: no new events; draining the dataflow");
            egress.close();
        }
    })
    .await?;
    Arc::try_unwrap(threads).map_err(|_| anyhow::anyhow!("the server still holds its threads"))
}

/// Opens the embedded log: replays it into the feed, starts its writer.
fn open_embedded(plan: &Plan, threads: &mut Threads) -> anyhow::Result<Input> {
    let (feed_tx, feed_rx) = std::sync::mpsc::channel();
    let backlog = Arc::new(Backlog::new(plan.max_backlog));
    let store = CheckpointStore::new(&plan.data_dir);
    let loaded = checkpoint::load(&store, &plan.dispatch)?;
    let (mut resume, restore, saved) = match loaded {
        Some(l) => (
            embedded::Resume {
                from: l.from,
                ledger: l.ledger,
            },
            Some(Arc::new(l.dataflow)),
            l.observers,
        ),
        None => (embedded::Resume::default(), None, Vec::new()),
    };
    resume.ledger.set_windows(plan.ledger_windows());
    let from = resume.from;
    let retention = Arc::new(Retention::new(plan.log_retention));
    let options = embedded::Options {
        ticks: plan.ticks,
        rolling: plan.rolling,
        retention: Arc::clone(&retention),
    };
    let opened = embedded::open_resuming(
        &plan.data_dir,
        feed_tx,
        Arc::clone(&backlog),
        resume,
        options,
    )
    .with_context(|| {
        format!(
            "opening the log in {}",
            embedded::segments::dir(&plan.data_dir).display()
        )
    })?;
    let started_from = restore.as_ref().map_or(0, |r| r.at);
    tracing::info!(
        checkpoint = started_from,
        resume_offset = from,
        replayed = opened.replayed,
        cut_bytes = opened.cut,
        "log opened"
    );
    let figures = Arc::new(Mutex::new(checkpoint::Figures {
        started_from,
        replayed: opened.replayed as u64,
        ..Default::default()
    }));
    threads.add(opened.writer);
    let ledger = opened.handle.ledger_saver();
    Ok(Input {
        log: opened.handle,
        sources: runtime::feed_sources(feed_rx, plan.workers, from),
        stop_sources: Stop::default(),
        since: opened.last_time,
        sink: None,
        backlog: Some(backlog),
        needs: Some(checkpoint::Needs::new(
            retention,
            restore.as_ref().map(|r| (r.at, from)),
        )),
        restore,
        saved,
        store: Some((checkpoint::Store::Files(store), Some(ledger))),
        figures: Some(figures),
    })
}

/// Opens the Kafka log (creating the topics, reading them to their ends)
/// and the output sink.
async fn open_kafka(
    plan: &Plan,
    k: kafka::KafkaConfig,
    threads: &mut Threads,
) -> anyhow::Result<Input> {
    ensure_topics(&k).await.context("creating the topics")?;
    let dispatch = plan.dispatch.clone();
    let windows = plan.ledger_windows();
    // Ingress's ticks along with orders count as the sources' own.
    let along = kafka::Along::default();
    let ticks = along.clone();
    let (log, follower, sink, checkpoints) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let checkpoints = checkpoint::load_kafka(&k, &dispatch)?;
            let (log, follower) = kafka::open(&k, CATCH_UP, windows, ticks)?;
            Ok((log, follower, OutputSink::new(&k)?, checkpoints))
        })
        .await??;
    let (sink, committer) = sink;
    threads.add(follower.into_thread());
    threads.add(committer);
    let (store, loaded) = checkpoints;
    let (sources, stop_sources, figures) = resumed_sources(plan, loaded.as_ref(), along)?;
    let (restore, saved) = match loaded {
        Some(l) => (Some(Arc::new(l.dataflow)), l.observers),
        None => (None, Vec::new()),
    };
    Ok(Input {
        log,
        sources,
        stop_sources,
        since: now_ms(),
        sink: Some(sink),
        backlog: None,
        restore,
        saved,
        store: Some((checkpoint::Store::Kafka(store), None)),
        figures: Some(figures),
        needs: None,
    })
}

/// This process's workers' Kafka sources, resuming where `loaded` (a
/// checkpoint) says, or from the start (logged, for operators and tests);
/// and the checkpoint figures of this start. They count the ticks `along`
/// tells of as their own.
fn resumed_sources(
    plan: &Plan,
    loaded: Option<&checkpoint::Loaded>,
    along: kafka::Along,
) -> anyhow::Result<(runtime::Sources, Stop, SharedFigures)> {
    let resume = loaded.map(|l| l.dataflow.resume()).unwrap_or_default();
    let (sources, stop) = kafka_sources(plan, &resume, along)?;
    let started_from = loaded.map_or(0, |l| l.dataflow.at);
    tracing::info!(
        checkpoint = started_from,
        partitions = resume.len(),
        "kafka input resumes"
    );
    let figures = Arc::new(Mutex::new(checkpoint::Figures {
        started_from,
        ..Default::default()
    }));
    Ok((sources, stop, figures))
}

/// This process's workers' Kafka sources, starting at `resume` (a
/// checkpoint's positions; empty: from the beginning), counting the ticks
/// `along` tells of as their own; and what stops them.
fn kafka_sources(
    plan: &Plan,
    resume: &[(u64, u64)],
    along: kafka::Along,
) -> anyhow::Result<(runtime::Sources, Stop)> {
    let sources = KafkaSources::new(plan.kafka()?)
        .context("kafka sources")?
        .resuming(resume)
        .along(along);
    let (process, hosts) = &plan.cluster;
    let peers = plan.workers * hosts.len().max(1);
    let mut made = HashMap::new();
    for local in 0..plan.workers {
        let index = process * plan.workers + local;
        made.insert(index, sources.source(index, peers).context("kafka source")?);
    }
    let made = Mutex::new(made);
    let factory: runtime::Sources = Arc::new(move |me, _| {
        Box::new(
            made.lock()
                .expect("sources")
                .remove(&me)
                .expect("a source per local worker"),
        )
    });
    Ok((factory, sources.stop.clone()))
}

/// `grabflow ingress`: HTTP → Kafka.
pub async fn ingress(plan: Plan) -> anyhow::Result<()> {
    let k = plan.kafka()?.clone();
    ensure_topics(&k).await.context("creating the topics")?;
    let secret = Secret::load_or_create(&plan.data_dir)?;
    let waiting = Arc::new(Waiting::default());
    let waiters = Arc::clone(&waiting);
    let windows = plan.ledger_windows();
    let (log, follower, following) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let following = follow_verdicts(&k, waiters)?;
        // No dataflow here: nobody to tell of the ticks along.
        let (log, follower) = kafka::open(&k, CATCH_UP, windows, kafka::Along::default())?;
        Ok((log, follower, following))
    })
    .await??;
    let mut threads = Threads::default();
    threads.add(follower.into_thread());
    threads.add(following);
    let router = ingress_app(Ingress {
        log,
        secret: secret.clone(),
        waiter: waiting,
    });
    let threads = serve_then_close(&plan, router, &secret, None, threads).await?;
    finish(threads, None).await
}

/// `grabflow dataflow`: Kafka → Kafka (and Redis); also one process of a
/// timely cluster.
pub async fn dataflow(plan: Plan) -> anyhow::Result<()> {
    let k = plan.kafka()?.clone();
    let first = plan.cluster.0 == 0;
    if first {
        ensure_topics(&k).await.context("creating the topics")?;
    }
    // Decisions and the gathered index reach worker 0, in process 0: only
    // it writes the output topics and the mirror.
    let mut observers: Vec<Arc<dyn Observer>> = Vec::new();
    let mut sink = None;
    let mut threads = Threads::default();
    let mut after_dataflow = Vec::new();
    // One process checkpoints (its workers' states meet in it) and
    // resumes from the cluster's latest checkpoint; a cluster of several
    // replays the input topics from their start.
    let alone = plan.cluster.1.len() <= 1;
    let (mut store, mut loaded) = (None, None);
    if first {
        let dispatch = plan.dispatch.clone();
        let (out, committer, checkpoints) = tokio::task::spawn_blocking(move || {
            let checkpoints = match alone {
                true => Some(checkpoint::load_kafka(&k, &dispatch)?),
                false => None,
            };
            let (out, committer) = OutputSink::new(&k)?;
            anyhow::Ok((out, committer, checkpoints))
        })
        .await??;
        if let Some((s, l)) = checkpoints {
            (store, loaded) = (Some(s), l);
        }
        if let Some(l) = &loaded {
            if let Some(saved) = l.observers.first() {
                out.restore(saved)
                    .context("restoring the output sink from the checkpoint")?;
            }
        }
        observers.push(out.clone());
        sink = Some(out);
        threads.add(committer);
        if let Some((mirror, thread)) = mirror(&plan)? {
            observers.push(mirror);
            after_dataflow.push(thread);
        }
    }
    // No ingress here: the sources tick for every producer.
    let (sources, stop, figures) =
        resumed_sources(&plan, loaded.as_ref(), kafka::Along::default())?;
    let delivering = sink.clone();
    let restore = loaded.map(|l| Arc::new(l.dataflow));
    let store = store.map(|s| (checkpoint::Store::Kafka(s), None));
    let (checkpointed, checkpoints) =
        checkpointing(&plan, store, &Some(figures), &restore, None, move || {
            delivering.as_ref().map_or(Ok(()), |s| acked(s))
        })?;
    // No egress reads this process's rider trackers.
    let dataflow = runtime::spawn_checkpointed(
        plan.dispatch.clone(),
        plan.timely(),
        sources,
        Arc::new(Fanout(observers)),
        DataflowStats::default(),
        None,
        checkpointed,
    );
    threads.add(Thread::adopt("grabflow-dataflow", dataflow, stop));
    // Stopped after the dataflow, whose last checkpoint it writes.
    if let Some(thread) = checkpoints {
        threads.add(thread);
    }
    after_dataflow.into_iter().for_each(|t| threads.add(t));
    println!("grabflow dataflow process {} running", plan.cluster.0);
    stopping(&threads).await;
    finish(threads, sink).await
}

/// `grabflow egress`: Kafka → rider streams and queries.
pub async fn egress(plan: Plan) -> anyhow::Result<()> {
    let k = plan.kafka()?.clone();
    ensure_topics(&k).await.context("creating the topics")?;
    let secret = Secret::load_or_create(&plan.data_dir)?;
    // A separate process: the view keeps the riders' positions itself.
    let egress = Egress::new(plan.dispatch.clone(), 0, None, view_retention(&plan)?);
    let following = {
        let (k, e) = (k.clone(), egress.clone());
        tokio::task::spawn_blocking(move || follow(&k, e)).await??
    };
    let mut threads = Threads::default();
    threads.add(following.into_thread());
    // The view is fed by the follower, not through a tap: the console's
    // summaries work, its order → offer timing and events do not.
    let state = EgressState {
        data_dir: Some(plan.data_dir.clone()),
        ..EgressState::new(egress.clone(), secret.clone(), DataflowStats::default())
    };
    let router = egress_app(state, console_config(&plan));
    let threads = serve_then_close(&plan, router, &secret, Some(&egress), threads).await?;
    let finished = finish(threads, None).await;
    egress.close_history();
    finished
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_thread_that_panics_ends_the_wait_and_fails_the_finish() {
        let mut threads = Threads::default();
        threads.add(
            Thread::spawn("waits", |stop| {
                while !stop.stopped() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .unwrap(),
        );
        threads.add(
            Thread::spawn("fails", |_| {
                std::thread::sleep(Duration::from_millis(50));
                panic!("the sink lost its broker")
            })
            .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(10), threads.any_ended())
            .await
            .expect("the panic ends the wait");
        let e = threads.finish().unwrap_err().to_string();
        assert_eq!(e, "thread fails panicked: the sink lost its broker");
    }
}
