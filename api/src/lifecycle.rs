//! One handle for every background thread grabflow starts: a name, a way
//! to ask it to stop, and a join that reports a panic instead of hiding it.
//!
//! A thread's body gets a [`Stop`] to check; [`Thread::stop`] sets it and
//! [`Thread::join`] waits. A panic inside the body is caught at the join
//! and returned as [`Panicked`] with the thread's name and message, so the
//! process can log it and exit non-zero.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Asked of a thread's body to end (shared with its [`Thread`]).
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Asks the thread to end.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the thread was asked to end.
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A background thread of grabflow's.
#[derive(Debug)]
pub struct Thread {
    name: String,
    stop: Stop,
    handle: JoinHandle<()>,
}

/// A background thread panicked.
#[derive(Debug, thiserror::Error)]
#[error("thread {name} panicked: {message}")]
pub struct Panicked {
    /// The thread's name.
    pub name: String,
    /// The panic's message.
    pub message: String,
}

impl Thread {
    /// Starts `body` on a thread named `name`, handing it its [`Stop`].
    pub fn spawn(name: &str, body: impl FnOnce(Stop) + Send + 'static) -> std::io::Result<Thread> {
        let stop = Stop::default();
        let theirs = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(theirs))?;
        Ok(Thread {
            name: name.to_string(),
            stop,
            handle,
        })
    }

    /// Takes over a thread started elsewhere, which ends when `stop` is set.
    pub fn adopt(name: &str, handle: JoinHandle<()>, stop: Stop) -> Thread {
        Thread {
            name: name.to_string(),
            stop,
            handle,
        }
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What its body checks to end.
    pub fn stopper(&self) -> Stop {
        self.stop.clone()
    }

    /// Asks the thread to end (it may take a moment: see [`Thread::join`]).
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Whether the thread has ended (returned or panicked).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the thread to end; its panic, if it panicked.
    pub fn join(self) -> Result<(), Panicked> {
        self.handle.join().map_err(|payload| Panicked {
            message: payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into()),
            name: self.name,
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop_and_join(self) -> Result<(), Panicked> {
        self.stop();
        self.join()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_thread_ends_and_a_panic_is_reported_with_its_name() {
        let t = Thread::spawn("looping", |stop| {
            while !stop.stopped() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
        .unwrap();
        assert!(!t.is_finished());
        t.stop_and_join().unwrap();
        let t = Thread::spawn("failing", |_| panic!("boom {}", 42)).unwrap();
        let e = t.join().unwrap_err();
        assert_eq!(
            (e.name.as_str(), e.message.as_str()),
            ("failing", "boom 42")
        );
    }
}
