//! Conditions computed from the previous ones: `lastTransitionTime` moves only when `status`
//! changes, so a converged object re-reconciled computes exactly the status it already has.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Condition, ConditionStatus};
use crate::plan::reason;

/// Condition type of every kind: True when the object is what its spec asks for (a `Halted` VM
/// that is `Stopped` is Ready).
pub const READY: &str = "Ready";
/// Condition type of every kind (kstatus, read by Flux and Argo CD): True while the object is on
/// its way to what its spec asks for; its reason and message are the `Ready` condition's.
pub const RECONCILING: &str = "Reconciling";
/// Condition type of every kind (kstatus): True when the object cannot get to what its spec asks
/// for without a change of that spec (a `Rejected` or `Failed` VM, an `Error` image, a Template
/// that can never work).
pub const STALLED: &str = "Stalled";

/// A condition as a decision: everything but the timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub r#type: String,
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(r#type: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        let status = if status { ConditionStatus::True } else { ConditionStatus::False };
        Self { r#type: r#type.to_owned(), status, reason: reason.to_owned(), message: message.into() }
    }
}

impl From<&Condition> for Cond {
    fn from(c: &Condition) -> Self {
        Self { r#type: c.r#type.clone(), status: c.status, reason: c.reason.clone(), message: c.message.clone() }
    }
}

/// Where an object stands for GitOps tools (the kstatus conventions: `observedGeneration`,
/// `Reconciling`, `Stalled`; see docs/gitops.md).
#[derive(Clone, Copy, Debug)]
pub enum Health<'a> {
    /// What the spec asks for: neither Reconciling nor Stalled.
    Converged,
    /// On its way; the condition says why it is not there yet.
    Reconciling(&'a Cond),
    /// Cannot get there without a spec change; the condition says why.
    Stalled(&'a Cond),
}

impl Health<'_> {
    /// The `Reconciling` and `Stalled` conditions, both always present (status False when they
    /// do not hold, with reason `Converged`, `Reconciling` or `Stalled` naming what does).
    pub fn conditions(self) -> [Cond; 2] {
        let not = |r#type: &str, why: &str| {
            let message = match why {
                reason::CONVERGED => "the spec is in force",
                RECONCILING => "on its way to what the spec asks for (see Reconciling)",
                _ => "it cannot get there without a change of its spec (see Stalled)",
            };
            Cond::new(r#type, false, why, message)
        };
        let with = |r#type: &str, c: &Cond| Cond::new(r#type, true, &c.reason, c.message.clone());
        match self {
            Health::Converged => [not(RECONCILING, reason::CONVERGED), not(STALLED, reason::CONVERGED)],
            Health::Reconciling(c) => [with(RECONCILING, c), not(STALLED, RECONCILING)],
            Health::Stalled(c) => [not(RECONCILING, STALLED), with(STALLED, c)],
        }
    }

    /// From the `Ready` decision: converged when it holds, else reconciling or `stalled`.
    pub fn of(ready: &Cond, stalled: bool) -> Health<'_> {
        match (ready.status, stalled) {
            (_, true) => Health::Stalled(ready),
            (ConditionStatus::True, false) => Health::Converged,
            _ => Health::Reconciling(ready),
        }
    }
}

/// The conditions to write: `wanted`, in that order, keeping each previous condition's
/// `lastTransitionTime` when its status did not change.
pub fn merge(previous: &[Condition], wanted: Vec<Cond>, generation: Option<i64>, now: &Time) -> Vec<Condition> {
    wanted
        .into_iter()
        .map(|c| {
            let since = previous
                .iter()
                .find(|p| p.r#type == c.r#type && p.status == c.status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            Condition {
                r#type: c.r#type,
                status: c.status,
                reason: c.reason,
                message: c.message,
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect()
}

/// The `Stalled` condition of `now` when it has just become True (or changed its reason): what
/// calls for a Warning Event, once.
pub fn newly_stalled<'a>(previous: &[Condition], now: &'a [Condition]) -> Option<&'a Condition> {
    let stalled = find(now, STALLED).filter(|c| c.status == ConditionStatus::True)?;
    let before = find(previous, STALLED);
    (before.map(|b| (b.status, b.reason.as_str())) != Some((stalled.status, stalled.reason.as_str())))
        .then_some(stalled)
}

/// The condition of a type, if present.
pub fn find<'a>(conditions: &'a [Condition], r#type: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.r#type == r#type)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = merge(&[], vec![Cond::new("Ready", false, "Waiting", "a")], Some(1), &at(10));
        assert_eq!(first[0].last_transition_time, at(10));
        let same = merge(&first, vec![Cond::new("Ready", false, "StillWaiting", "b")], Some(2), &at(20));
        assert_eq!(same[0].last_transition_time, at(10), "same status keeps the time");
        assert_eq!(same[0].reason, "StillWaiting");
        let flipped = merge(&same, vec![Cond::new("Ready", true, "Done", "")], Some(2), &at(30));
        assert_eq!(flipped[0].last_transition_time, at(30));
    }

    #[test]
    fn a_converged_status_is_recomputed_identically() {
        let wanted = || vec![Cond::new("A", true, "X", "m"), Cond::new("B", false, "Y", "n")];
        let once = merge(&[], wanted(), Some(3), &at(1));
        let again = merge(&once, wanted(), Some(3), &at(99));
        assert_eq!(once, again);
    }
}
