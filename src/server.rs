//! The HTTP server loop: axum's router on hyper's HTTP/1 connections, with
//! the limits a public service needs, so a client that only connects
//! cannot take the service down.
//!
//! - **Header and idle time.** A connection has `header_timeout` to send a
//!   request's head, counted from when it opens or finishes its last
//!   response (hyper's header read timeout), so idle keep-alive and
//!   slowloris connections are closed.
//! - **A cap on connections.** At most `max_connections` are served at
//!   once (by default what the open-file limit leaves room for, after the
//!   soft limit is raised to the hard one). A connection over the cap
//!   closes the one that has been quiet longest (gracefully: a request in
//!   flight finishes first), so fresh clients are served while idle ones
//!   hold the slots.
//! - **Accept errors.** Out of file descriptors (`EMFILE`), the loop closes
//!   the quietest connection and tries again; errors are logged at a
//!   bounded rate and never stop the loop.
//!
//! Each request carries its peer's address as `ConnectInfo<SocketAddr>`.
//!
//! Graceful shutdown as `axum::serve` does it: on `shutdown`, stop
//! accepting, let each connection finish its request, then return.

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::Router;
use grabflow_log::throttle::Throttle;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

/// The limits of the server loop.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a connection may take to send a request's head, from when
    /// it opens or its last response ends.
    pub header_timeout: Duration,
}

impl Limits {
    /// Raises the soft open-file limit to the hard one, and returns limits
    /// with `max_connections` (0: as many as the open-file limit leaves
    /// room for, keeping an eighth, at least 64, for the log, the dataflow
    /// and the clients of Kafka and Redis).
    pub fn new(max_connections: usize, header_timeout: Duration) -> Limits {
        let files = rlimit::increase_nofile_limit(u64::MAX)
            .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
            .unwrap_or(1024);
        let room = files.saturating_sub((files / 8).max(64)).max(16) as usize;
        Limits {
            max_connections: if max_connections == 0 {
                room
            } else {
                max_connections
            },
            header_timeout,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`
/// resolves, then lets every connection finish its request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let started = Instant::now();
    let live = Arc::new(Live::default());
    // Every connection holds a clone of `signal_tx`: dropping `signal_rx`
    // asks them to finish; each holds `close_rx`, so `close_tx.closed()`
    // resolves once all have.
    let (signal_tx, signal_rx) = watch::channel(());
    let (close_tx, close_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    let mut errors = Throttle::new(Duration::from_secs(5));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e, &live, &mut errors).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        if live.len() >= limits.max_connections {
            live.evict_quietest();
        }
        let (id, activity, evict) = live.add(started);
        let io = TokioIo::new(Tracked {
            inner: stream,
            activity,
            started,
        });
        let service =
            TowerToHyperService::new(router.clone().map_request(move |req: Request<Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            }));
        let (signal_tx, close_rx, live) = (signal_tx.clone(), close_rx.clone(), Arc::clone(&live));
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, service)
                .with_upgrades();
            let mut conn = pin!(conn);
            let mut ending = pin!(signal_tx.closed());
            // Asked to close (shutdown, or evicted): the request in flight
            // finishes, then the connection ends.
            let mut asked = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = &mut ending, if !asked => {
                        asked = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = evict.notified(), if !asked => {
                        asked = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            live.remove(id);
            drop(close_rx);
        });
    }
    drop(signal_rx);
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
    Ok(())
}

/// An accept that failed: out of descriptors, close the quietest connection
/// and wait a moment; anything else, wait a moment (a reset before accept
/// is nothing). Logged at a bounded rate.
async fn accept_failed(e: &io::Error, live: &Live, errors: &mut Throttle) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    let out_of_files = matches!(e.raw_os_error(), Some(24 | 23)); // EMFILE, ENFILE
    if out_of_files {
        live.evict_quietest();
    }
    if let Some(held) = errors.admit() {
        tracing::error!(
            error = %e,
            connections = live.len(),
            similar_since_last = held,
            "accept failed{}",
            if out_of_files { "; closing the quietest connection" } else { "" }
        );
    }
    tokio::time::sleep(Duration::from_millis(if out_of_files { 5 } else { 50 })).await;
}

/// One connection being served: when it was last active (milliseconds
/// since the server started), and how to ask it to close.
type Conn = (Arc<AtomicU64>, Arc<Notify>);

/// The connections being served.
#[derive(Default)]
struct Live {
    conns: Mutex<HashMap<u64, Conn>>,
    next: AtomicU64,
}

impl Live {
    fn len(&self) -> usize {
        self.conns.lock().expect("connections").len()
    }

    /// A new connection: its id, its activity clock, and its close signal.
    fn add(&self, started: Instant) -> (u64, Arc<AtomicU64>, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(AtomicU64::new(started.elapsed().as_millis() as u64));
        let evict = Arc::new(Notify::new());
        self.conns
            .lock()
            .expect("connections")
            .insert(id, (Arc::clone(&activity), Arc::clone(&evict)));
        (id, activity, evict)
    }

    fn remove(&self, id: u64) {
        self.conns.lock().expect("connections").remove(&id);
    }

    /// Asks the connection quiet the longest to close (and forgets it, so
    /// the next eviction picks another).
    fn evict_quietest(&self) {
        let mut conns = self.conns.lock().expect("connections");
        let quietest = conns
            .iter()
            .min_by_key(|(_, (activity, _))| activity.load(Ordering::Relaxed))
            .map(|(&id, _)| id);
        if let Some((_, evict)) = quietest.and_then(|id| conns.remove(&id)) {
            evict.notify_one();
        }
    }
}

/// A connection's stream, noting when bytes last went either way.
struct Tracked {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    started: Instant,
}

impl Tracked {
    fn touch(&self) {
        self.activity
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
