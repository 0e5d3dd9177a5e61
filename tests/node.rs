//! On a node whose Pods really run: a VM reaches `Running` with its launcher Pod Ready on the
//! node, and the claim on a persistent image moves to a waiting VM only after the kubelet has
//! confirmed the old launcher Pod gone, even when that Pod ignores SIGTERM for its whole grace
//! period (a guest that does not shut down). The waiting VM has the longest name there is (253
//! characters), so its Pods (launcher and copier) must get names the kubelet can start.
//!
//! Needs a schedulable node (skipped, saying so, on a cluster without one). The SIGTERM part
//! stops the launcher's process with SIGSTOP from this machine, so it runs on the local cluster
//! only, where the node's processes are this machine's.

mod support;

use std::time::{Duration, Instant};

use kube::ResourceExt;
use support::{env::*, *};
use vmkeep::{
    api::virtual_machine::VirtualMachinePhase,
    plan::{conditions::find as condition, names},
};

const LONG: Duration = Duration::from_secs(90);

const SCENARIO: &str = r#"
apiVersion: vmkeep.io/v1alpha1
kind: Image
metadata: {name: data}
spec: {persistent: true, size: 1Gi, source: {blank: {}}}
---
apiVersion: vmkeep.io/v1alpha1
kind: Image
metadata: {name: scratch}
spec: {size: 64Mi, source: {blank: {}}}
---
apiVersion: vmkeep.io/v1alpha1
kind: Template
metadata: {name: t}
spec:
  cpu: 1
  memory: 128Mi
  launcher: {terminationGracePeriodSeconds: 20}
  disks: [{name: data, image: data}, {name: scratch, image: scratch}]
---
apiVersion: vmkeep.io/v1alpha1
kind: VirtualMachine
metadata: {name: a}
spec: {templateRef: {name: t}}
"#;

/// The waiting VM: `b-longlong...`, 253 characters. Its Pods' names shortened to what the
/// kubelet can start (the namespace and the Pod name together at most 217 characters: the
/// kubelet's log folder `<namespace>_<pod>_<uid>` has at most 255 bytes); a Pod of a longer name
/// is valid but never starts.
fn waiter() -> (String, String) {
    let mut name = "b-".to_owned();
    while name.len() < 253 {
        name.push_str("long");
    }
    name.truncate(253);
    let yaml = format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{templateRef: {{name: t}}, onImageConflict: Wait}}\n"
    );
    (name, yaml)
}

/// The uid of the VM holding the claim on image `data`, if any.
async fn holder(env: &Env) -> Option<String> {
    env.claim("data").await?.spec?.holder_identity
}

/// The host pid of the `vmkeep launch` process of the Pod with `uid` (the kubelet's cgroupfs
/// layout names each Pod's cgroup `pod<uid>`).
fn launcher_pid(uid: &str) -> Option<u32> {
    let needle = format!("pod{uid}");
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        (cgroup.contains(&needle) && args.get(1) == Some(&&b"launch"[..])).then_some(pid)
    })
}

#[tokio::test]
async fn a_claim_moves_only_after_the_kubelet_confirms_the_launcher_gone() {
    let Some(node) = schedulable_node() else {
        eprintln!("skipped: the cluster has no schedulable node (Pods would never run)");
        return;
    };
    let env = Env::new("node-fencing").await;
    let ns = &env.ns;

    let applied = Instant::now();
    apply(ns, SCENARIO);
    wait_for("VirtualMachine a to run", LONG, async || {
        (env.vm_phase("a").await == Some(VirtualMachinePhase::Running)).then_some(())
    })
    .await;
    eprintln!("apply -> VM a Running: {:.1} s", applied.elapsed().as_secs_f64());
    let launcher = env.pod(&names::launcher_pod(&env.ns.name, "a")).await.expect("a's launcher Pod");
    let spec = launcher.spec.clone().expect("spec");
    assert_eq!(spec.node_name.as_deref(), Some(node.as_str()), "the launcher runs on the node");
    let log = kubectl_ok(&["logs", "-n", &ns.name, &names::launcher_pod(&env.ns.name, "a")], None);
    assert!(log.contains("vmkeep-launcher: accelerator="), "the launcher's log (kubectl logs):\n{log}");
    let a_uid = env.vm("a").await.expect("a").uid().expect("uid");

    let (b_name, waiter) = waiter();
    apply(ns, &waiter);
    let b = wait_for("VirtualMachine b to wait for the image", LONG, async || {
        let vm = env.vm(&b_name).await?;
        let conditions = &vm.status.as_ref()?.conditions;
        (condition(conditions, "ImagesClaimed")?.reason == "WaitingForImage").then_some(vm)
    })
    .await;
    let b_uid = b.uid().expect("uid");
    assert_eq!(holder(&env).await.as_deref(), Some(a_uid.as_str()));

    if !is_local_cluster() {
        eprintln!("skipped the SIGTERM part: it stops the launcher's process, which only the local node allows");
        return;
    }
    // The launcher ignores SIGTERM from now on: the kubelet waits the grace period, then kills it.
    let uid = launcher.uid().expect("pod uid");
    let pid = launcher_pid(&uid).expect("the launcher's process on this machine");
    let stopped = std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().expect("kill");
    assert!(stopped.success(), "kill -STOP {pid}");
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);

    let deleted = Instant::now();
    env.delete_vm("a").await;
    let mut terminating_seen = None;
    let mut gone_at = None;
    let moved_at = wait_for("the claim to move to b", Duration::from_secs(grace as u64 + 90), async || {
        // Read the claim first: once it names b, a's launcher must already be gone.
        let holder = holder(&env).await;
        let pod = env.pod(&names::launcher_pod(&env.ns.name, "a")).await;
        match (&holder, &pod) {
            (Some(h), Some(pod)) if *h == b_uid => {
                panic!("the claim moved to b while a's launcher Pod still exists: {:?}", pod.metadata)
            }
            (_, Some(pod)) if pod.metadata.deletion_timestamp.is_some() => {
                terminating_seen.get_or_insert(deleted.elapsed());
            }
            (_, None) => {
                gone_at.get_or_insert(deleted.elapsed());
            }
            _ => {}
        }
        (holder.as_deref() == Some(b_uid.as_str())).then(|| deleted.elapsed())
    })
    .await;
    let gone_at = gone_at.expect("a's launcher Pod was seen gone before the claim moved");
    assert!(terminating_seen.is_some(), "a's launcher Pod was never seen Terminating");
    // The kubelet waited for the process (SIGTERM ignored) until the grace period ended.
    assert!(
        gone_at >= Duration::from_secs(grace as u64 - 2),
        "a's launcher Pod was gone after {gone_at:?}, before its grace period of {grace} s"
    );
    eprintln!(
        "a deleted: launcher Terminating for {:.1} s (grace {grace} s, SIGTERM ignored), claim to b {:.1} s after it was gone",
        gone_at.as_secs_f64(),
        (moved_at - gone_at).as_secs_f64()
    );
    wait_for("VirtualMachine b to run", LONG, async || {
        (env.vm_phase(&b_name).await == Some(VirtualMachinePhase::Running)).then_some(())
    })
    .await;
    // Its Pods ran under names that fit: the launcher's is the one the status names.
    let b_pod = names::launcher_pod(&ns.name, &b_name);
    assert!(ns.name.len() + b_pod.len() <= 217, "{} + {b_pod}", ns.name);
    let b_vm = env.vm(&b_name).await.expect("b");
    assert_eq!(b_vm.status.and_then(|s| s.launcher_pod), Some(b_pod.clone()));
    assert!(env.pod(&b_pod).await.is_some(), "b's launcher Pod {b_pod}");
    kubectl_ok(&["delete", "virtualmachines.vmkeep.io", &b_name, "-n", &ns.name, "--timeout=90s"], None);
    kubectl_ok(&["delete", "images,templates", "--all", "-n", &ns.name, "--timeout=90s"], None);
}
