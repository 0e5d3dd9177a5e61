//! Every API write vmkeep makes goes through [`Writes::send`]: bounded by a timeout (a write the
//! API server does not answer fails the reconcile, which is retried, instead of holding a worker
//! for ever) and counted in `vmkeep_api_writes` by resource, verb and outcome.

use std::{sync::Arc, time::Duration};

use crate::metrics::{Metrics, WriteLabels};

/// How long one write may take before it counts as failed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server answered with an error.
    #[error("{verb} {resource}: {source}")]
    Api {
        resource: &'static str,
        verb: &'static str,
        #[source]
        source: kube::Error,
    },
    /// The API server did not answer in time.
    #[error("{verb} {resource}: no answer within {WRITE_TIMEOUT:?}")]
    Timeout { resource: &'static str, verb: &'static str },
}

impl Error {
    /// The HTTP status of an API error (409 Conflict, 404 Not Found, ...).
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Api { source: kube::Error::Api(e), .. } => Some(e.code),
            _ => None,
        }
    }
}

/// The outcome label of a write: `ok`, `conflict` (409), `not_found` (404), `invalid` (422),
/// `error` (any other failure) or `timeout`.
fn outcome<T>(result: &Result<Result<T, kube::Error>, tokio::time::error::Elapsed>) -> &'static str {
    match result {
        Ok(Ok(_)) => "ok",
        Ok(Err(kube::Error::Api(e))) if e.code == 409 => "conflict",
        Ok(Err(kube::Error::Api(e))) if e.code == 404 => "not_found",
        Ok(Err(kube::Error::Api(e))) if e.code == 422 => "invalid",
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    }
}

/// Sends writes with a timeout and counts them (see the module).
#[derive(Clone)]
pub struct Writes {
    metrics: Arc<Metrics>,
    timeout: Duration,
}

impl Writes {
    /// Writes counted in `metrics`, each bounded by [`WRITE_TIMEOUT`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, timeout: WRITE_TIMEOUT }
    }

    /// Sends one write of `verb` to `resource`, bounded and counted.
    pub async fn send<T>(
        &self,
        resource: &'static str,
        verb: &'static str,
        write: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        let result = tokio::time::timeout(self.timeout, write).await;
        let labels = WriteLabels { resource, verb, outcome: outcome(&result) };
        self.metrics.api_writes.get_or_create(&labels).inc();
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(Error::Api { resource, verb, source }),
            Err(_) => Err(Error::Timeout { resource, verb }),
        }
    }
}
