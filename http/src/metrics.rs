//! Responses counted by status class, for `grabflow_http_responses_total`
//! (the 5xx rate alert): a middleware both HTTP sides can wear.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The status classes counted, as Prometheus labels.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Responses sent, by status class. Cheap to clone (shared counters).
#[derive(Clone, Default)]
pub struct Responses(Arc<[AtomicU64; 5]>);

impl Responses {
    /// Counts one response of status `code`.
    pub fn record(&self, code: u16) {
        let class = usize::from(code / 100).clamp(1, 5) - 1;
        self.0[class].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts, by class, in the order of [`CLASSES`].
    pub fn counts(&self) -> [(&'static str, u64); 5] {
        std::array::from_fn(|i| (CLASSES[i], self.0[i].load(Ordering::Relaxed)))
    }
}

/// The middleware: counts each response's status class (a stream counts
/// once, when its head is sent).
pub async fn count(State(responses): State<Responses>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    responses.record(response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_in_their_class() {
        let r = Responses::default();
        for code in [200, 202, 404, 429, 500, 503, 503, 101] {
            r.record(code);
        }
        assert_eq!(
            r.counts(),
            [("1xx", 1), ("2xx", 2), ("3xx", 0), ("4xx", 2), ("5xx", 3)]
        );
    }
}
