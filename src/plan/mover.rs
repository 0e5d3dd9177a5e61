//! Helper Pods that move data (copiers of clones, importers and size probes of images) as the
//! plans see them: running (and why an attempt failed), done (their result), failed for good,
//! or not vmkeep's. They report through their container's termination message.

use k8s_openapi::api::core::v1::ContainerStateTerminated;

use super::{
    cached::CachedPod,
    virtual_machine::{unschedulable, waiting_reason},
};

/// A helper Pod's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoverState {
    /// At work; `note` is why its last attempt failed, or why it waits, if it does.
    Running { note: Option<String> },
    /// Done: its result (a copy's or import's digest, a probe's size).
    Done(String),
    /// Failed for good (the Pod's phase is `Failed`): why, in the helper's words when it said.
    Failed(String),
    /// A Pod with the helper's name that is not vmkeep's for this owner.
    Foreign,
}

impl MoverState {
    /// The state of helper Pod `pod` (`ours`: controlled by the owner that wants it) from its
    /// `container`'s termination message, read by `parse` (`Ok(result)` or `Err(why)`).
    pub fn of(pod: &CachedPod, ours: bool, container: &str, parse: fn(&str) -> Option<Result<String, String>>) -> Self {
        if !ours {
            return MoverState::Foreign;
        }
        let status = pod.status.as_ref();
        let container = status.and_then(|s| s.container_statuses.as_ref()?.iter().find(|c| c.name == container));
        let message = |t: Option<&ContainerStateTerminated>| t.and_then(|t| t.message.as_deref()).and_then(parse);
        let now = message(container.and_then(|c| c.state.as_ref()?.terminated.as_ref()));
        let last_state = container.and_then(|c| c.last_state.as_ref()?.terminated.as_ref());
        // Why the last attempt failed: the helper's own words, else the exit code; then why the
        // container waits (back-off, an image that cannot be pulled).
        let failed = message(last_state).and_then(Result::err).or_else(|| {
            last_state.map(|t| {
                format!(
                    "exit code {}{}",
                    t.exit_code,
                    t.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                )
            })
        });
        let waiting = container
            .and_then(waiting_reason)
            .or_else(|| unschedulable(pod).map(|u| format!("the Pod cannot be scheduled ({u})")));
        let note = match (failed, waiting) {
            (Some(f), Some(w)) => Some(format!("{f}; {w}")),
            (f, w) => f.or(w),
        };
        match (status.and_then(|s| s.phase.as_deref()), now) {
            (Some("Succeeded"), Some(Ok(result))) => MoverState::Done(result),
            // A helper that ended for good with a failure it reported (an importer's terminal
            // failure exits 0, so that the kubelet does not retry it).
            (Some("Succeeded"), Some(Err(why))) => MoverState::Failed(why),
            (Some("Failed"), result) => MoverState::Failed(match result {
                Some(Err(why)) => why,
                _ => "the Pod failed".into(),
            }),
            _ => MoverState::Running { note },
        }
    }

    /// The state of a copier Pod (`vmkeep copy`; its result is the digest copied).
    pub fn of_copier(pod: &CachedPod, ours: bool) -> Self {
        Self::of(pod, ours, super::build::COPIER_CONTAINER, crate::mover::copy::parse_result)
    }
}
