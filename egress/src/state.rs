//! What the egress routes share: the view, the token secret, the
//! dataflow's figures, the ops console's feed.

use crate::ops::OpsHub;
use crate::view::Egress;
use grabflow_dataflow::stats::DataflowStats;
use grabflow_http::auth::{HasSecret, Secret};
use grabflow_http::metrics::Responses;
use std::path::PathBuf;
use std::sync::Arc;

/// The egress state handed to the routes.
#[derive(Clone)]
pub struct EgressState {
    /// The live view.
    pub egress: Arc<Egress>,
    /// Verifies tokens.
    pub secret: Secret,
    /// Per-operator figures from timely's logging.
    pub stats: DataflowStats,
    /// The ops console's live feed (`/v1/ops/stream`); [`crate::ops::Tapped`]
    /// feeds it from the dataflow's decisions.
    pub ops: Arc<OpsHub>,
    /// Responses by status class, counted by the service's middleware
    /// (`grabflow_http_responses_total`).
    pub responses: Responses,
    /// The data dir, whose size `/metrics` reports
    /// (`grabflow_data_dir_bytes`).
    pub data_dir: Option<PathBuf>,
}

impl EgressState {
    /// The state of a view, with a new ops feed and response counters and
    /// no data dir.
    pub fn new(egress: Arc<Egress>, secret: Secret, stats: DataflowStats) -> EgressState {
        EgressState {
            egress,
            secret,
            stats,
            ops: Arc::default(),
            responses: Responses::default(),
            data_dir: None,
        }
    }
}

impl HasSecret for EgressState {
    fn secret(&self) -> &Secret {
        &self.secret
    }
}
