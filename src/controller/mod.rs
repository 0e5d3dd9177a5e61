//! The controllers: one module per kind (observe -> plan -> apply -> status), and the
//! [`Context`] they share.

use std::sync::Arc;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
}

/// Runs every controller until `shutdown` is cancelled, then lets in-flight reconciles finish.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    // The Image, Template and VirtualMachine controllers join here (issue #3); until then the
    // operator only waits for its CRDs and serves health and metrics.
    let _ = &ctx;
    shutdown.cancelled().await;
}
