//! Prometheus metrics, served on `/metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of per-reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// The kind reconciled (`Image`, `Template`, `VirtualMachine`).
    pub kind: &'static str,
}

/// Labels of failed reconciles: the kind and the error's stable reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The kind reconciled.
    pub kind: &'static str,
    /// The error's stable reason (`Conflict`, `ReadFailed`, `WriteFailed`, `WriteTimeout`, ...).
    pub reason: &'static str,
}

/// Labels of objects a watch could not read as their kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MalformedLabels {
    /// The kind watched.
    pub kind: &'static str,
}

/// Labels of API writes made by the operator.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// The resource written (`PersistentVolumeClaim`, `Image` status, ...).
    pub resource: &'static str,
    /// `create`, `patch`, `update` or `delete`.
    pub verb: &'static str,
    /// `ok`, `conflict`, `not_found`, `invalid`, `error` or `timeout`.
    pub outcome: &'static str,
}

/// Labels of admission reviews answered by the webhook.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `Image`, `Template`, `VirtualMachine` (or `other`).
    pub kind: &'static str,
    /// `allowed`, `denied`, or `unchecked` (admitted because it could not be decided in time).
    pub verdict: &'static str,
}

/// Every metric the operator exports, registered once.
pub struct Metrics {
    registry: Registry,
    /// 1 once the CRDs are established and the controllers run.
    pub ready: Gauge,
    /// 1 while this replica runs the controllers (leads, or needs no election).
    pub leader: Gauge,
    /// Reconciles started, by kind.
    pub reconciliations: Family<ReconcileLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub reconcile_duration: Family<ReconcileLabels, Histogram>,
    pub api_writes: Family<WriteLabels, Counter>,
    pub webhook_reviews: Family<ReviewLabels, Counter>,
    /// Objects skipped because they cannot be read as their kind.
    pub malformed: Family<MalformedLabels, Counter>,
    /// Launcher Pod created -> VM Running (QEMU runs the guest), seconds, each start.
    pub launcher_start: Histogram,
    /// Guest restarts in running launchers (the guest powered off or QEMU ended).
    pub launcher_restarts: Counter,
    /// Launcher Pod deleted by vmkeep (Halted, VM deletion, fencing) -> Pod gone, seconds.
    pub launcher_stop: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vmkeep");
        let ready = Gauge::default();
        registry.register("ready", "1 once the CRDs are established and the controllers run", ready.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica runs the controllers", leader.clone());
        let reconciliations = Family::<ReconcileLabels, Counter>::default();
        registry.register("reconciliations", "Reconciles started", reconciliations.clone());
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register("reconcile_failures", "Reconciles that failed, by reason", failures.clone());
        let reconcile_duration = Family::<ReconcileLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
        });
        registry.register("reconcile_duration_seconds", "How long reconciles take", reconcile_duration.clone());
        let api_writes = Family::<WriteLabels, Counter>::default();
        registry.register("api_writes", "Write requests the operator sent to the API server", api_writes.clone());
        let webhook_reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "webhook_reviews",
            "Admission reviews the webhook answered, by verdict",
            webhook_reviews.clone(),
        );
        let malformed = Family::<MalformedLabels, Counter>::default();
        registry.register("malformed_objects", "Watched objects skipped as unreadable, by kind", malformed.clone());
        // Seconds: TCG boots take seconds to tens of seconds; a stop waits up to the grace period.
        let buckets = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
        let launcher_start = Histogram::new(buckets);
        registry.register(
            "launcher_start_seconds",
            "From a launcher Pod's creation until QEMU runs the guest (VM Running)",
            launcher_start.clone(),
        );
        let launcher_restarts = Counter::default();
        registry.register(
            "launcher_restarts",
            "Guests started again in their launcher Pod (powered off or QEMU ended)",
            launcher_restarts.clone(),
        );
        let launcher_stop = Histogram::new(buckets);
        registry.register(
            "launcher_stop_seconds",
            "From vmkeep's deletion of a launcher Pod until the Pod is gone",
            launcher_stop.clone(),
        );
        Self {
            registry,
            ready,
            leader,
            reconciliations,
            failures,
            reconcile_duration,
            api_writes,
            webhook_reviews,
            malformed,
            launcher_start,
            launcher_restarts,
            launcher_stop,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
