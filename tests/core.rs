//! The core behaviour against a real API server: a clone per VM for non-persistent images, one
//! exclusive claim for persistent ones (also racing two operators), fencing, power-off, GitOps
//! order, deferred persistence changes, name conflicts and quiet convergence.

mod support;

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::{
    ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use support::{env::*, *};
use vmkeep::{
    api::{ConditionStatus, Image, VirtualMachine, image::ImagePhase, virtual_machine::VirtualMachinePhase},
    plan::{conditions::find as condition, names},
};

#[tokio::test]
async fn non_persistent_vms_each_get_their_own_clone() {
    let env = Env::new("clones").await;
    let mut yaml = image("base", false) + &template("small", &[("root", Some("base")), ("scratch", None)]);
    for name in ["vm-1", "vm-2", "vm-3"] {
        yaml += &vm(name, "small", "Reject");
    }
    apply(&env.ns, &yaml);

    for name in ["vm-1", "vm-2", "vm-3"] {
        let vm = env.wait_vm(name, VirtualMachinePhase::Starting).await;
        let uid = vm.uid().unwrap();
        let root = env.pvc(&format!("{name}-root")).await.expect("clone PVC");
        assert_clone_of(&root, "base-image");
        assert!(root.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)));
        let scratch = env.pvc(&format!("{name}-scratch")).await.expect("volatile PVC");
        assert!(scratch.spec.as_ref().unwrap().data_source.is_none());
        let pod = env.pod(&format!("{name}-launcher")).await.expect("launcher Pod");
        assert_eq!(pod.labels().get(names::VM_LABEL).map(String::as_str), Some(name));
    }
    let base = env
        .wait_image("base", "used by three VMs", |i| i.status.as_ref().is_some_and(|s| s.running_vms == Some(3)))
        .await;
    assert_eq!(base.status.unwrap().phase, Some(ImagePhase::Used));

    env.delete_vm("vm-2").await;
    env.wait_gone::<VirtualMachine>("vm-2", GC).await;
    for child in ["vm-2-root", "vm-2-scratch"] {
        env.wait_gone::<PersistentVolumeClaim>(child, GC).await;
    }
    env.wait_gone::<Pod>("vm-2-launcher", GC).await;
    for kept in ["vm-1-root", "vm-3-root", "vm-1-scratch", "vm-3-scratch", "base-image"] {
        assert!(env.pvc(kept).await.is_some(), "{kept} was deleted");
    }
    env.wait_image("base", "used by two VMs", |i| i.status.as_ref().is_some_and(|s| s.consumers == ["vm-1", "vm-3"]))
        .await;
}

#[tokio::test]
async fn a_second_claim_on_a_persistent_image_is_rejected() {
    let env = Env::new("reject").await;
    apply(&env.ns, &(image("disk", true) + &template("t", &[("data", Some("disk"))]) + &vm("vm-a", "t", "Reject")));
    env.wait_vm("vm-a", VirtualMachinePhase::Starting).await;
    let held = env
        .wait_image("disk", "claimed by vm-a", |i| {
            i.status.as_ref().is_some_and(|s| s.claimed_by.as_ref().is_some_and(|c| c.name == "vm-a"))
        })
        .await;
    assert_eq!(held.status.unwrap().phase, Some(ImagePhase::UsedPersistent));

    apply(&env.ns, &vm("vm-b", "t", "Reject"));
    let rejected = env.wait_vm("vm-b", VirtualMachinePhase::Rejected).await;
    let status = rejected.status.unwrap();
    let claimed = condition(&status.conditions, "ImagesClaimed").expect("ImagesClaimed");
    assert_eq!(claimed.status, ConditionStatus::False);
    assert_eq!(claimed.reason, "ImageInUse");
    assert_eq!(claimed.message, "image disk is persistent and already in use by VirtualMachine vm-a");
    let events = env.wait_event("ImageInUse", "vm-b").await;
    assert_eq!(events.type_.as_deref(), Some("Warning"));
    assert!(events.note.unwrap_or_default().contains("already in use by VirtualMachine vm-a"));
    assert!(env.pod("vm-b-launcher").await.is_none(), "a rejected VM got a Pod");
    assert!(env.pvc("vm-b-data").await.is_none(), "a rejected VM got a PVC");
    assert_eq!(env.claim_holder("disk").await.as_deref(), Some("vm-a"));

    // Rejected stays Rejected, even once the image is free, until the spec changes.
    env.delete_vm("vm-a").await;
    env.wait_gone::<VirtualMachine>("vm-a", GC).await;
    wait_for("the claim to be released", LONG, async || env.claim_holder("disk").await.is_none().then_some(())).await;
    assert_eq!(env.vm_phase("vm-b").await, Some(VirtualMachinePhase::Rejected));
    apply(&env.ns, &vm("vm-b", "t", "Wait"));
    env.wait_vm("vm-b", VirtualMachinePhase::Starting).await;
    assert_eq!(env.claim_holder("disk").await.as_deref(), Some("vm-b"));
}

#[tokio::test]
async fn a_waiting_vm_takes_the_image_only_after_the_holders_pod_is_gone() {
    let env = Env::new("fence").await;
    apply(&env.ns, &(image("disk", true) + &template("t", &[("data", Some("disk"))]) + &vm("holder", "t", "Reject")));
    env.wait_vm("holder", VirtualMachinePhase::Starting).await;
    apply(&env.ns, &vm("waiter", "t", "Wait"));
    let waiting = env.wait_vm("waiter", VirtualMachinePhase::Pending).await;
    let claimed = waiting.status.unwrap().conditions;
    assert_eq!(condition(&claimed, "ImagesClaimed").unwrap().reason, "WaitingForImage");

    // Hold the holder's launcher Pod with a finalizer of our own: the Pod outlives its deletion.
    let hold = serde_json::json!({"metadata": {"finalizers": ["test.vmkeep.io/hold"]}});
    env.api::<Pod>().patch("holder-launcher", &PatchParams::default(), &Patch::Merge(&hold)).await.expect("hold pod");
    env.delete_vm("holder").await;
    env.wait_vm("holder", VirtualMachinePhase::Terminating).await;
    let pod = wait_for("the launcher Pod to be deleting", LONG, async || {
        env.pod("holder-launcher").await.filter(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    assert!(pod.metadata.deletion_timestamp.is_some());
    // While that Pod exists, the claim stays with the holder and the waiter waits.
    for _ in 0..10 {
        assert_eq!(env.claim_holder("disk").await.as_deref(), Some("holder"), "released before the Pod was gone");
        assert_eq!(env.vm_phase("waiter").await, Some(VirtualMachinePhase::Pending));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    env.api::<Pod>().patch("holder-launcher", &PatchParams::default(), &Patch::Merge(&release)).await.expect("release");
    // The Pod is gone only once its launcher stopped: the guest here (an empty disk) ignores the
    // power button, so that is the full grace period (60 s) after the deletion.
    env.wait_vm_within("waiter", VirtualMachinePhase::Starting, GC).await;
    assert_eq!(env.claim_holder("disk").await.as_deref(), Some("waiter"));
    env.wait_gone::<VirtualMachine>("holder", GC).await;
}

#[tokio::test]
async fn twenty_vms_racing_two_operators_get_exactly_one_holder() {
    let env = Env::new("race").await;
    // A second operator process serving the same namespace at the same time.
    let mut second = Operator::start_with("race-second", &["--namespace", &env.ns.name, "--concurrency", "8"]);
    second.ready().await;
    apply(&env.ns, &(image("disk", true) + &template("t", &[("data", Some("disk")), ("scratch", None)])));
    env.wait_image("disk", "ready", |i| i.status.as_ref().is_some_and(|s| s.phase == Some(ImagePhase::Ready))).await;

    for round in 0..3 {
        let names: Vec<String> = (0..20).map(|i| format!("r{round}-vm-{i:02}")).collect();
        let yaml: String = names.iter().map(|n| vm(n, "t", "Reject")).collect();
        apply(&env.ns, &yaml);
        let phases = wait_for(&format!("round {round}: every VM decided"), LONG, async || {
            let mut phases = Vec::new();
            for name in &names {
                match env.vm_phase(name).await? {
                    VirtualMachinePhase::Running => phases.push((name.clone(), VirtualMachinePhase::Starting)),
                    p @ (VirtualMachinePhase::Starting | VirtualMachinePhase::Rejected) => {
                        phases.push((name.clone(), p))
                    }
                    _ => return None,
                }
            }
            Some(phases)
        })
        .await;
        let holders: Vec<&String> =
            phases.iter().filter(|(_, p)| *p == VirtualMachinePhase::Starting).map(|(n, _)| n).collect();
        assert_eq!(holders.len(), 1, "round {round}: holders {holders:?}");
        assert_eq!(env.claim_holder("disk").await.as_ref(), Some(holders[0]), "round {round}");
        let pods = env.api::<Pod>().list(&ListParams::default().labels(names::MANAGED_SELECTOR)).await.unwrap();
        assert_eq!(pods.items.len(), 1, "round {round}: launcher Pods");

        for name in &names {
            env.delete_vm(name).await;
        }
        // The holder goes once its launcher Pod is gone: on a node, after the kubelet confirms
        // it (the Pod may still be starting when it is deleted).
        for name in &names {
            env.wait_gone::<VirtualMachine>(name, GC).await;
        }
        wait_for("the claim to be released", LONG, async || env.claim_holder("disk").await.is_none().then_some(()))
            .await;
        env.wait_gone::<Pod>(&format!("{}-launcher", holders[0]), GC).await;
    }
    assert!(second.exited().is_none(), "the second operator died:\n{}", second.log_text());
}

#[tokio::test]
async fn halted_removes_the_pod_and_keeps_disks_and_claim() {
    let env = Env::new("halt").await;
    apply(
        &env.ns,
        &(image("os", false)
            + &image("disk", true)
            + &template("t", &[("root", Some("os")), ("data", Some("disk"))])
            + &vm("vm", "t", "Reject")),
    );
    env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    let power = |strategy: &str| serde_json::json!({"spec": {"runStrategy": strategy}});
    env.api::<VirtualMachine>().patch("vm", &PatchParams::default(), &Patch::Merge(&power("Halted"))).await.unwrap();
    env.wait_vm("vm", VirtualMachinePhase::Stopped).await;
    env.wait_gone::<Pod>("vm-launcher", LONG).await;
    assert!(env.pvc("vm-root").await.is_some(), "the clone was deleted on power-off");
    assert_eq!(env.claim_holder("disk").await.as_deref(), Some("vm"), "the claim was released on power-off");

    env.api::<VirtualMachine>().patch("vm", &PatchParams::default(), &Patch::Merge(&power("Always"))).await.unwrap();
    env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    assert!(env.pod("vm-launcher").await.is_some());
}

#[tokio::test]
async fn objects_applied_in_any_order_converge() {
    let env = Env::new("order").await;
    apply(&env.ns, &vm("vm", "t", "Reject"));
    let pending = env.wait_vm("vm", VirtualMachinePhase::Pending).await;
    assert_eq!(condition(&pending.status.unwrap().conditions, "Ready").unwrap().reason, "TemplateNotFound");

    apply(&env.ns, &template("t", &[("root", Some("os"))]));
    wait_for("reason ImageNotFound", LONG, async || {
        let vm = env.vm("vm").await?;
        (condition(&vm.status?.conditions, "Ready")?.reason == "ImageNotFound").then_some(())
    })
    .await;

    apply(&env.ns, &image("os", false));
    env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    assert!(env.pvc("vm-root").await.is_some());
}

#[tokio::test]
async fn persistence_changes_and_deletions_wait_for_the_last_vm() {
    let env = Env::new("defer").await;
    apply(&env.ns, &(image("img", false) + &template("t", &[("root", Some("img"))]) + &vm("vm", "t", "Reject")));
    env.wait_vm("vm", VirtualMachinePhase::Starting).await;

    apply(&env.ns, &image("img", true));
    let deferred = env
        .wait_image("img", "change pending", |i| {
            i.status.as_ref().is_some_and(|s| {
                condition(&s.conditions, "PersistenceChangePending").is_some_and(|c| c.status == ConditionStatus::True)
            })
        })
        .await;
    assert_eq!(deferred.status.unwrap().persistent, Some(false), "applied while in use");

    env.api::<Image>().delete("img", &DeleteParams::default()).await.expect("delete image");
    env.wait_image("img", "Deleting", |i| i.status.as_ref().is_some_and(|s| s.phase == Some(ImagePhase::Deleting)))
        .await;
    assert!(env.pvc("img-image").await.is_some(), "the image PVC went while in use");

    // Once the last VM is gone, the change would apply and the deletion goes ahead.
    env.delete_vm("vm").await;
    env.wait_gone::<VirtualMachine>("vm", GC).await;
    env.wait_gone::<Image>("img", LONG).await;
    env.wait_gone::<PersistentVolumeClaim>("img-image", GC).await;
}

#[tokio::test]
async fn a_persistence_change_applies_when_the_image_is_free() {
    let env = Env::new("persist").await;
    apply(&env.ns, &(image("img", false) + &template("t", &[("root", Some("img"))]) + &vm("vm", "t", "Reject")));
    env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    apply(&env.ns, &image("img", true));
    env.wait_image("img", "change pending", |i| {
        i.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "PersistenceChangePending").is_some_and(|c| c.status == ConditionStatus::True)
        })
    })
    .await;
    env.delete_vm("vm").await;
    let applied = env
        .wait_image("img", "persistent in force", |i| i.status.as_ref().is_some_and(|s| s.persistent == Some(true)))
        .await;
    let status = applied.status.unwrap();
    assert_eq!(condition(&status.conditions, "PersistenceChangePending").unwrap().status, ConditionStatus::False);
    assert_eq!(status.phase, Some(ImagePhase::Ready));
}

#[tokio::test]
async fn a_foreign_pvc_with_the_disk_name_is_left_alone() {
    let env = Env::new("conflict").await;
    let foreign = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: vm-root}\n\
                   spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n";
    apply(&env.ns, foreign);
    let before = env.pvc("vm-root").await.unwrap();
    apply(&env.ns, &(image("os", false) + &template("t", &[("root", Some("os"))]) + &vm("vm", "t", "Reject")));
    let vm = wait_for("reason NameConflict", LONG, async || {
        let vm = env.vm("vm").await?;
        (condition(&vm.status.as_ref()?.conditions, "Ready")?.reason == "NameConflict").then_some(vm)
    })
    .await;
    let message = condition(&vm.status.unwrap().conditions, "Ready").unwrap().message.clone();
    assert!(message.contains("PersistentVolumeClaim vm-root"), "{message}");
    let after = env.pvc("vm-root").await.unwrap();
    assert_eq!(after.owner_references(), before.owner_references(), "vmkeep adopted the PVC");
    // The PV binder and provisioner annotate it meanwhile; any other change would be vmkeep's.
    let own = |p: &PersistentVolumeClaim| -> BTreeMap<String, String> {
        let binder = ["pv.kubernetes.io/", "volume.beta.kubernetes.io/", "volume.kubernetes.io/"];
        p.annotations()
            .iter()
            .filter(|(k, _)| !binder.iter().any(|b| k.starts_with(b)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!((after.labels(), own(&after)), (before.labels(), own(&before)));
    let managers: Vec<_> = after.managed_fields().iter().filter_map(|m| m.manager.clone()).collect();
    assert!(!managers.iter().any(|m| m == names::FIELD_MANAGER), "vmkeep wrote to the PVC: {managers:?}");
    assert!(env.pod("vm-launcher").await.is_none(), "a Pod started without its disk");
}

#[tokio::test]
async fn a_restarted_operator_writes_nothing_to_a_converged_namespace() {
    let mut env = Env::new("quiet").await;
    apply(
        &env.ns,
        &(image("os", false)
            + &image("disk", true)
            + &template("t", &[("root", Some("os")), ("data", Some("disk")), ("scratch", None)])
            + &vm("a", "t", "Reject")),
    );
    env.wait_vm("a", VirtualMachinePhase::Starting).await;
    if schedulable_node().is_some() {
        // On a node the launcher Pod starts (in seconds on a busy node): converged means Running.
        env.wait_vm("a", VirtualMachinePhase::Running).await;
    }
    apply(&env.ns, &(vm("b", "t", "Reject") + &vm("c", "t", "Wait")));
    env.wait_vm("b", VirtualMachinePhase::Rejected).await;
    env.wait_vm("c", VirtualMachinePhase::Pending).await;
    // Converged: the first operator makes no more writes.
    let settled = wait_for("the first operator to settle", LONG, async || {
        let before = env.operator.counter("api_writes", "");
        tokio::time::sleep(Duration::from_secs(2)).await;
        (env.operator.counter("api_writes", "") == before).then_some(before)
    })
    .await;
    assert!(settled > 0);

    env.operator.terminate();
    wait_for("the first operator to exit", LONG, async || env.operator.exited()).await;
    let mut restarted = Operator::for_namespace("quiet-restarted", &env.ns.name);
    restarted.ready().await;
    // Every object is reconciled again (6 objects), and nothing is written.
    wait_for("the restarted operator to reconcile everything", LONG, async || {
        (restarted.counter("reconciliations", "") >= 6).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = restarted.counter("api_writes", "");
    assert_eq!(writes, 0, "writes after a restart:\n{}", restarted.log_text());
    // The restarted operator serves the cleanup (the VMs' finalizers need one), else the
    // namespace stays Terminating for ever.
    env.operator = restarted;
}

#[tokio::test]
async fn api_writes_per_vm_stay_within_budget() {
    let env = Env::new("writes").await;
    apply(
        &env.ns,
        &(image("os", false) + &image("disk", true) + &template("t", &[("root", Some("os")), ("data", Some("disk"))])),
    );
    for name in ["os", "disk"] {
        env.wait_image(name, "ready", |i| i.status.as_ref().is_some_and(|s| s.phase == Some(ImagePhase::Ready))).await;
    }
    let settle = async || {
        wait_for("the operator to settle", LONG, async || {
            let before = env.operator.counter("api_writes", "");
            tokio::time::sleep(Duration::from_secs(2)).await;
            (env.operator.counter("api_writes", "") == before).then_some(())
        })
        .await
    };
    settle().await;
    let count = |resource: &str| env.operator.counter("api_writes", &format!("resource=\"{resource}\""));
    let kinds = ["VirtualMachine", "PersistentVolumeClaim", "Pod", "Lease", "Image", "Template", "Event"];
    let before: Vec<u64> = kinds.iter().map(|k| count(k)).collect();
    apply(&env.ns, &vm("vm", "t", "Reject"));
    env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    settle().await;
    let spent: Vec<(&str, u64)> = kinds.iter().zip(&before).map(|(k, b)| (*k, count(k) - b)).collect();
    eprintln!("API writes for one VM with one clone and one persistent disk: {spent:?}");
    // The VM's own writes: its PVC, finalizer, claim, Pod, and two status writes (Starting,
    // then the clone's PVC Bound): the issue-6 budget (PVCs + 4) is one less; see
    // docs/performance.md.
    let own: u64 = spent
        .iter()
        .filter(|(k, _)| ["VirtualMachine", "PersistentVolumeClaim", "Pod", "Lease"].contains(k))
        .map(|(_, n)| n)
        .sum();
    // On a cluster whose Pods run, two more: the node it was scheduled to (status.nodeName),
    // then Running; and up to two for what scheduling shows on this busy 2-CPU node (the
    // copier's or launcher's Pod "cannot be scheduled" while other tests' launchers hold the
    // CPUs, then scheduled). The benchmark measures the undisturbed path (docs/performance.md).
    let running = 4 * u64::from(env.vm_phase("vm").await == Some(VirtualMachinePhase::Running));
    // Where the storage cannot clone, four more for the copy: the copier Pod's create and
    // delete, the digest on the PVC, and the status while copying (docs/clones.md).
    let root = env.pvc(&names::vm_disk_pvc("vm", "root")).await.expect("the clone");
    let copies = if assert_clone_of(&root, &names::image_pvc("os")) == "copy" { 4 } else { 0 };
    assert!(own <= 1 + 5 + running + copies, "{own} writes for one VM: {spent:?}");
    // Plus the images' and the template's status (users, claim holder, instances).
    let all: u64 = spent.iter().map(|(_, n)| n).sum();
    assert!(all <= 6 + 4 + running + copies, "{all} writes in all: {spent:?}");
}

#[tokio::test]
async fn a_malformed_object_is_skipped_and_reported_without_stalling_the_others() {
    let env = Env::new("malformed").await;
    // The API server accepts a cpu count beyond 32 bits; vmkeep cannot read it as a Template.
    let broken = "apiVersion: vmkeep.io/v1alpha1\nkind: Template\nmetadata: {name: broken}\n\
                  spec: {cpu: 3000000000, memory: 1Gi, disks: []}\n---\n";
    apply(&env.ns, &(broken.to_owned() + &image("os", false) + &template("t", &[("root", Some("os"))])));
    apply(&env.ns, &vm("vm", "t", "Reject"));
    // The others flow: the VM starts, the readable Template has its status.
    env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    let event = env.wait_event("Malformed", "broken").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.note.unwrap_or_default().contains("cannot read this Template"));
    assert!(env.operator.counter("malformed_objects", "kind=\"Template\"") >= 1);
    // Fixed, it is read again.
    apply(&env.ns, &template("broken", &[]));
    wait_for("the fixed Template to get a status", LONG, async || {
        let t = env.api::<vmkeep::api::Template>().get("broken").await.ok()?;
        t.status.map(|_| ())
    })
    .await;
}
