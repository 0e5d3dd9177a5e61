//! What the tests whose VMs really run on the local node share: the boot deadline, why they
//! are skipped elsewhere, and the launcher's log (the guest's serial console).

use std::time::Duration;

use vmkeep::plan::names;

use super::{env::Env, is_local_cluster, kubectl, schedulable_node};

/// How long a VM may take to boot its guest under TCG on this 2-CPU machine.
pub const BOOT: Duration = Duration::from_secs(90);

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<&'static str> {
    if !is_local_cluster() {
        return Some("the test needs this machine (host-path volumes, a local HTTP server): local cluster only");
    }
    if schedulable_node().is_none() {
        return Some("the cluster has no schedulable node (Pods would never run)");
    }
    None
}

/// The launcher's log (what `kubectl logs` shows), or an empty string.
pub fn log(env: &Env, vm: &str) -> String {
    let out = kubectl(&["logs", "-n", &env.ns.name, &names::launcher_pod(&env.ns.name, vm), "-c", "launcher"], None);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the launcher's log shows `line`; returns the log.
pub async fn wait_log(env: &Env, vm: &str, line: &str, timeout: Duration) -> String {
    let mut last = String::new();
    let found = tokio::time::timeout(timeout, async {
        loop {
            last = log(env, vm);
            if last.contains(line) {
                return last.clone();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no '{line}' in the log of {vm}'s launcher within {timeout:?}:\n{last}"))
}
