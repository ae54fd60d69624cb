//! Repeated identical warnings, rate-limited: a full disk fails every
//! commit, and one line per commit would drown the log.

use std::time::{Duration, Instant};

/// Lets one report through per `every`, counting the ones held back.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// At most one report per `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// Whether to report now, with how many were held back since the last
    /// report; `None` holds this one back too.
    pub fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + self.every) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_per_period_with_the_count_held_back() {
        let mut t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.admit(), Some(0));
        assert_eq!((t.admit(), t.admit()), (None, None));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.admit(), Some(2));
        assert_eq!(t.admit(), None);
    }
}
