//! Field faults, second batch (issue 12), each kept as the input that found it, against a real
//! API server: an image grown while in use, sizes from what storage gave, an image status lost
//! during a pending persistence change, a 240-character VM name, bounded consumers, and what a
//! user sees at a glance (columns, Events, a deletion held by users).

mod support;

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{ListParams, Patch, PatchParams};
use support::{env::*, *};
use vmkeep::{
    api::{ConditionStatus, Image, image::ImagePhase, virtual_machine::VirtualMachinePhase},
    plan::{conditions::find as condition, names, quantity},
};

/// A StorageClass of the local host-path provisioner, named after the test's namespace;
/// deleted when dropped. `extra` is more of its fields, e.g. `allowVolumeExpansion: true\n`.
struct Class(String);

impl Class {
    fn new(env: &Env, suffix: &str, extra: &str) -> Self {
        let name = format!("{}-{suffix}", env.ns.name);
        kubectl_ok(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {name}, annotations: \
                 {{vmkeep.io/clone-strategy: csi-clone}}}}\nprovisioner: kubernetes.io/host-path\n{extra}"
            )),
        );
        Self(name)
    }
}

impl Drop for Class {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "storageclass", &self.0, "--wait=false"], None);
    }
}

fn sized_image(name: &str, persistent: bool, size: &str, class: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\n\
         spec: {{persistent: {persistent}, size: {size}, storageClassName: {class}, source: {{blank: {{}}}}}}\n---\n"
    )
}

fn halted(name: &str, template: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{templateRef: {{name: {template}}}, runStrategy: Halted}}\n---\n"
    )
}

async fn requested(env: &Env, pvc: &str) -> u64 {
    let pvc = env.pvc(pvc).await.unwrap_or_else(|| panic!("PVC {pvc}"));
    let request = pvc.spec.and_then(|s| s.resources?.requests?.get("storage").cloned()).expect("a request");
    quantity::bytes_u64(&request)
}

async fn host_path(env: &Env, pvc: &str) -> PathBuf {
    let volume = env.pvc(pvc).await.and_then(|p| p.spec?.volume_name).expect("a bound PVC");
    let pv = kube::Api::<PersistentVolume>::all(env.client.clone()).get(&volume).await.expect("its PV");
    PathBuf::from(pv.spec.and_then(|s| s.host_path).expect("a host-path volume").path)
}

fn has_condition(image: &Image, r#type: &str, reason: &str) -> bool {
    image.status.as_ref().and_then(|s| condition(&s.conditions, r#type)).is_some_and(|c| c.reason == reason)
}

const GIB: u64 = 1 << 30;

#[tokio::test]
async fn an_image_grown_in_use_expands_and_its_guest_disk_keeps_its_data() {
    let env = Env::new("grow").await;
    let class = Class::new(&env, "expand", "allowVolumeExpansion: true\n");
    apply(&env.ns, &(sized_image("data", true, "1Gi", &class.0) + &template("t", &[("data", Some("data"))])));
    apply(&env.ns, &vm("a", "t", "Reject"));
    env.wait_vm("a", VirtualMachinePhase::Running).await;

    // Raised while a running VM holds it: the PVC is asked to grow, the image stays in use.
    apply(&env.ns, &sized_image("data", true, "2Gi", &class.0));
    let image = env
        .wait_image("data", "expanding", |i| {
            has_condition(i, "Resized", "Expanding")
                && i.status.as_ref().and_then(|s| s.phase) == Some(ImagePhase::UsedPersistent)
        })
        .await;
    assert_eq!(env.vm_phase("a").await, Some(VirtualMachinePhase::Running), "{image:?}");
    assert_eq!(requested(&env, "data-image").await, 2 * GIB);

    // A smaller size is refused (no webhook here: the controller says so) and undone.
    apply(&env.ns, &sized_image("data", true, "512Mi", &class.0));
    let refused = env.wait_image("data", "InvalidSize", |i| has_condition(i, "Resized", "InvalidSize")).await;
    assert_eq!(refused.status.and_then(|s| s.phase), Some(ImagePhase::UsedPersistent), "still in use");
    apply(&env.ns, &sized_image("data", true, "2Gi", &class.0));

    // The host-path provisioner has no resizer: the test plays it (the PV and the PVC's
    // status get the new capacity), as a CSI driver's external-resizer would.
    let volume = env.pvc("data-image").await.and_then(|p| p.spec?.volume_name).expect("bound");
    let grown = serde_json::json!({"spec": {"capacity": {"storage": "2Gi"}}});
    kube::Api::<PersistentVolume>::all(env.client.clone())
        .patch(&volume, &PatchParams::default(), &Patch::Merge(&grown))
        .await
        .expect("grow the PV");
    let status = serde_json::json!({"status": {"capacity": {"storage": "2Gi"}}});
    env.api::<PersistentVolumeClaim>()
        .patch_status("data-image", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("the PVC's capacity");
    env.wait_image("data", "grown", |i| {
        let s = i.status.as_ref();
        s.and_then(|s| s.capacity.as_ref()).is_some_and(|c| quantity::bytes_u64(c) == 2 * GIB)
            && s.and_then(|s| condition(&s.conditions, "Resized")).is_none()
    })
    .await;

    // The guest sees it at its next start, with its data: a marker written at the start of the
    // disk while the VM is off is still there, and disk.img has the new size.
    if !is_local_cluster() {
        eprintln!("skipped the disk.img check: the volume is not on this machine");
        return;
    }
    let disk = host_path(&env, "data-image").await.join("disk.img");
    apply(&env.ns, &halted("a", "t"));
    env.wait_vm("a", VirtualMachinePhase::Stopped).await;
    env.wait_gone::<k8s_openapi::api::core::v1::Pod>("a-launcher", GC).await;
    assert_eq!(std::fs::metadata(&disk).expect("disk.img").len(), GIB, "1Gi before");
    {
        use std::{io::Write, os::unix::fs::FileExt};
        let file = std::fs::OpenOptions::new().write(true).open(&disk).expect("open disk.img");
        file.write_all_at(b"vmkeep-grow-marker", 4096).expect("marker");
        (&file).flush().unwrap();
    }
    apply(&env.ns, &vm("a", "t", "Reject"));
    env.wait_vm("a", VirtualMachinePhase::Running).await;
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 * GIB, "grown at the start");
    let mut marker = [0u8; 18];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&disk).unwrap(), &mut marker, 4096).unwrap();
    assert_eq!(&marker, b"vmkeep-grow-marker", "the data stays");
}

#[tokio::test]
async fn an_image_in_a_class_that_cannot_expand_stays_usable_and_clones_get_the_new_size() {
    let env = Env::new("nogrow").await;
    let class = Class::new(&env, "fixed", "");
    apply(&env.ns, &(sized_image("os", false, "1Gi", &class.0) + &template("t", &[("root", Some("os"))])));
    apply(&env.ns, &halted("a", "t"));
    env.wait_vm("a", VirtualMachinePhase::Stopped).await;
    apply(&env.ns, &sized_image("os", false, "2Gi", &class.0));
    let image = env.wait_image("os", "cannot expand", |i| has_condition(i, "Resized", "ExpansionNotSupported")).await;
    let status = image.status.unwrap();
    assert_eq!(status.phase, Some(ImagePhase::Used), "still usable");
    assert_eq!(condition(&status.conditions, "Stalled").unwrap().status, ConditionStatus::False, "clones grow");
    env.wait_event("ExpansionNotSupported", "os").await;
    apply(&env.ns, &halted("b", "t"));
    env.wait_vm("b", VirtualMachinePhase::Stopped).await;
    assert_eq!(requested(&env, "b-root").await, 2 * GIB, "a new clone gets the new size");
    assert_eq!(requested(&env, "a-root").await, GIB);
}

#[tokio::test]
async fn clones_of_an_adopted_pvc_get_what_storage_gave_and_wait_while_it_is_unbound() {
    let env = Env::new("adopt").await;
    if !is_local_cluster() {
        eprintln!("skipped: the test makes a host-path PersistentVolume on this machine");
        return;
    }
    let ns = &env.ns.name;
    let class = Class::new(&env, "static", "");
    // Requested at 10G (decimal), to be bound by hand to a 10Gi volume.
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: appliance}}\n\
             spec: {{accessModes: [ReadWriteOnce], storageClassName: {c}, volumeName: {ns}-pv, \
             resources: {{requests: {{storage: 10G}}}}}}\n",
            c = class.0
        )),
    );
    apply(
        &env.ns,
        &format!(
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: os}}\n\
             spec: {{source: {{pvc: {{name: appliance}}}}}}\n---\n{}{}",
            template("t", &[("root", Some("os"))]),
            halted("a", "t")
        ),
    );
    let image = env.wait_image("os", "unbound", |i| has_condition(i, "Ready", "PvcNotBound")).await;
    assert_eq!(image.status.unwrap().phase, Some(ImagePhase::Pending));
    let vm = env.wait_vm("a", VirtualMachinePhase::Pending).await;
    assert_eq!(condition(&vm.status.unwrap().conditions, "Ready").unwrap().reason, "ImageNotReady");
    assert!(env.pvc("a-root").await.is_none(), "no clone of a source of unknown capacity");

    // The volume appears: seen within seconds (the PVC is watched), the clone asks for 10Gi.
    let dir = tempfile_dir(ns);
    std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {ns}-pv}}\n\
             spec: {{capacity: {{storage: 10Gi}}, accessModes: [ReadWriteOnce], storageClassName: {c}, \
             persistentVolumeReclaimPolicy: Retain, hostPath: {{path: {d}}}, \
             claimRef: {{namespace: {ns}, name: appliance}}}}\n",
            c = class.0,
            d = dir.display()
        )),
    );
    let seen = std::time::Instant::now();
    wait_for("the image to be Ready with 10Gi", Duration::from_secs(60), async || {
        let image = env.api::<Image>().get("os").await.ok()?;
        let status = image.status?;
        (status.phase == Some(ImagePhase::Ready)
            && status.capacity.as_ref().is_some_and(|c| quantity::bytes_u64(c) == 10 * GIB))
        .then_some(())
    })
    .await;
    assert!(seen.elapsed() < Duration::from_secs(45), "seen after {:?}", seen.elapsed());
    wait_for("the clone", LONG, async || env.pvc("a-root").await).await;
    assert!(requested(&env, "a-root").await >= 10 * GIB, "at least the bound capacity");
    let _ = kubectl(&["delete", "pv", &format!("{ns}-pv"), "--wait=false"], None);
}

fn tempfile_dir(ns: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmkeep-test-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_image_status_lost_during_a_pending_change_keeps_the_held_mode() {
    let env = Env::new("lost").await;
    apply(&env.ns, &(image("data", true) + &template("t", &[("data", Some("data"))]) + &halted("a", "t")));
    env.wait_vm("a", VirtualMachinePhase::Stopped).await;
    assert_eq!(env.claim_holder("data").await.as_deref(), Some("a"));
    apply(&env.ns, &image("data", false));
    env.wait_image("data", "change pending", |i| {
        i.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, "PersistenceChangePending"))
            .is_some_and(|c| c.status == ConditionStatus::True)
    })
    .await;
    // Restored from a backup: no status at all.
    let cleared = serde_json::json!({"status": null});
    env.api::<Image>().patch_status("data", &PatchParams::default(), &Patch::Merge(&cleared)).await.expect("clear");
    apply(&env.ns, &vm("b", "t", "Reject"));
    let b = env.wait_vm("b", VirtualMachinePhase::Rejected).await;
    let ready = condition(&b.status.as_ref().unwrap().conditions, "Ready").unwrap().clone();
    assert!(ready.message.contains("in use by VirtualMachine a") && ready.message.contains("to retry"), "{ready:?}");
    let image = env.api::<Image>().get("data").await.unwrap();
    assert_eq!(image.status.and_then(|s| s.persistent), Some(true), "recovered from the held claim");
    let pvcs = env.api::<PersistentVolumeClaim>().list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = pvcs.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
    assert_eq!(names, ["data-image"], "no clone of the held PVC");

    // The holder's own status lost too: it still holds the image (not waiting for a change that
    // waits for it), and comes back Stopped.
    let cleared_vm = serde_json::json!({"status": null});
    env.api::<vmkeep::api::VirtualMachine>()
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&cleared_vm))
        .await
        .expect("clear the VM's status");
    env.wait_vm("a", VirtualMachinePhase::Stopped).await;
    assert_eq!(env.claim_holder("data").await.as_deref(), Some("a"));

    // Deleted while held: the image says who holds it up, with an Event.
    env.api::<Image>().delete("data", &Default::default()).await.expect("delete");
    let image = env.wait_image("data", "deleting", |i| has_condition(i, "Ready", "InUse")).await;
    let message = condition(&image.status.unwrap().conditions, "Ready").unwrap().message.clone();
    assert_eq!(message, "deleted: waits until no longer used by VirtualMachine a");
    env.wait_event("InUse", "data").await;
}

#[tokio::test]
async fn a_rejected_vm_with_a_240_character_name_gets_its_event_and_columns_say_why() {
    let env = Env::new("long").await;
    apply(&env.ns, &(image("data", true) + &template("t", &[("data", Some("data"))]) + &halted("a", "t")));
    env.wait_vm("a", VirtualMachinePhase::Stopped).await;
    let long = format!("long-{}", "x".repeat(235));
    assert_eq!(long.len(), 240);
    apply(&env.ns, &vm(&long, "t", "Reject"));
    let rejected = env.wait_vm(&long, VirtualMachinePhase::Rejected).await;
    assert_eq!(condition(&rejected.status.unwrap().conditions, "Stalled").unwrap().status, ConditionStatus::True);
    env.wait_event("ImageInUse", &long).await;

    // At a glance: the VM's REASON, the image's HOLDER, and no Rejected instance counted.
    let vms = kubectl_ok(&["get", "vmkvm", "-n", &env.ns.name, "--no-headers"], None);
    let line = vms.lines().find(|l| l.starts_with("long-")).expect("the long VM");
    assert!(line.contains("ImageInUse"), "{vms}");
    let images = kubectl_ok(&["get", "images.vmkeep.io", "data", "-n", &env.ns.name], None);
    assert!(images.contains("HOLDER") && images.contains(" a "), "{images}");
    wait_for("instances: 1", LONG, async || {
        let t = env.api::<vmkeep::api::Template>().get("t").await.ok()?;
        (t.status?.instances == Some(1)).then_some(())
    })
    .await;

    // The holder goes: the Rejected VM no longer names it, and says how to retry.
    env.delete_vm("a").await;
    wait_for("the Rejected VM to say the image is free", LONG, async || {
        let vm = env.vm(&long).await?;
        let status = vm.status?;
        let ready = condition(&status.conditions, "Ready")?;
        (status.phase == Some(VirtualMachinePhase::Rejected) && ready.message.contains("free now")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_image_used_by_150_vms_lists_100() {
    let env = Env::new("many").await;
    // A class whose clones are the provisioner's own (empty here): no copier Pods to wait for.
    let class = Class::new(&env, "clone", "");
    let mut yaml = sized_image("os", false, "1Gi", &class.0) + &template("t", &[("root", Some("os"))]);
    for i in 0..150 {
        yaml += &halted(&format!("vm-{i:03}"), "t");
    }
    apply(&env.ns, &yaml);
    let image = wait_for("150 VMs counted", Duration::from_secs(300), async || {
        let image = env.api::<Image>().get("os").await.ok()?;
        (image.status.as_ref()?.running_vms == Some(150)).then_some(image)
    })
    .await;
    let status = image.status.unwrap();
    assert_eq!(status.consumers.len(), 100);
    assert!(status.consumers_truncated);
    assert_eq!(status.consumers.first().map(String::as_str), Some("vm-000"));
    let size = serde_json::to_vec(&status).unwrap().len();
    assert!(size < 8 * 1024, "the status stays small: {size} bytes");
    let pvc = names::image_pvc("os");
    assert!(env.pvc(&pvc).await.is_some());
}

#[tokio::test]
async fn a_deleted_image_is_not_held_by_a_clone_that_only_waits_for_it() {
    let env = Env::new("clonewait").await;
    apply(&env.ns, &(image("src", false) + &template("t", &[("root", Some("src"))]) + &halted("a", "t")));
    env.wait_vm("a", VirtualMachinePhase::Stopped).await;
    env.api::<Image>().delete("src", &Default::default()).await.expect("delete");
    env.wait_image("src", "deleting", |i| has_condition(i, "Ready", "InUse")).await;
    // A clone asked for after the deletion waits for it, and does not hold it.
    apply(
        &env.ns,
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: copy}\nspec: {source: {image: {name: src}}}\n",
    );
    env.delete_vm("a").await;
    env.wait_gone::<Image>("src", GC).await;
    env.wait_image("copy", "SourceNotFound", |i| has_condition(i, "Ready", "SourceNotFound")).await;
}
