//! The claim and deletion faults of issue 16, each kept as a test against a real API server.
//! The racy ones run ten rounds or more. Where a launcher Pod must behave as on a real node, a
//! [`FakeNode`] binds it to a Node object (so its deletion is graceful: it stays Terminating)
//! and the test, playing the kubelet, says when it is really gone.

mod support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use support::{
    env::{template_with, *},
    *,
};
use vmkeep::{
    api::{ConditionStatus, Image, Template, VirtualMachine, image::ImagePhase, virtual_machine::VirtualMachinePhase},
    plan::{conditions::find as condition, names},
};

/// The Node launcher Pods are bound to; no kubelet runs behind it.
const NODE: &str = "vmkeep-test-node";
/// Its label, which the tests' Templates select, so that on a cluster with a real node the
/// scheduler never places a launcher Pod there instead.
const NODE_LABEL: &str = "vmkeep-test/node";

/// A template (see [`template`]) whose launcher Pods only the fake node may take.
fn template(name: &str, disks: &[(&str, Option<&str>)]) -> String {
    template_with(name, disks, &format!("launcher: {{nodeSelector: {{{NODE_LABEL}: fake}}}}, "))
}

/// A VirtualMachine with a run strategy.
fn vm_run(name: &str, template: &str, on_conflict: &str, run: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{templateRef: {{name: {template}}}, onImageConflict: {on_conflict}, runStrategy: {run}}}\n---\n"
    )
}

/// Plays kube-scheduler for the launcher Pods of one namespace: binds each to [`NODE`], so that
/// a deleted Pod stays Terminating until [`kubelet_confirms`]. Meanwhile it watches that no two
/// Pods ever use the same PVC of a persistent image (`<image>-image`).
struct FakeNode {
    task: tokio::task::JoinHandle<()>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl FakeNode {
    /// Creates the Node (if needed) and starts binding and watching the Pods of `namespace`.
    fn run(client: Client, namespace: &str) -> Self {
        FAKE_NODE_USERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let node = format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}, labels: {{{NODE_LABEL}: fake}}}}\n");
        kubectl_ok(&["apply", "-f", "-"], Some(&node));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let seen = violations.clone();
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let task = tokio::spawn(async move {
            loop {
                if let Ok(list) = pods.list(&ListParams::default().labels(names::MANAGED_SELECTOR)).await {
                    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for pod in &list.items {
                        let spec = pod.spec.as_ref();
                        for v in spec.and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
                            if let Some(pvc) = &v.persistent_volume_claim
                                && pvc.claim_name.ends_with("-image")
                            {
                                users.entry(pvc.claim_name.clone()).or_default().push(pod.name_any());
                            }
                        }
                        if spec.is_some_and(|s| s.node_name.is_none()) && pod.metadata.deletion_timestamp.is_none() {
                            let binding = serde_json::json!({
                                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.name_any()},
                                "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
                            });
                            let _ = pods
                                .create_subresource::<_, serde_json::Value>(
                                    "binding",
                                    &pod.name_any(),
                                    &PostParams::default(),
                                    &binding,
                                )
                                .await;
                        }
                    }
                    for (pvc, pods) in users.into_iter().filter(|(_, p)| p.len() > 1) {
                        seen.lock().unwrap().push(format!("{pvc} used by {pods:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { task, violations }
    }

    /// Panics if two Pods ever used the same persistent PVC.
    fn assert_never_shared(&self) {
        let violations = self.violations.lock().unwrap();
        assert!(violations.is_empty(), "two Pods used one persistent PVC: {violations:?}");
    }
}

/// How many tests use the fake Node now: the last one to finish deletes it (a NotReady Node
/// left behind would show in every later `0/N nodes are available`).
static FAKE_NODE_USERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
        if FAKE_NODE_USERS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            let _ = kubectl(&["delete", "node", NODE, "--wait=false"], None);
        }
    }
}

/// Waits until `pod` is bound to the fake node.
async fn wait_bound(env: &Env, pod: &str) {
    wait_for(&format!("Pod {pod} bound to {NODE}"), LONG, async || {
        env.pod(pod).await?.spec?.node_name.filter(|n| n == NODE).map(|_| ())
    })
    .await;
}

/// Waits until `pod` is Terminating (deleted, but not gone: its node has not confirmed).
async fn wait_terminating(env: &Env, pod: &str) {
    wait_for(&format!("Pod {pod} Terminating"), LONG, async || {
        env.pod(pod).await?.metadata.deletion_timestamp.map(|_| ())
    })
    .await;
}

/// Plays the kubelet: the Pod's containers stopped, it is removed for good.
async fn kubelet_confirms(env: &Env, pod: &str) {
    let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    match env.api::<Pod>().delete(pod, &now).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("cannot remove Pod {pod}: {e}"),
    }
    env.wait_gone::<Pod>(pod, LONG).await;
}

/// The Ready reason of a VM.
async fn ready_reason(env: &Env, name: &str) -> Option<String> {
    let vm = env.vm(name).await?;
    Some(condition(&vm.status?.conditions, "Ready")?.reason.clone())
}

/// Deletes `name` in the test's namespace with kubectl and `--cascade=<cascade>`, not waiting.
fn delete_with(env: &Env, kind: &str, name: &str, cascade: &str) {
    kubectl_ok(&["delete", kind, name, "-n", &env.ns.name, &format!("--cascade={cascade}"), "--wait=false"], None);
}

/// Round `round`'s VM `h<round>` holding the image of Template `t`, its launcher Pod bound to
/// the fake node, and `w<round>` waiting for the image: `(holder, waiter, holder's Pod)`.
async fn holder_and_waiter(env: &Env, round: usize) -> (String, String, String) {
    let (holder, waiter) = (format!("h{round}"), format!("w{round}"));
    apply(&env.ns, &vm(&holder, "t", "Reject"));
    env.wait_vm(&holder, VirtualMachinePhase::Starting).await;
    let pod = names::launcher_pod(&env.ns.name, &holder);
    wait_bound(env, &pod).await;
    apply(&env.ns, &vm(&waiter, "t", "Wait"));
    wait_for("the waiter to wait", LONG, async || {
        (ready_reason(env, &waiter).await? == "WaitingForImage").then_some(())
    })
    .await;
    (holder, waiter, pod)
}

/// Deletes a waiting VM's successor at the end of a round: its Pod (bound) needs the kubelet.
async fn delete_running(env: &Env, vm: &str) {
    env.delete_vm(vm).await;
    let pod = names::launcher_pod(&env.ns.name, vm);
    if env.pod(&pod).await.is_some() {
        wait_terminating(env, &pod).await;
        kubelet_confirms(env, &pod).await;
    }
    env.wait_gone::<VirtualMachine>(vm, LONG).await;
}

#[tokio::test]
async fn fault1_foreground_deletion_never_touches_a_held_persistent_disk() {
    let env = Env::new("fault1").await;
    let node = FakeNode::run(env.client.clone(), &env.ns.name);
    for (round, run) in ["Always", "Halted"].into_iter().enumerate() {
        let (data, t, a) = (format!("data{round}"), format!("t{round}"), format!("a{round}"));
        apply(
            &env.ns,
            &(image(&data, true) + &template(&t, &[("disk", Some(&data))]) + &vm_run(&a, &t, "Reject", run)),
        );
        let phase = if run == "Always" { VirtualMachinePhase::Starting } else { VirtualMachinePhase::Stopped };
        env.wait_vm(&a, phase).await;
        if run == "Always" {
            wait_bound(&env, &names::launcher_pod(&env.ns.name, &a)).await;
        }
        let pvc_name = format!("{data}-image");
        let pvc_uid = env.pvc(&pvc_name).await.expect("image PVC").uid();
        let lease_uid = env.claim(&data).await.expect("claim").uid();

        delete_with(&env, "image", &data, "foreground");
        delete_with(&env, "template", &t, "foreground");
        env.wait_image(&data, "Deleting", |i| i.status.as_ref().is_some_and(|s| s.phase == Some(ImagePhase::Deleting)))
            .await;
        env.wait_gone::<Template>(&t, LONG).await;
        // The garbage collector has had every chance: nothing vmkeep depends on moved.
        for _ in 0..10 {
            let pvc = env.pvc(&pvc_name).await.expect("the image PVC is gone");
            assert_eq!((pvc.uid(), pvc.metadata.deletion_timestamp), (pvc_uid.clone(), None), "round {round}: PVC");
            let lease = env.claim(&data).await.expect("the claim is gone");
            assert_eq!((lease.uid(), lease.metadata.deletion_timestamp), (lease_uid.clone(), None), "round {round}");
            assert_eq!(env.vm_phase(&a).await, Some(phase), "round {round}: the holder's phase");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        // The holder goes with foreground propagation too: the claim moves only after its Pod.
        delete_with(&env, "virtualmachine", &a, "foreground");
        if run == "Always" {
            let pod = names::launcher_pod(&env.ns.name, &a);
            wait_terminating(&env, &pod).await;
            assert_eq!(env.claim_holder(&data).await.as_deref(), Some(a.as_str()), "released before the Pod went");
            kubelet_confirms(&env, &pod).await;
        }
        env.wait_gone::<VirtualMachine>(&a, LONG).await;
        env.wait_gone::<Image>(&data, LONG).await;
        env.wait_gone::<PersistentVolumeClaim>(&pvc_name, LONG).await;
        assert!(env.claim(&data).await.is_none(), "round {round}: the claim outlived its image");
    }
    node.assert_never_shared();
}

#[tokio::test]
async fn fault2_orphan_deletion_moves_the_claim_only_after_the_pod_is_gone() {
    let env = Env::new("fault2").await;
    let node = FakeNode::run(env.client.clone(), &env.ns.name);
    apply(&env.ns, &(image("data", true) + &template("t", &[("disk", Some("data")), ("scratch", None)])));
    for round in 0..10 {
        let (holder, waiter, pod) = holder_and_waiter(&env, round).await;

        delete_with(&env, "virtualmachine", &holder, "orphan");
        // vmkeep stops the orphaned launcher Pod: found by its labels, not its owner reference.
        wait_terminating(&env, &pod).await;
        for _ in 0..5 {
            assert_eq!(env.claim_holder("data").await.as_deref(), Some(holder.as_str()), "round {round}");
            assert!(
                env.pod(&names::launcher_pod(&env.ns.name, &waiter)).await.is_none(),
                "round {round}: a second Pod"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        kubelet_confirms(&env, &pod).await;
        env.wait_vm(&waiter, VirtualMachinePhase::Starting).await;
        assert_eq!(env.claim_holder("data").await.as_deref(), Some(waiter.as_str()), "round {round}");
        env.wait_gone::<VirtualMachine>(&holder, LONG).await;
        // Its own (volatile) disk dies with it all the same, found by its uid label (the fault
        // suite found such disks left without an owner for ever).
        env.wait_gone::<PersistentVolumeClaim>(&format!("{holder}-scratch"), LONG).await;

        delete_running(&env, &waiter).await;
        wait_for("the claim to be free", LONG, async || env.claim("data").await.is_none().then_some(())).await;
    }
    node.assert_never_shared();
}

#[tokio::test]
async fn fault3_the_claim_of_a_vm_removed_by_force_moves_once_its_pod_is_gone() {
    let env = Env::new("fault3").await;
    let node = FakeNode::run(env.client.clone(), &env.ns.name);
    apply(&env.ns, &(image("data", true) + &template("t", &[("disk", Some("data"))])));
    let mut slowest = Duration::ZERO;
    for round in 0..10 {
        let (holder, waiter, pod) = holder_and_waiter(&env, round).await;

        env.delete_vm(&holder).await;
        wait_terminating(&env, &pod).await;
        // Removed by force while its Pod still terminates.
        let strip = serde_json::json!({"metadata": {"finalizers": null}});
        env.api::<VirtualMachine>().patch(&holder, &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
        env.wait_gone::<VirtualMachine>(&holder, LONG).await;
        for _ in 0..5 {
            assert_eq!(env.claim_holder("data").await.as_deref(), Some(holder.as_str()), "round {round}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        kubelet_confirms(&env, &pod).await;
        let gone = Instant::now();
        wait_for("the waiter to take the image", Duration::from_secs(15), async || {
            (env.claim_holder("data").await? == waiter).then_some(())
        })
        .await;
        slowest = slowest.max(gone.elapsed());
        env.wait_vm(&waiter, VirtualMachinePhase::Starting).await;

        delete_running(&env, &waiter).await;
        wait_for("the claim to be free", LONG, async || env.claim("data").await.is_none().then_some(())).await;
    }
    eprintln!("slowest hand-over after the Pod was gone: {slowest:?}");
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
    node.assert_never_shared();
}

#[tokio::test]
async fn fault4_two_vms_needing_the_same_two_images_get_exactly_one_winner() {
    let env = Env::with_args("fault4", &["--concurrency", "8"]).await;
    let mut second = Operator::start_with("fault4-second", &["--namespace", &env.ns.name, "--concurrency", "8"]);
    second.ready().await;
    apply(
        &env.ns,
        &(image("d1", true) + &image("d2", true) + &template("t", &[("one", Some("d1")), ("two", Some("d2"))])),
    );
    for image in ["d1", "d2"] {
        env.wait_image(image, "ready", |i| i.status.as_ref().is_some_and(|s| s.phase == Some(ImagePhase::Ready))).await;
    }
    for round in 0..12 {
        let (a, b) = (format!("p{round}-a"), format!("p{round}-b"));
        // Both in one apply, in either order.
        let yaml = if round % 2 == 0 {
            vm(&a, "t", "Reject") + &vm(&b, "t", "Reject")
        } else {
            vm(&b, "t", "Reject") + &vm(&a, "t", "Reject")
        };
        apply(&env.ns, &yaml);
        let decided = wait_for(&format!("round {round}: both decided"), LONG, async || {
            let pa = env.vm_phase(&a).await?;
            let pb = env.vm_phase(&b).await?;
            let done = |p| matches!(p, VirtualMachinePhase::Starting | VirtualMachinePhase::Rejected);
            (done(pa) && done(pb)).then_some([(a.clone(), pa), (b.clone(), pb)])
        })
        .await;
        let winners: Vec<&String> =
            decided.iter().filter(|(_, p)| *p == VirtualMachinePhase::Starting).map(|(n, _)| n).collect();
        assert_eq!(winners.len(), 1, "round {round}: {decided:?}");
        let (winner, loser) = if winners[0] == &a { (&a, &b) } else { (&b, &a) };
        for image in ["d1", "d2"] {
            assert_eq!(env.claim_holder(image).await.as_ref(), Some(winner), "round {round}: {image}");
        }
        let status = env.vm(loser).await.unwrap().status.unwrap();
        let message = &condition(&status.conditions, "ImagesClaimed").unwrap().message;
        assert!(message.ends_with(&format!("already in use by VirtualMachine {winner}")), "round {round}: {message}");
        // Settled: nothing moves any more, the loser holds nothing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(env.vm_phase(loser).await, Some(VirtualMachinePhase::Rejected), "round {round}");
        for image in ["d1", "d2"] {
            assert_eq!(env.claim_holder(image).await.as_ref(), Some(winner), "round {round}: {image}");
        }
        for name in [&a, &b] {
            env.delete_vm(name).await;
        }
        for name in [&a, &b] {
            env.wait_gone::<VirtualMachine>(name, LONG).await;
        }
        for image in ["d1", "d2"] {
            wait_for("the claims to be free", LONG, async || env.claim(image).await.is_none().then_some(())).await;
        }
    }
    assert!(second.exited().is_none(), "the second operator died:\n{}", second.log_text());
}

/// Applies `examples/` and checks that vm-a holds `shared-data` and vm-b waits, `rounds` times.
async fn examples_rounds(env: &Env, rounds: usize, replicas: usize) {
    let examples = repo().join("examples");
    for round in 0..rounds {
        kubectl_ok(&["apply", "-n", &env.ns.name, "-f", examples.to_str().unwrap()], None);
        env.wait_vm("vm-a", VirtualMachinePhase::Starting).await;
        wait_for(&format!("{replicas} replicas, round {round}: vm-b waits for vm-a"), LONG, async || {
            let vm = env.vm("vm-b").await?;
            let claimed = condition(&vm.status?.conditions, "ImagesClaimed")?.clone();
            (claimed.message == "waiting for image shared-data, held by VirtualMachine vm-a").then_some(())
        })
        .await;
        assert_eq!(env.claim_holder("shared-data").await.as_deref(), Some("vm-a"), "round {round}");
        assert_eq!(env.vm_phase("vm-b").await, Some(VirtualMachinePhase::Pending), "round {round}");
        // A launcher deleted while the kubelet creates its container takes it up to ~90 s on
        // this busy node (kubelet 1.20), and the examples' VMs start after their copies: the
        // deletion gets the GC deadline.
        let timeout = format!("--timeout={}s", GC.as_secs());
        kubectl_ok(&["delete", "-n", &env.ns.name, "-f", examples.to_str().unwrap(), "--wait=true", &timeout], None);
    }
}

#[tokio::test]
async fn fault5_the_examples_give_the_earliest_vm_the_image_with_one_and_two_operators() {
    let env = Env::new("fault5").await;
    examples_rounds(&env, 10, 1).await;
    let mut second = Operator::start_with("fault5-second", &["--namespace", &env.ns.name]);
    second.ready().await;
    examples_rounds(&env, 10, 2).await;
    assert!(second.exited().is_none(), "the second operator died:\n{}", second.log_text());
}

#[tokio::test]
async fn fault6_a_pending_persistence_change_applies_before_a_waiting_vm_proceeds() {
    let env = Env::new("fault6").await;
    for round in 0..10 {
        let (data, t, a, b) = (format!("d{round}"), format!("t{round}"), format!("a{round}"), format!("b{round}"));
        apply(&env.ns, &(image(&data, true) + &template(&t, &[("disk", Some(&data))]) + &vm(&a, &t, "Reject")));
        env.wait_vm(&a, VirtualMachinePhase::Starting).await;
        apply(&env.ns, &vm(&b, &t, "Wait"));
        wait_for("the waiter to wait", LONG, async || {
            (ready_reason(&env, &b).await? == "WaitingForImage").then_some(())
        })
        .await;
        apply(&env.ns, &image(&data, false));
        env.wait_image(&data, "change pending", |i| {
            i.status.as_ref().is_some_and(|s| {
                condition(&s.conditions, "PersistenceChangePending").is_some_and(|c| c.status == ConditionStatus::True)
            })
        })
        .await;

        env.delete_vm(&a).await;
        let started = env.wait_vm(&b, VirtualMachinePhase::Starting).await;
        let disk = &started.status.unwrap().disks[0];
        assert!(!disk.persistent, "round {round}: {b} took the image under the old mode");
        assert_eq!(disk.pvc_name.as_deref(), Some(format!("{b}-disk").as_str()), "round {round}: not its own clone");
        assert!(env.claim(&data).await.is_none(), "round {round}: a claim on a non-persistent image");
        let image = env.api::<Image>().get(&data).await.unwrap().status.unwrap();
        assert_eq!(image.persistent, Some(false), "round {round}");
        let pending = condition(&image.conditions, "PersistenceChangePending").unwrap();
        assert_eq!(pending.status, ConditionStatus::False, "round {round}");

        env.delete_vm(&b).await;
        env.wait_gone::<VirtualMachine>(&b, LONG).await;
    }
}

#[tokio::test]
async fn fault1_an_image_pvc_and_claim_made_with_owners_are_taken_out_of_garbage_collection() {
    // What an older vmkeep made: the image PVC controlled by its Image, the claim owned by it.
    let env = Env::new("fault1-upgrade").await;
    apply(&env.ns, &(image("data", true) + &template("t", &[("disk", Some("data"))]) + &vm("a", "t", "Reject")));
    env.wait_vm("a", VirtualMachinePhase::Starting).await;
    let image = env.api::<Image>().get("data").await.unwrap();
    let owner = serde_json::json!({"apiVersion": "vmkeep.io/v1alpha1", "kind": "Image", "name": "data",
        "uid": image.uid().unwrap(), "controller": true, "blockOwnerDeletion": true});
    let legacy = serde_json::json!({"metadata": {"ownerReferences": [owner],
        "labels": {names::IMAGE_UID_LABEL: null}}});
    let params = PatchParams::default();
    env.api::<PersistentVolumeClaim>().patch("data-image", &params, &Patch::Merge(&legacy)).await.unwrap();
    let legacy = serde_json::json!({"metadata": {"ownerReferences": [owner]}});
    let lease = names::claim_lease("data");
    env.api::<k8s_openapi::api::coordination::v1::Lease>()
        .patch(&lease, &params, &Patch::Merge(&legacy))
        .await
        .unwrap();
    wait_for("the PVC and the claim without owners", LONG, async || {
        let pvc = env.pvc("data-image").await?;
        let claim = env.claim("data").await?;
        let labelled = pvc.labels().get(names::IMAGE_UID_LABEL) == image.uid().as_ref();
        (pvc.owner_references().is_empty() && claim.owner_references().is_empty() && labelled).then_some(())
    })
    .await;
    assert_eq!(env.claim_holder("data").await.as_deref(), Some("a"));
}

/// Found by a breaker: a user takes a holder's launcher Pod out of vmkeep's watch by removing
/// its managed-by label, then deletes the VM. The claim must stay until that Pod is gone.
#[tokio::test]
async fn a_launcher_relabelled_out_of_vmkeeps_watch_still_fences_the_claim() {
    let env = Env::new("relabel").await;
    let node = FakeNode::run(env.client.clone(), &env.ns.name);
    apply(&env.ns, &(image("data", true) + &template("t", &[("disk", Some("data"))])));
    let (holder, waiter, pod) = holder_and_waiter(&env, 0).await;
    let unlabel = format!("{}-", names::MANAGED_BY);
    kubectl_ok(&["label", "pod", &pod, "-n", &env.ns.name, &unlabel], None);
    env.delete_vm(&holder).await;
    for _ in 0..15 {
        assert_eq!(env.claim_holder("data").await.as_deref(), Some(holder.as_str()), "released while {pod} exists");
        assert!(
            env.pod(&names::launcher_pod(&env.ns.name, &waiter)).await.is_none(),
            "a second Pod while {pod} exists"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kubelet_confirms(&env, &pod).await;
    env.wait_vm(&waiter, VirtualMachinePhase::Starting).await;
    assert_eq!(env.claim_holder("data").await.as_deref(), Some(waiter.as_str()));
    env.wait_gone::<VirtualMachine>(&holder, LONG).await;
    delete_running(&env, &waiter).await;
    node.assert_never_shared();
}
