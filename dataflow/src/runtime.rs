//! The live worker runtime: the dispatch dataflow fed from the log.
//!
//! [`spawn`] starts timely workers (threads of this process, or a cluster of
//! processes: whatever the `timely::Config` says). Each worker reads its share
//! of the log from its own [`Source`] (the embedded log's feed, or its Kafka
//! partitions), inserts the events at their log times and advances its input
//! to the source's frontier, so timers fire as the clock passes them.
//!
//! Everything the [`Observer`] hears is gathered at worker 0 (the one that
//! runs `decide`): events, index changes from every worker, decisions and
//! progress. A decision at time `t` is handed over only once every event of
//! `t` has been, so the observer always sees an order placed before it sees
//! the order's first transition. A lone worker hands each batch of events to
//! the observer as it reads them, before they enter the dataflow; several
//! gather them at worker 0 through the dataflow.
//!
//! When the sources end (the log closed, or the service stops), the workers
//! agree on the earliest time any of their inputs stopped at, drain
//! everything before it, and only then drop the dataflow together, without
//! firing the timers still pending.

use crate::checkpoint::{encoded, Checkpointing, DataflowState, Snapshot};
use crate::graph::{dispatch_sharing, Checkpoints};
use crate::riders::RiderTables;
use crate::IndexEntry;
use differential_dataflow::input::{Input, InputSession};
use grabflow_api::{DispatchConfig, Event, Feed, Output, Time};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use timely::dataflow::operators::vec::{Broadcast, Input as VecInput};
use timely::dataflow::operators::{Exchange, Inspect, Probe};
use timely::dataflow::ProbeHandle;
use timely::scheduling::Activator;

/// Receives what the dataflow produces. Called from worker 0's thread.
pub trait Observer: Send + Sync + 'static {
    /// Events as they enter the dataflow (before any decision on them).
    fn events(&self, events: &[Event]);
    /// Decisions of `decide`, in time and decision order.
    fn decisions(&self, decisions: Vec<(Time, Output)>);
    /// Changes of the rider index (from every worker).
    fn index(&self, changes: Vec<(IndexEntry, Time, isize)>);
    /// Every decision before `time` has been delivered.
    fn progress(&self, time: Time);
    /// Its state for a checkpoint at `at`: called once every decision
    /// before `at` has been delivered and none after, on worker 0, so it
    /// copies and leaves the encoding to the snapshot (called by the
    /// checkpoint's writer). Empty when it keeps nothing to restore.
    fn save(&self, at: Time) -> Snapshot {
        let _ = at;
        encoded(Vec::new())
    }
}

/// Hands every call to each observer in turn; its saved state holds each
/// one's.
pub struct Fanout(pub Vec<Arc<dyn Observer>>);

impl Observer for Fanout {
    fn events(&self, events: &[Event]) {
        self.0.iter().for_each(|o| o.events(events));
    }
    fn decisions(&self, decisions: Vec<(Time, Output)>) {
        if let Some((last, rest)) = self.0.split_last() {
            rest.iter().for_each(|o| o.decisions(decisions.clone()));
            last.decisions(decisions);
        }
    }
    fn index(&self, changes: Vec<(IndexEntry, Time, isize)>) {
        if let Some((last, rest)) = self.0.split_last() {
            rest.iter().for_each(|o| o.index(changes.clone()));
            last.index(changes);
        }
    }
    fn progress(&self, time: Time) {
        self.0.iter().for_each(|o| o.progress(time));
    }
    /// The first observer's state that is not empty: one observer (the
    /// egress view) keeps what a restart needs; the others are sinks.
    /// Every observer's state, in their order (see [`Fanout::parts`]).
    fn save(&self, at: Time) -> Snapshot {
        let parts: Vec<Snapshot> = self.0.iter().map(|o| o.save(at)).collect();
        Box::new(move || {
            let parts: Vec<Vec<u8>> = parts.into_iter().map(|p| p()).collect();
            postcard::to_allocvec(&parts).expect("states serialize")
        })
    }
}

impl Fanout {
    /// The states of a fanout's observers, in their order, from what its
    /// [`Observer::save`] made.
    pub fn parts(saved: &[u8]) -> Result<Vec<Vec<u8>>, postcard::Error> {
        postcard::from_bytes(saved)
    }
}

// Where one worker's events come from. It lives in the vocabulary crate, so
// the logs can implement it without depending on timely; re-exported here so
// `runtime::Source` keeps naming it.
use grabflow_api::source::Positions;
pub use grabflow_api::Source;

/// Makes worker `index` of `peers` its source.
pub type Sources = Arc<dyn Fn(usize, usize) -> Box<dyn Source> + Send + Sync>;

/// A worker's share of the embedded log's feed: the events whose offset maps
/// to it, and every tick.
struct FeedSource {
    rx: mpsc::Receiver<Feed>,
    me: usize,
    peers: usize,
    frontier: Time,
    /// Where each log time read lately starts (every worker sees every
    /// event, before taking its share), for [`Source::resume_at`].
    positions: Positions,
}

impl FeedSource {
    /// Notes where each log time of `events` starts.
    fn note(&mut self, events: &[Event]) {
        for e in events {
            self.positions.read(e.time, e.offset);
        }
        self.positions.keep_near(self.frontier);
    }

    fn take(&mut self, item: Feed, out: &mut Vec<Event>) {
        if let Feed::Events(events) | Feed::EventsThenTick(events, _) = &item {
            self.note(events);
        }
        match item {
            Feed::Events(mut events) if self.peers == 1 => {
                if out.is_empty() {
                    *out = events;
                } else {
                    out.append(&mut events);
                }
            }
            Feed::Events(events) => {
                let (me, peers) = (self.me, self.peers);
                out.extend(
                    events
                        .into_iter()
                        .filter(|e| e.offset as usize % peers == me),
                );
            }
            Feed::Tick(t) => self.frontier = self.frontier.max(t),
            Feed::EventsThenTick(events, t) => {
                self.take(Feed::Events(events), out);
                self.take(Feed::Tick(t), out);
            }
        }
    }
}

impl Source for FeedSource {
    /// A lone worker has nothing to do until the feed says something (every
    /// tick comes through it), so it sleeps until then: no wake-up a
    /// millisecond for nothing.
    fn idle_wait(&self) -> Duration {
        if self.peers == 1 {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(1)
        }
    }

    /// The embedded log's offset of the first event at or after `at`, or
    /// the next to come if none has come yet.
    fn resume_at(&self, at: Time) -> Vec<(u64, u64)> {
        vec![(0, self.positions.resume_at(at))]
    }

    /// Returns once the frontier moves (or `wait` ends): every operator
    /// handles a millisecond only once the frontier has passed it, so a step
    /// for events alone, between ticks, would have nothing to finish. When
    /// the log closes, its last events are handed over before the end.
    fn poll(&mut self, out: &mut Vec<Event>, wait: Duration) -> Option<Time> {
        let (from, deadline) = (self.frontier, Instant::now() + wait);
        // What is left when the log has closed: the last events and the last
        // tick (if either came since the last poll), then the end.
        let ended =
            |out: &Vec<Event>, frontier| (!out.is_empty() || frontier > from).then_some(frontier);
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(item) => self.take(item, out),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return ended(out, self.frontier),
                }
            }
            let now = Instant::now();
            if self.frontier > from || now >= deadline {
                return Some(self.frontier);
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(item) => self.take(item, out),
                Err(mpsc::RecvTimeoutError::Timeout) => return Some(self.frontier),
                Err(mpsc::RecvTimeoutError::Disconnected) => return ended(out, self.frontier),
            }
        }
    }
}

/// Sources for `workers` in-process workers reading the embedded log's feed,
/// whose first event will be at offset `next` (0, or where a checkpoint
/// resumes). One worker reads it directly; several get it fanned out by a
/// feeder thread.
pub fn feed_sources(feed: mpsc::Receiver<Feed>, workers: usize, next: u64) -> Sources {
    let rxs: Vec<Mutex<Option<mpsc::Receiver<Feed>>>> = if workers <= 1 {
        vec![Mutex::new(Some(feed))]
    } else {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::channel::<Feed>()).unzip();
        std::thread::Builder::new()
            .name("grabflow-feeder".into())
            .spawn(move || {
                for item in feed {
                    for tx in &txs {
                        let _ = tx.send(item.clone());
                    }
                }
            })
            .expect("spawn feeder");
        rxs.into_iter().map(|rx| Mutex::new(Some(rx))).collect()
    };
    Arc::new(move |me, peers| {
        let rx = rxs[me]
            .lock()
            .expect("feed lock")
            .take()
            .expect("one receiver per worker");
        Box::new(FeedSource {
            rx,
            me,
            peers,
            frontier: 0,
            positions: Positions::from(next),
        })
    })
}

/// Starts the workers `timely` describes, each reading its [`Source`] until
/// it ends; returns the thread that waits for them. That thread panics if
/// the workers could not start or one of them panicked, so whoever joins
/// it learns of the failure. With `riders`, the
/// workers keep their rider trackers there (one per worker, all in this
/// process), for the rider query to read.
pub fn spawn(
    cfg: DispatchConfig,
    timely: timely::Config,
    sources: Sources,
    observer: Arc<dyn Observer>,
    stats: crate::stats::DataflowStats,
    riders: Option<RiderTables>,
) -> std::thread::JoinHandle<()> {
    spawn_checkpointed(cfg, timely, sources, observer, stats, riders, None)
}

/// Checkpoints taken as [`Checkpointing`] says, and the one to start from.
pub type Checkpointed = (Arc<Checkpointing>, Option<Arc<DataflowState>>);

/// [`spawn`], taking part in checkpoints (see [`crate::checkpoint`]), and
/// starting from `restore`'s checkpoint if there is one: its sources must
/// then resume where it says.
pub fn spawn_checkpointed(
    cfg: DispatchConfig,
    timely: timely::Config,
    sources: Sources,
    observer: Arc<dyn Observer>,
    stats: crate::stats::DataflowStats,
    riders: Option<RiderTables>,
    checkpointed: Option<Checkpointed>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("grabflow-dataflow".into())
        .spawn(move || {
            let run = timely::execute(timely, move |worker| {
                let mut source = sources(worker.index(), worker.peers());
                stats.register(worker);
                let checkpoints = checkpointed.as_ref().map(|(c, restore)| {
                    c.set_workers(worker.peers());
                    Checkpoints {
                        checkpointing: Arc::clone(c),
                        restore: restore.clone(),
                        activators: Rc::default(),
                    }
                });
                let mut dataflow =
                    WorkerDataflow::build(worker, &cfg, riders.as_ref(), checkpoints);
                dataflow.follow(worker, source.as_mut(), &*observer);
                dataflow.finish(worker, source.as_mut(), &*observer);
            });
            let guards = run.unwrap_or_else(|e| panic!("the dataflow could not start: {e}"));
            let failed: Vec<String> = guards.join().into_iter().filter_map(Result::err).collect();
            if !failed.is_empty() {
                panic!("a dataflow worker failed: {}", failed.join("; "));
            }
        })
        .expect("spawn dataflow")
}

/// One worker's dispatch dataflow, with what worker 0 gathers from it for
/// the observer (see the module doc).
struct WorkerDataflow {
    me: usize,
    /// A lone worker tells the observer of events as it reads them; several
    /// gather them at worker 0 through the dataflow.
    direct: bool,
    input: InputSession<Time, Event, isize>,
    /// How far the decisions have got.
    probe: ProbeHandle<Time>,
    /// How far the events gathered at worker 0 have got (several workers).
    seen_probe: Option<ProbeHandle<Time>>,
    /// Events gathered at worker 0, not yet handed to the observer.
    seen: Rc<RefCell<Vec<Event>>>,
    /// Decisions gathered at worker 0, not yet held or handed over.
    decided: Rc<RefCell<Vec<(Time, Output)>>>,
    /// Index changes gathered at worker 0, not yet handed over.
    indexed: Rc<RefCell<Vec<(IndexEntry, Time, isize)>>>,
    /// Decisions waiting for every event of their time to be handed over.
    held: Vec<(Time, Output)>,
    /// The progress last told to the observer.
    reported: Time,
    /// Checkpoints this worker takes part in.
    checkpoints: Option<Taking>,
}

/// A worker's share in checkpoints: the requests it has acted on.
struct Taking {
    checkpointing: Arc<Checkpointing>,
    /// This worker's stateful operators, poked at each request.
    activators: Rc<RefCell<Vec<Activator>>>,
    /// The last request the operators were poked for.
    poked: Time,
    /// The last request this worker's source position was given for.
    positioned: Time,
    /// The last request the observer saved its state for (worker 0).
    observed: Time,
}

impl WorkerDataflow {
    /// Builds the dispatch dataflow on `worker`, with the operators that
    /// gather at worker 0 what the observer hears.
    fn build(
        worker: &mut timely::worker::Worker,
        cfg: &DispatchConfig,
        riders: Option<&RiderTables>,
        checkpoints: Option<Checkpoints>,
    ) -> Self {
        let (me, peers) = (worker.index(), worker.peers());
        let seen = Rc::new(RefCell::new(Vec::new()));
        let decided = Rc::new(RefCell::new(Vec::new()));
        let indexed = Rc::new(RefCell::new(Vec::new()));
        let (s, d, i) = (Rc::clone(&seen), Rc::clone(&decided), Rc::clone(&indexed));
        let direct = peers == 1;
        let (mut input, probe, seen_probe) = worker.dataflow::<Time, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Event, isize>();
            let out = dispatch_sharing(events.clone(), cfg, riders, checkpoints.as_ref());
            // Without a lone worker to tell the observer directly, gather
            // the events at worker 0.
            let seen_probe = (!direct).then(|| {
                events
                    .inner
                    .exchange(|_| 0)
                    .inspect(move |(e, _, _)| s.borrow_mut().push(e.clone()))
                    .probe()
                    .0
            });
            out.index
                .inner
                .exchange(|_| 0)
                .inspect(move |x| i.borrow_mut().push(x.clone()));
            let (probe, _) = out
                .outputs
                .inner
                .inspect(move |(o, t, _)| d.borrow_mut().push((*t, o.clone())))
                .probe();
            (input, probe, seen_probe)
        });
        let restored = checkpoints
            .as_ref()
            .and_then(|c| c.restore.as_ref())
            .map_or(0, |r| r.at);
        if restored > 0 {
            input.advance_to(restored);
        }
        WorkerDataflow {
            me,
            direct,
            input,
            probe,
            seen_probe,
            seen,
            decided,
            indexed,
            held: Vec::new(),
            reported: restored,
            checkpoints: checkpoints.map(|c| Taking {
                checkpointing: c.checkpointing,
                activators: c.activators,
                poked: restored,
                positioned: restored,
                observed: restored,
            }),
        }
    }

    /// Worker 0 asks for a checkpoint at `now` (its input's time, or the
    /// agreed end) when one is due (or `ending`).
    fn ask(&self, now: Time, ending: bool) {
        if let (0, Some(c)) = (self.me, &self.checkpoints) {
            c.checkpointing.due(now, ending);
        }
    }

    /// Acts on the checkpoint asked for: each worker pokes its operators
    /// once per request, and gives its source's position once its input
    /// has passed the time. Returns the request, if one is open.
    fn act(&mut self, source: &dyn Source) -> Option<Time> {
        let now = *self.input.time();
        let c = self.checkpoints.as_mut()?;
        let at = c.checkpointing.requested()?;
        if c.poked != at {
            c.poked = at;
            for a in c.activators.borrow().iter() {
                a.activate();
            }
        }
        if c.positioned != at && now >= at {
            c.positioned = at;
            c.checkpointing.position(at, self.me, source.resume_at(at));
        }
        Some(at)
    }

    /// The worker loop: reads `source` until it ends, inserting its events
    /// at their log times and advancing the input to its frontier, and
    /// steps the worker; worker 0 reports to `observer` after each step.
    fn follow(
        &mut self,
        worker: &mut timely::worker::Worker,
        source: &mut dyn Source,
        observer: &dyn Observer,
    ) {
        let mut batch = Vec::new();
        let mut wait = Duration::ZERO;
        while let Some(at) = source.poll(&mut batch, wait) {
            if self.direct && !batch.is_empty() {
                observer.events(&batch);
            }
            self.insert(&mut batch, at);
            self.ask(*self.input.time(), false);
            self.act(source);
            worker.step();
            if self.me == 0 {
                self.report(observer);
            }
            // While the outputs are behind the input, step again at once (a
            // change crosses the graph in several steps); once caught up,
            // wait for the source.
            let now = *self.input.time();
            wait = if self.probe.less_than(&now) || self.seen_upto(now) < now {
                Duration::ZERO
            } else {
                source.idle_wait()
            };
        }
    }

    /// Inserts `batch`'s events (emptying it) and advances the input to the
    /// source's `frontier`.
    fn insert(&mut self, batch: &mut Vec<Event>, frontier: Time) {
        for e in batch.drain(..) {
            // Sources promise events no older than the frontier they gave;
            // the clamp only keeps a broken promise from panicking a live
            // service.
            debug_assert!(e.time >= *self.input.time(), "events in time order");
            let t = e.time.max(*self.input.time());
            self.input.update_at(e, t, 1);
        }
        if frontier > *self.input.time() {
            self.input.advance_to(frontier);
        }
        self.input.flush();
    }

    /// Worker 0, after a step: hands over what has reached it, and tells
    /// how far every decision has.
    fn report(&mut self, observer: &dyn Observer) {
        let seen_upto = self.seen_upto(*self.input.time());
        self.deliver(observer, seen_upto);
        let at = frontier(&self.probe).min(seen_upto);
        if at > self.reported {
            self.reported = at;
            observer.progress(at);
        }
    }

    /// How far every event has reached the observer, the input being at
    /// `input_time`.
    fn seen_upto(&self, input_time: Time) -> Time {
        self.seen_probe
            .as_ref()
            .map_or(input_time, |p| frontier(p).min(input_time))
    }

    /// Worker 0: hands the observer the events and index changes gathered,
    /// and the decisions before `upto` (once every event of their time has
    /// been handed over).
    fn deliver(&mut self, observer: &dyn Observer, upto: Time) {
        let events: Vec<Event> = self.seen.borrow_mut().drain(..).collect();
        if !events.is_empty() {
            observer.events(&events);
        }
        let changes: Vec<_> = self.indexed.borrow_mut().drain(..).collect();
        if !changes.is_empty() {
            observer.index(changes);
        }
        self.held.extend(self.decided.borrow_mut().drain(..));
        // A checkpoint asked for: the observer saves its state between the
        // decisions before its time and those at or after it, once every
        // decision before it has been made (the probe has passed it).
        let made = frontier(&self.probe).min(upto);
        let save_at = self.checkpoints.as_ref().and_then(|c| {
            c.checkpointing
                .requested()
                .filter(|at| *at != c.observed && *at <= made)
        });
        if let Some(at) = save_at {
            let before = self.held.partition_point(|(t, _)| *t < at);
            if before > 0 {
                observer.decisions(self.held.drain(..before).collect());
            }
            let c = self.checkpoints.as_mut().expect("checked above");
            c.observed = at;
            c.checkpointing.observer(at, observer.save(at));
        }
        let ready = self.held.partition_point(|(t, _)| *t < upto);
        if ready > 0 {
            observer.decisions(self.held.drain(..ready).collect());
        }
    }

    /// Drains what every worker's clock has passed, then stops without
    /// letting time run to infinity (which would fire every pending timer).
    /// The workers agree on where to stop and on when all have got there:
    /// sources may end at different times, and a worker that dropped its
    /// dataflow early would leave the others waiting on it for ever.
    fn finish(
        mut self,
        worker: &mut timely::worker::Worker,
        source: &mut dyn Source,
        observer: &dyn Observer,
    ) {
        self.input.flush();
        let mut ending = Ending::new(worker);
        let until = ending.agree(worker, *self.input.time());
        if until < Time::MAX {
            worker.step_or_park_while(PARK, || {
                self.probe.less_than(&until) || self.seen_upto(until) < until
            });
        }
        if self.me == 0 {
            self.deliver(observer, until);
        }
        if until < Time::MAX && self.checkpoints.is_some() {
            self.last_checkpoint(worker, &mut ending, source, observer, until);
        }
        ending.all_drained(worker);
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
    }
}

impl WorkerDataflow {
    /// On a graceful end, with everything before `until` drained: a last
    /// checkpoint at `until`, so the next start replays nothing. Worker 0
    /// asks for it; once every worker has heard (the second round of
    /// `ending`), each pokes its operators and gives its position, and
    /// they step until it is whole (or a few seconds have passed).
    fn last_checkpoint(
        &mut self,
        worker: &mut timely::worker::Worker,
        ending: &mut Ending,
        source: &mut dyn Source,
        observer: &dyn Observer,
        until: Time,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // One still open is replaced by the one at the end.
        self.ask(until, true);
        ending.all_heard(worker);
        let asked = self
            .checkpoints
            .as_ref()
            .and_then(|c| c.checkpointing.requested());
        if asked == Some(until) {
            self.complete(worker, source, observer, until, deadline);
        }
    }

    /// Steps until the checkpoint asked for (if any) is whole, or `deadline`.
    fn complete(
        &mut self,
        worker: &mut timely::worker::Worker,
        source: &mut dyn Source,
        observer: &dyn Observer,
        until: Time,
        deadline: Instant,
    ) {
        while self.act(source).is_some() && Instant::now() < deadline {
            worker.step_or_park(PARK);
            if self.me == 0 {
                self.deliver(observer, until);
            }
        }
    }
}

/// The earliest time a probe's operators may still produce.
fn frontier(probe: &ProbeHandle<Time>) -> Time {
    probe.with_frontier(|f| f.first().copied().unwrap_or(Time::MAX))
}

/// How long a worker waiting for the others to end sleeps between steps
/// (their messages wake it sooner): spinning would starve them of the cores.
const PARK: Option<Duration> = Some(Duration::from_millis(1));

/// How the workers end together: a small dataflow of its own, through which
/// each tells every other where its input stopped (round 0) and that it has
/// drained everything before the agreed time (round 1).
struct Ending {
    input: timely::dataflow::InputHandleVec<u32, Time>,
    probe: timely::dataflow::ProbeHandle<u32>,
    heard: Rc<RefCell<Vec<Time>>>,
}

impl Ending {
    fn new(worker: &mut timely::worker::Worker) -> Self {
        let heard = Rc::new(RefCell::new(Vec::new()));
        let h = Rc::clone(&heard);
        let (input, probe) = worker.dataflow::<u32, _, _>(|scope| {
            let (input, stream) = VecInput::new_input(&scope);
            let (probe, _) = stream
                .broadcast()
                .inspect(move |t| h.borrow_mut().push(*t))
                .probe();
            (input, probe)
        });
        Ending {
            input,
            probe,
            heard,
        }
    }

    /// Tells every worker that this one's input stopped at `until`, and
    /// returns the earliest such time of all workers, once all have told.
    fn agree(&mut self, worker: &mut timely::worker::Worker, until: Time) -> Time {
        self.input.send(until);
        self.input.advance_to(1);
        let probe = &self.probe;
        worker.step_or_park_while(PARK, || probe.less_than(&1));
        let heard = self.heard.borrow();
        heard.iter().copied().min().unwrap_or(until)
    }

    /// Waits until every worker has got here (round 1): what one set
    /// before is seen by all after.
    fn all_heard(&mut self, worker: &mut timely::worker::Worker) {
        self.round(worker, 2);
    }

    /// Waits until every worker has drained up to the agreed time: after
    /// that no worker needs this one's dataflow any more.
    fn all_drained(&mut self, worker: &mut timely::worker::Worker) {
        self.round(worker, 3);
    }

    /// Waits until every worker has advanced its input to `to`.
    fn round(&mut self, worker: &mut timely::worker::Worker, to: u32) {
        if *self.input.time() < to {
            self.input.advance_to(to);
        }
        let probe = &self.probe;
        worker.step_or_park_while(PARK, || probe.less_than(&to));
    }
}
