//! Conditions computed from the previous ones: `lastTransitionTime` moves only when `status`
//! changes, so a converged object re-reconciled computes exactly the status it already has.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Condition, ConditionStatus};

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
