//! The KubeVirt runtime against a real API server (issue 15). KubeVirt itself cannot run here:
//! the tests install the VirtualMachineInstance CRD that vmkeep's KubeVirt crate generates
//! (`vmkeep::kubevirt::instance_crd`) and let a test double play virt-controller and
//! virt-handler (`support::kubevirt`: it creates the virt-launcher Pod, running the pause image,
//! with the VMI's PVCs attached, and sets the VMI's phase and `Ready` condition; **no QEMU, no
//! libvirt, no guest**; its phases and conditions are the double's). What these tests prove is
//! vmkeep's side: the VMI it writes, the VM status it reads from a VMI, `Halted`, fencing on
//! the VMI and its Pods, `auto`, `RuntimeNotAvailable`, and the chart's RBAC. What only a real
//! KubeVirt can confirm (the VMI's spec accepted by KubeVirt's webhooks, a guest booting from
//! those disks, real phase and condition reasons) is not tested here.
//!
//! The VMI CRD is cluster-wide and some tests delete it: the tests of this file run one at a
//! time (`CLUSTER`). A CRD of the same name that the tests did not install (a real KubeVirt) is
//! never touched: every test skips then. Tests whose Pods must run skip without a schedulable
//! node (`support::node::skip_reason`).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use support::{
    chart::*,
    env::*,
    kubevirt::{self as kv, Kubevirt},
    *,
};
use vmkeep::{
    api::{ConditionStatus, Image, VirtualMachine, template::Runtime, virtual_machine::VirtualMachinePhase},
    plan::{conditions::find as condition, names},
};

/// One test at a time: the VMI CRD is cluster-wide, and some tests delete it.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a VM may take to run: its clones are copied by a copier Pod on this 2-core node,
/// then the virt-launcher Pod starts.
const RUN: Duration = Duration::from_secs(180);
/// A deleted VMI's virt-launcher Pod outlives it by this much (the double's `linger`).
const LINGER: Duration = Duration::from_secs(3);
/// How soon a VMI appears once its API is served: the operator asks API discovery every
/// `vmkeep::kubevirt::PROBE_INTERVAL` (10 s), then creates it.
const NOTICED: Duration = Duration::from_secs(45);

/// The test's Env and the double playing KubeVirt in its namespace: dropping it deletes the
/// test's vmkeep objects while the double still runs (VMIs and their Pods go as they would),
/// then stops the double (releasing its finalizers), then the Env (operator, namespace).
struct World {
    env: Env,
    kubevirt: Option<Kubevirt>,
}

impl World {
    async fn new(test: &str, args: &[&str], linger: Option<Duration>) -> Self {
        let env = Env::with_args(test, args).await;
        let kubevirt = linger.map(|linger| Kubevirt::start(&env.ns.name, linger));
        Self { env, kubevirt }
    }

    async fn vmi(&self, name: &str) -> Option<DynamicObject> {
        kv::vmi(&self.env.client, &self.env.ns.name, name).await
    }

    async fn wait_vmi(&self, name: &str, timeout: Duration) -> DynamicObject {
        wait_for(&format!("VirtualMachineInstance {name}"), timeout, async || self.vmi(name).await).await
    }

    async fn runtime(&self, vm: &str) -> Option<Runtime> {
        self.env.vm(vm).await?.status?.runtime
    }

    async fn patch_vm(&self, name: &str, patch: Value) {
        self.env
            .api::<VirtualMachine>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch vm");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.kubevirt.is_some() {
            let kinds = "virtualmachines.vmkeep.io,images.vmkeep.io,templates.vmkeep.io";
            let _ =
                kubectl(&["delete", kinds, "--all", "-n", &self.env.ns.name, "--wait=true", "--timeout=120s"], None);
        }
        self.kubevirt.take();
    }
}

/// Takes the cluster for one test; `None` (the test skips) when a VMI CRD that is not the
/// tests' own exists.
async fn take_cluster() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    let alone = CLUSTER.lock().await;
    install_crds();
    if let Some(why) = kv::foreign_kubevirt(&client().await).await {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(alone)
}

fn skip_without_node() -> bool {
    if let Some(why) = node::skip_reason() {
        eprintln!("skipped: {why} (the double's virt-launcher Pods must run)");
        return true;
    }
    false
}

/// The VM's `Ready` condition: (status, reason, message).
fn ready(vm: &VirtualMachine) -> Option<(ConditionStatus, String, String)> {
    let ready = condition(&vm.status.as_ref()?.conditions, "Ready")?;
    Some((ready.status, ready.reason.clone(), ready.message.clone()))
}

/// The claim names of a VMI's volumes, by volume name.
fn vmi_claims(vmi: &DynamicObject) -> Vec<(String, String)> {
    let volumes = vmi.data["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    volumes
        .iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            (name, v["persistentVolumeClaim"]["claimName"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// The PVCs a VM's status names, by disk name.
fn status_claims(vm: &VirtualMachine) -> Vec<(String, String)> {
    let disks = &vm.status.as_ref().expect("status").disks;
    disks.iter().map(|d| (d.name.clone(), d.pvc_name.clone().expect("pvcName"))).collect()
}

/// An object's name, phase, deletion and finalizers, for a failure message.
fn describe(meta: &kube::api::ObjectMeta, phase: &Value) -> String {
    let deleting = meta.deletion_timestamp.as_ref().map_or("not deleted".into(), |t| format!("deleted at {}", t.0));
    let finalizers = meta.finalizers.clone().unwrap_or_default();
    format!("{} phase {phase}, {deleting}, finalizers {finalizers:?}", meta.name.as_deref().unwrap_or_default())
}

#[tokio::test]
async fn without_the_api_a_kubevirt_vm_is_pending_until_the_crd_is_installed() {
    let Some(_cluster) = take_cluster().await else { return };
    let client = client().await;
    kv::remove_crd(&client).await;
    // The operator runs the launcher; the Template asks for kubevirt.
    let world = World::new("kv-unavailable", &[], None).await;
    let env = &world.env;
    let kubevirt = "runtime: kubevirt, launcher: {terminationGracePeriodSeconds: 10}, ";
    apply(
        &env.ns,
        &(image("disk", true) + &template_with("t", &[("data", Some("disk"))], kubevirt) + &vm("vm", "t", "Reject")),
    );

    let pending = wait_for("vm Pending with reason RuntimeNotAvailable", LONG, async || {
        let vm = env.vm("vm").await?;
        let (status, reason, message) = ready(&vm)?;
        (vm.status.as_ref()?.phase == Some(VirtualMachinePhase::Pending) && reason == "RuntimeNotAvailable")
            .then_some((status, message))
    })
    .await;
    eprintln!("Pending, RuntimeNotAvailable: {}", pending.1);
    assert_eq!(pending.0, ConditionStatus::False);
    // It holds nothing and runs nothing, and stays so.
    for _ in 0..5 {
        assert_eq!(env.claim_holder("disk").await, None, "a VM that cannot run took the claim");
        let image = env.api::<Image>().get("disk").await.expect("get image");
        assert!(image.status.and_then(|s| s.claimed_by).is_none(), "the Image says it is claimed");
        assert!(env.pod(&names::launcher_pod(&env.ns.name, "vm")).await.is_none(), "a launcher Pod was made");
        assert_eq!(env.vm_phase("vm").await, Some(VirtualMachinePhase::Pending));
        assert_eq!(world.runtime("vm").await, None, "no runtime recorded for a VM that never ran");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    kv::install_crd(&client).await;
    let installed = Instant::now();
    let vmi = world.wait_vmi("vm", NOTICED).await;
    eprintln!("VMI created {:.1} s after the CRD was installed", installed.elapsed().as_secs_f64());
    assert_eq!(vmi_claims(&vmi), [("data".to_owned(), names::image_pvc("disk"))]);
    wait_for("vm to hold the claim", LONG, async || (env.claim_holder("disk").await? == "vm").then_some(())).await;
    let vm = env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    assert_eq!(vm.status.and_then(|s| s.runtime), Some(Runtime::Kubevirt));
}

#[tokio::test]
async fn auto_runs_the_launcher_without_the_api_and_kubevirt_with_it() {
    let Some(_cluster) = take_cluster().await else { return };
    let client = client().await;
    kv::remove_crd(&client).await;
    let world = World::new("kv-auto", &["--runtime", "auto"], None).await;
    let env = &world.env;
    apply(&env.ns, &(template("t", &[("scratch", None)]) + &vm("before", "t", "Reject")));
    // The launcher runtime is the default: `status.runtime` is only written for `kubevirt`.
    wait_for("before to run with the launcher", LONG, async || {
        let status = env.vm("before").await?.status?;
        (status.runtime.is_none() && status.launcher_pod.is_some()).then_some(())
    })
    .await;
    env.wait_vm("before", VirtualMachinePhase::Starting).await;
    let launcher = names::launcher_pod(&env.ns.name, "before");
    assert!(env.pod(&launcher).await.is_some(), "no launcher Pod {launcher}");

    kv::install_crd(&client).await;
    // `auto` is decided when a VM starts, against what the operator last saw of API discovery
    // (asked every PROBE_INTERVAL): give it one probe.
    tokio::time::sleep(vmkeep::kubevirt::PROBE_INTERVAL + Duration::from_secs(3)).await;
    let applied = Instant::now();
    apply(&env.ns, &vm("after", "t", "Reject"));
    world.wait_vmi("after", NOTICED).await;
    eprintln!("VMI after created {:.1} s after the VM", applied.elapsed().as_secs_f64());
    assert_eq!(world.runtime("after").await, Some(Runtime::Kubevirt));
    assert!(env.pod(&names::launcher_pod(&env.ns.name, "after")).await.is_none(), "after got a launcher Pod");

    // A VM keeps its runtime while it runs; at its next start, auto picks kubevirt.
    assert_eq!(world.runtime("before").await, None, "the launcher's VMs carry no status.runtime");
    assert!(world.vmi("before").await.is_none(), "a VM with a launcher Pod got a VMI");
    world.patch_vm("before", json!({"spec": {"runStrategy": "Halted"}})).await;
    env.wait_vm_within("before", VirtualMachinePhase::Stopped, GC).await;
    env.wait_gone::<Pod>(&launcher, GC).await;
    world.patch_vm("before", json!({"spec": {"runStrategy": "Always"}})).await;
    world.wait_vmi("before", LONG).await;
    assert_eq!(world.runtime("before").await, Some(Runtime::Kubevirt));
    assert!(env.pod(&launcher).await.is_none(), "before got a launcher Pod again");
}

/// Images for each kind of disk, and a Template using them in this order with every launcher
/// setting (`clones`: with the non-persistent images, which need a copier Pod to run).
fn shape_manifests(clones: bool) -> String {
    let images = [("base", false, "OS"), ("disk", true, "DATABLOCK"), ("iso", false, "CDROM")];
    let mut yaml = String::new();
    for (name, persistent, kind) in images.into_iter().filter(|(_, p, _)| clones || *p) {
        yaml += &format!(
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\n\
             spec: {{persistent: {persistent}, type: {kind}, size: 1Gi, source: {{blank: {{}}}}}}\n---\n"
        );
    }
    let disks = if clones {
        "[{name: root, image: base}, {name: data, image: disk}, {name: scratch, blank: {size: 1Gi}}, {name: iso, image: iso}]"
    } else {
        "[{name: data, image: disk}, {name: scratch, blank: {size: 1Gi}}]"
    };
    yaml + &format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Template\nmetadata: {{name: shape}}\n\
         spec:\n  cpu: 2\n  memory: 300Mi\n  disks: {disks}\n  launcher:\n\
         \x20   nodeSelector: {{vmkeep.io/test: shape}}\n\
         \x20   tolerations: [{{key: vmkeep.io/test, operator: Exists, effect: NoSchedule}}]\n\
         \x20   priorityClassName: vmkeep-test-shape\n\
         \x20   terminationGracePeriodSeconds: 15\n---\n"
    )
}

#[tokio::test]
async fn the_vmi_has_the_templates_disks_on_vmkeeps_pvcs_and_its_status_drives_the_vm() {
    let Some(_cluster) = take_cluster().await else { return };
    kv::install_crd(&client().await).await;
    // Clones are filled by a copier Pod: without a node whose Pods run, only the persistent
    // and the volatile disk.
    let clones = node::skip_reason().is_none();
    if !clones {
        eprintln!("no schedulable node: the VMI's shape without the non-persistent (cloned) disks");
    }
    // No double: the VMI has no status until the test writes one.
    let world = World::new("kv-shape", &["--runtime", "kubevirt"], None).await;
    let env = &world.env;
    apply(&env.ns, &(shape_manifests(clones) + &vm("vm", "shape", "Reject")));
    let vmi = world.wait_vmi("vm", RUN).await;
    let vm = env.wait_vm("vm", VirtualMachinePhase::Starting).await;
    let status = vm.status.as_ref().expect("status");
    assert_eq!(status.runtime, Some(Runtime::Kubevirt));
    eprintln!("the VMI vmkeep wrote:\n{}", serde_json::to_string_pretty(&vmi.data["spec"]).unwrap());

    // Owned and labelled like a launcher Pod.
    let owner = vmi.owner_references().iter().find(|o| o.controller == Some(true)).expect("a controller");
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.clone()),
        ("VirtualMachine", "vm", vm.uid().unwrap())
    );
    let labels = vmi.labels();
    assert_eq!(labels.get(names::MANAGED_BY).map(String::as_str), Some(names::MANAGER));
    assert_eq!(labels.get(names::VM_LABEL), Some(&"vm".to_owned()));
    assert_eq!(labels.get(names::VM_UID_LABEL), vm.uid().as_ref());

    let spec = &vmi.data["spec"];
    assert_eq!(spec["domain"]["cpu"]["cores"], 2);
    assert_eq!(spec["domain"]["memory"]["guest"], "300Mi");
    assert_eq!(spec["domain"]["resources"]["requests"]["memory"], "300Mi");
    let disks = spec["domain"]["devices"]["disks"].as_array().expect("disks");
    let order: Vec<&str> = disks.iter().map(|d| d["name"].as_str().unwrap_or_default()).collect();
    let expected: &[&str] = if clones { &["root", "data", "scratch", "iso"] } else { &["data", "scratch"] };
    assert_eq!(order, expected, "disks in Template order");
    for disk in disks {
        if disk["name"] == "iso" {
            assert_eq!(disk["cdrom"]["bus"], "sata", "{disk}");
            assert_eq!(disk["cdrom"]["readonly"], true, "{disk}");
            assert!(disk["disk"].is_null(), "{disk}");
        } else {
            assert_eq!(disk["disk"]["bus"], "virtio", "{disk}");
            assert!(disk["cdrom"].is_null(), "{disk}");
        }
    }
    assert_eq!(disks[0]["bootOrder"], 1, "the first disk boots first");
    assert_eq!(disks.iter().filter(|d| d["bootOrder"] == 1).count(), 1, "one first boot disk");
    // The volumes are the PVCs vmkeep made, the ones its status names.
    assert_eq!(vmi_claims(&vmi), status_claims(&vm));
    let image_pvc = env.api::<Image>().get("disk").await.expect("image").status.and_then(|s| s.pvc_name);
    let mut expected =
        vec![("data", image_pvc.expect("the image's pvcName")), ("scratch", names::vm_disk_pvc("vm", "scratch"))];
    if clones {
        expected.push(("root", names::vm_disk_pvc("vm", "root")));
        expected.push(("iso", names::vm_disk_pvc("vm", "iso")));
    }
    for (disk, pvc) in expected {
        assert!(vmi_claims(&vmi).contains(&(disk.to_owned(), pvc.clone())), "{disk} is not on {pvc}");
        assert!(env.pvc(&pvc).await.is_some(), "no PVC {pvc}");
    }
    for volume in spec["volumes"].as_array().expect("volumes") {
        let read_only = volume["persistentVolumeClaim"]["readOnly"] == true;
        assert_eq!(read_only, volume["name"] == "iso", "{volume}");
    }
    // The launcher settings, under the same names.
    assert_eq!(spec["nodeSelector"], json!({"vmkeep.io/test": "shape"}));
    assert_eq!(spec["tolerations"], json!([{"key": "vmkeep.io/test", "operator": "Exists", "effect": "NoSchedule"}]));
    assert_eq!(spec["priorityClassName"], "vmkeep-test-shape");
    assert_eq!(spec["terminationGracePeriodSeconds"], 15);

    // The VMI's status, as KubeVirt would write it, drives the VM's.
    let vmis = kv::vmis(&env.client, &env.ns.name);
    let set = async |status: Value| {
        let patch = json!({"status": status});
        vmis.patch_status("vm", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the VMI's status");
    };
    let at =
        serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())).unwrap();
    let ready_condition = |status: &str, reason: &str, message: &str| json!({"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": at});
    set(json!({"phase": "Scheduled", "conditions": [ready_condition("False", "GuestNotRunning", "written by the test")]}))
        .await;
    let message = wait_for("vm Starting, its Ready message naming the VMI's phase", LONG, async || {
        let vm = env.vm("vm").await?;
        let (_, _, message) = ready(&vm)?;
        (vm.status?.phase == Some(VirtualMachinePhase::Starting) && message.contains("Scheduled")).then_some(message)
    })
    .await;
    eprintln!("Starting: {message}");
    set(json!({"phase": "Running", "nodeName": "node-of-the-test",
               "conditions": [ready_condition("True", "GuestRunning", "written by the test")]}))
    .await;
    let running = env.wait_vm("vm", VirtualMachinePhase::Running).await;
    assert_eq!(running.status.as_ref().and_then(|s| s.node_name.as_deref()), Some("node-of-the-test"));
    assert_eq!(ready(&running).map(|r| r.0), Some(ConditionStatus::True));

    // Deleting the VM deletes its VMI.
    env.delete_vm("vm").await;
    wait_for("the VMI to be gone", GC, async || world.vmi("vm").await.is_none().then_some(())).await;
    env.wait_gone::<VirtualMachine>("vm", GC).await;
}

#[tokio::test]
async fn with_kubevirt_played_a_vm_runs_and_halted_removes_its_vmi_and_pod() {
    if skip_without_node() {
        return;
    }
    let Some(_cluster) = take_cluster().await else { return };
    kv::install_crd(&client().await).await;
    let world = World::new("kv-run", &["--runtime", "kubevirt"], Some(LINGER)).await;
    let env = &world.env;
    apply(
        &env.ns,
        &(image("os", false) + &template("t", &[("root", Some("os")), ("scratch", None)]) + &vm("vm", "t", "Reject")),
    );
    let started = Instant::now();
    let vm = env.wait_vm_within("vm", VirtualMachinePhase::Running, RUN).await;
    eprintln!("Running {:.1} s after apply", started.elapsed().as_secs_f64());
    let status = vm.status.as_ref().expect("status");
    let vmi = world.vmi("vm").await.expect("the VMI");
    let node = vmi.data["status"]["nodeName"].as_str().expect("the VMI's nodeName").to_owned();
    assert_eq!(status.node_name.as_deref(), Some(node.as_str()));
    assert_eq!(status.runtime, Some(Runtime::Kubevirt));
    assert!(env.pod(&names::launcher_pod(&env.ns.name, "vm")).await.is_none(), "a launcher Pod besides the VMI");
    // The virt-launcher Pod runs with the VM's PVCs and carries the VMI's labels (as KubeVirt's).
    let vmi_uid = vmi.uid().unwrap();
    let pods = kv::launcher_pods(&env.client, &env.ns.name, &vmi_uid).await;
    assert_eq!(pods.len(), 1, "virt-launcher Pods: {:?}", pods.iter().map(|p| p.name_any()).collect::<Vec<_>>());
    let pod = &pods[0];
    assert_eq!(pod.labels().get(names::VM_UID_LABEL), vm.uid().as_ref());
    assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(node.as_str()));
    let mut pod_claims: Vec<String> = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .collect();
    pod_claims.sort();
    let mut claims: Vec<String> = status_claims(&vm).into_iter().map(|(_, pvc)| pvc).collect();
    claims.sort();
    assert_eq!(pod_claims, claims);

    // Halted: the VMI goes, then its Pod. The VM is Stopped at once, Ready=False (`Stopping`)
    // while they go, Ready=True (`Halted`) only once both are gone (docs/api.md).
    world.patch_vm("vm", json!({"spec": {"runStrategy": "Halted"}})).await;
    let halted = Instant::now();
    let (mut pod_outlived_vmi, mut stopping) = (false, None);
    wait_for("vm to be Stopped, Ready reason Halted", GC, async || {
        let vmi_exists = world.vmi("vm").await.is_some();
        let pods = kv::launcher_pods(&env.client, &env.ns.name, &vmi_uid).await;
        pod_outlived_vmi |= !vmi_exists && !pods.is_empty();
        let vm = env.vm("vm").await?;
        let (status, reason, message) = ready(&vm)?;
        if vm.status.as_ref()?.phase != Some(VirtualMachinePhase::Stopped) {
            return None;
        }
        if reason != "Halted" {
            stopping.get_or_insert(format!("{status:?} {reason}: {message}"));
            return None;
        }
        let vmi = world.vmi("vm").await;
        let pods = kv::launcher_pods(&env.client, &env.ns.name, &vmi_uid).await;
        assert!(
            vmi.is_none() && pods.is_empty(),
            "Stopped (Halted) while the VMI ({}) or its virt-launcher Pods ({}) exist",
            vmi.map_or("gone".into(), |v| describe(&v.metadata, &v.data["status"]["phase"])),
            pods.iter()
                .map(|p| describe(&p.metadata, &json!(p.status.as_ref().and_then(|s| s.phase.clone()))))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(status, ConditionStatus::True);
        Some(())
    })
    .await;
    eprintln!(
        "Stopped (Halted) {:.1} s after Halted; before that: {stopping:?}; the Pod seen outliving its VMI: {pod_outlived_vmi}",
        halted.elapsed().as_secs_f64()
    );
    assert!(env.pvc(&names::vm_disk_pvc("vm", "root")).await.is_some(), "the clone went on power-off");

    // Always again: a new VMI, running.
    world.patch_vm("vm", json!({"spec": {"runStrategy": "Always"}})).await;
    let again = env.wait_vm_within("vm", VirtualMachinePhase::Running, RUN).await;
    let vmi = world.vmi("vm").await.expect("a VMI again");
    assert_ne!(vmi.uid().unwrap(), vmi_uid, "the same VMI");
    assert!(again.status.and_then(|s| s.node_name).is_some());
}

#[tokio::test]
async fn a_waiting_vm_takes_the_image_only_after_the_vmi_and_its_pod_are_gone() {
    if skip_without_node() {
        return;
    }
    let Some(_cluster) = take_cluster().await else { return };
    kv::install_crd(&client().await).await;
    // The Pod outlives its VMI long enough to look at the claim several times meanwhile.
    let world = World::new("kv-fence", &["--runtime", "kubevirt"], Some(Duration::from_secs(10))).await;
    let env = &world.env;
    apply(&env.ns, &(image("data", true) + &template("t", &[("data", Some("data"))]) + &vm("a", "t", "Reject")));
    env.wait_vm_within("a", VirtualMachinePhase::Running, RUN).await;
    assert_eq!(env.claim_holder("data").await.as_deref(), Some("a"));
    apply(&env.ns, &vm("b", "t", "Wait"));
    let waiting = env.wait_vm("b", VirtualMachinePhase::Pending).await;
    let claimed =
        condition(&waiting.status.as_ref().unwrap().conditions, "ImagesClaimed").expect("ImagesClaimed").clone();
    assert_eq!(claimed.reason, "WaitingForImage");
    assert!(world.vmi("b").await.is_none(), "a waiting VM got a VMI");

    let a_uid = world.vmi("a").await.expect("a's VMI").uid().unwrap();
    env.delete_vm("a").await;
    let deleted = Instant::now();
    wait_for("a's VMI to be gone", GC, async || world.vmi("a").await.is_none().then_some(())).await;
    eprintln!("a's VMI gone {:.1} s after a was deleted", deleted.elapsed().as_secs_f64());
    let mut looks = 0;
    loop {
        let pods = kv::launcher_pods(&env.client, &env.ns.name, &a_uid).await;
        if pods.is_empty() {
            break;
        }
        assert_eq!(env.claim_holder("data").await.as_deref(), Some("a"), "released while a's Pod exists");
        let b = env.vm("b").await.expect("b");
        let phase = b.status.as_ref().and_then(|s| s.phase);
        assert_eq!(phase, Some(VirtualMachinePhase::Pending), "b went on while a's Pod exists");
        assert!(world.vmi("b").await.is_none(), "b got a VMI while a's Pod exists");
        looks += 1;
        assert!(deleted.elapsed() < GC, "a's virt-launcher Pod still there after {GC:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("the claim stayed a's for {looks} looks while a's VMI was gone and its Pod was not");
    assert!(looks > 0, "a's Pod went with its VMI: nothing was fenced (raise the double's linger)");

    let b = env.wait_vm_within("b", VirtualMachinePhase::Running, RUN).await;
    eprintln!("b Running {:.1} s after a was deleted", deleted.elapsed().as_secs_f64());
    assert_eq!(env.claim_holder("data").await.as_deref(), Some("b"));
    let vmi = world.vmi("b").await.expect("b's VMI");
    assert_eq!(vmi_claims(&vmi), status_claims(&b));
    assert_eq!(vmi_claims(&vmi), [("data".to_owned(), names::image_pvc("data"))]);
    env.wait_gone::<VirtualMachine>("a", GC).await;
}

/// Whether any rule of `rules` grants something in API group `kubevirt.io`; the verbs on
/// `virtualmachineinstances`.
fn kubevirt_rules(rules: &[serde_yaml::Value]) -> (bool, Vec<String>) {
    let in_group =
        |r: &&serde_yaml::Value| r["apiGroups"].as_sequence().is_some_and(|g| g.iter().any(|g| g == "kubevirt.io"));
    let any = rules.iter().any(|r| in_group(&r));
    let verbs = rules
        .iter()
        .filter(in_group)
        .filter(|r| r["resources"].as_sequence().is_some_and(|rs| rs.iter().any(|r| r == "virtualmachineinstances")))
        .flat_map(|r| r["verbs"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    (any, verbs)
}

#[tokio::test]
async fn the_charts_rbac_with_the_kubevirt_runtime_is_enough() {
    // With the chart's defaults (runtime launcher) nothing of KubeVirt is granted.
    let defaults = render("kv", "kv", &["--show-only", "templates/clusterrole.yaml"]);
    assert!(defaults.status.success(), "helm template failed:\n{}", text(&defaults.stderr));
    let role = objects(&text(&defaults.stdout)).pop().expect("the ClusterRole");
    let rules = role["rules"].as_sequence().cloned().unwrap_or_default();
    assert_eq!(kubevirt_rules(&rules), (false, vec![]), "the default ClusterRole grants kubevirt.io");

    let Some(_cluster) = take_cluster().await else { return };
    kv::install_crd(&client().await).await;
    let ns = TestNamespace::new("kv-rbac");
    let account = ChartAccount::new(&ns.name, &ns.name, &["--set", "runtime=kubevirt"]).await;
    let (granted, verbs) = kubevirt_rules(&account.cluster_role_rules());
    assert!(granted && !verbs.is_empty(), "runtime=kubevirt grants nothing on virtualmachineinstances");
    eprintln!("runtime=kubevirt grants {verbs:?} on kubevirt.io virtualmachineinstances");
    let (audit_log, audit_start) = audit_log_now();

    let args = ["--namespace", ns.name.as_str(), "--runtime", "kubevirt"];
    let mut operator = Operator::start_with_kubeconfig("kv-rbac", &account.kubeconfig, &args);
    operator.ready().await;
    let node = node::skip_reason().is_none();
    let _kubevirt = Kubevirt::start(&ns.name, LINGER);
    let log = operator.log.clone();
    // Dropped first: the VMs go while the operator and the double still run.
    let _objects_cleanup = OnDrop(|| {
        delete_vmkeep_objects(&ns.name);
        if std::thread::panicking() {
            eprintln!("refused requests in {}:\n{}", log.display(), refusals(&log).join("\n"));
        }
    });
    apply(
        &ns,
        &(image("disk", true)
            + &template("t", &[("data", Some("disk")), ("scratch", None)])
            + &vm("vm", "t", "Reject")),
    );
    let client = client().await;
    let vms = kube::Api::<VirtualMachine>::namespaced(client.clone(), &ns.name);
    let wanted = if node { VirtualMachinePhase::Running } else { VirtualMachinePhase::Starting };
    wait_for(&format!("vm to be {wanted:?}"), RUN, async || {
        let vm = vms.get_opt("vm").await.expect("get vm")?;
        reached(vm.status?.phase, wanted).then_some(())
    })
    .await;
    assert!(kv::vmi(&client, &ns.name, "vm").await.is_some(), "no VMI");
    // Deleting: the VMI is deleted, its Pods looked for, the claim released.
    vms.delete("vm", &Default::default()).await.expect("delete vm");
    wait_for("vm to be gone", GC, async || vms.get_opt("vm").await.expect("get vm").is_none().then_some(())).await;
    assert!(kv::vmi(&client, &ns.name, "vm").await.is_none(), "the VMI outlived its VM");

    assert!(operator.exited().is_none(), "the operator died:\n{}", operator.log_text());
    let refused = refusals(&log);
    assert!(refused.is_empty(), "the operator was refused requests:\n{}", refused.join("\n"));
    if is_local_cluster() {
        let user = &account.user;
        let (count, refused) = audited_requests(&audit_log, audit_start, user);
        assert!(count > 0, "no request of {user} in {}", audit_log.display());
        assert!(refused.is_empty(), "requests of {user} answered 403:\n{}", refused.join("\n"));
        eprintln!("audit log: {count} requests of {user}, none refused");
    }
}
