//! What the egress routes share: the view, the token secret, the
//! dataflow's figures.

use crate::view::Egress;
use grabflow_dataflow::stats::DataflowStats;
use grabflow_http::auth::{HasSecret, Secret};
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
}

impl HasSecret for EgressState {
    fn secret(&self) -> &Secret {
        &self.secret
    }
}
