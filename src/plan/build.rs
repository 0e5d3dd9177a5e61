//! The manifests of what vmkeep creates: PVCs for images and VM disks, launcher Pods, and claim
//! Leases. Built from plain data; the controllers only send them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            Capabilities, Container, PersistentVolumeClaim, PersistentVolumeClaimSpec,
            PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
            SecurityContext, TypedLocalObjectReference, Volume, VolumeDevice, VolumeMount, VolumeResourceRequirements,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
    },
};
use kube::{Resource, ResourceExt};

use super::{image::PvcRequest, names};
use crate::api::{
    Image, VirtualMachine, image::VolumeMode, template::LauncherSpec, virtual_machine::VirtualMachineDiskStatus,
};

/// The non-root user launcher Pods run as.
pub const LAUNCHER_UID: i64 = 65532;

fn labels(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(names::MANAGED_BY.to_owned(), names::MANAGER.to_owned())]);
    for (k, v) in extra {
        labels.insert((*k).to_owned(), (*v).to_owned());
    }
    labels
}

fn volume_mode(mode: VolumeMode) -> String {
    match mode {
        VolumeMode::Filesystem => "Filesystem".into(),
        VolumeMode::Block => "Block".into(),
    }
}

#[allow(clippy::too_many_arguments)]
fn pvc(
    name: String,
    namespace: Option<String>,
    owner: Option<OwnerReference>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    size: Quantity,
    storage_class: Option<String>,
    mode: VolumeMode,
    access_mode: &str,
    clone_from: Option<String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name),
            namespace,
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access_mode.to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), size)])),
                ..Default::default()
            }),
            storage_class_name: storage_class,
            volume_mode: Some(volume_mode(mode)),
            data_source: clone_from.map(|name| TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".into(),
                name,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The PVC of an Image (blank or clone). It has no owner reference: garbage collection (and so
/// the propagation policy of whoever deletes the Image) never touches it; the Image's finalizer
/// deletes it once no VM uses the image. The Image's uid label says whose it is.
pub fn image_pvc(image: &Image, request: &PvcRequest, access_mode: &str) -> PersistentVolumeClaim {
    let annotations = BTreeMap::from([(names::IMAGE_ANNOTATION.to_owned(), image.name_any())]);
    let uid = image.uid().unwrap_or_default();
    pvc(
        request.name.clone(),
        image.namespace(),
        None,
        labels(&[(names::IMAGE_UID_LABEL, &names::label_value(&uid))]),
        annotations,
        request.size.clone(),
        request.storage_class.clone(),
        request.volume_mode,
        access_mode,
        request.clone_from.clone(),
    )
}

/// The PVC of a VM's non-persistent disk: a clone of its image (`image` and `clone_from` set)
/// or a volatile blank disk; owned by the VM, so it dies with it.
pub fn vm_disk_pvc(
    vm: &VirtualMachine,
    disk: &VirtualMachineDiskStatus,
    image: Option<&Image>,
    clone_from: Option<&str>,
    access_mode: &str,
) -> PersistentVolumeClaim {
    let vm_name = vm.name_any();
    let mut annotations = BTreeMap::new();
    if let Some(image) = &disk.image {
        annotations.insert(names::IMAGE_ANNOTATION.to_owned(), image.clone());
    }
    pvc(
        disk.pvc_name.clone().unwrap_or_else(|| names::vm_disk_pvc(&vm_name, &disk.name)),
        vm.namespace(),
        vm.controller_owner_ref(&()),
        labels(&[(names::VM_LABEL, &names::label_value(&vm_name))]),
        annotations,
        disk.size.clone().unwrap_or_else(|| Quantity("1Gi".into())),
        // The class of the image's own PVC (a clone can only be made within one class).
        image.and_then(|i| i.status.as_ref()?.storage_class_name.clone()),
        image.map_or(VolumeMode::Filesystem, |i| i.spec.volume_mode),
        access_mode,
        clone_from.map(str::to_owned),
    )
}

/// Where a disk appears inside the launcher: a block device or a mounted folder.
pub fn disk_path(disk: &str, mode: VolumeMode) -> String {
    match mode {
        VolumeMode::Block => format!("/dev/vmkeep/{disk}"),
        VolumeMode::Filesystem => format!("/var/lib/vmkeep/disks/{disk}"),
    }
}

/// What the launcher Pod needs besides the VM.
pub struct LauncherInputs<'a> {
    pub image: &'a str,
    pub cpu: i32,
    pub memory: &'a Quantity,
    pub disks: &'a [VirtualMachineDiskStatus],
    /// The volume mode of each disk, by disk name (Filesystem when absent).
    pub modes: &'a BTreeMap<String, VolumeMode>,
    pub settings: Option<&'a LauncherSpec>,
}

/// The launcher Pod: mounts every disk PVC, requests the VM's cpu and memory, restricted Pod
/// Security settings, owned by the VM.
pub fn launcher_pod(vm: &VirtualMachine, inputs: &LauncherInputs) -> Pod {
    let vm_name = vm.name_any();
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut devices = Vec::new();
    let mut args = vec!["launch".to_owned(), "--vm".to_owned(), vm_name.clone()];
    for disk in inputs.disks {
        let volume = names::disk_volume(&disk.name);
        let mode = inputs.modes.get(&disk.name).copied().unwrap_or_default();
        let path = disk_path(&disk.name, mode);
        volumes.push(Volume {
            name: volume.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: disk.pvc_name.clone().unwrap_or_default(),
                read_only: disk.read_only.then_some(true),
            }),
            ..Default::default()
        });
        match mode {
            VolumeMode::Block => devices.push(VolumeDevice { name: volume, device_path: path.clone() }),
            VolumeMode::Filesystem => mounts.push(VolumeMount {
                name: volume,
                mount_path: path.clone(),
                read_only: disk.read_only.then_some(true),
                ..Default::default()
            }),
        }
        args.push("--disk".into());
        args.push(format!("{}={path}", disk.name));
    }
    let cpu = Quantity(inputs.cpu.to_string());
    let settings = inputs.settings.cloned().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(names::launcher_pod(&vm_name)),
            namespace: vm.namespace(),
            // The VM's name and uid: how fencing finds the Pod even once an orphaning deletion
            // removed its owner reference.
            labels: Some(labels(&[
                (names::VM_LABEL, &names::label_value(&vm_name)),
                (names::VM_UID_LABEL, &names::label_value(&vm.uid().unwrap_or_default())),
            ])),
            owner_references: Some(vec![
                vm.controller_owner_ref(&()).expect("a VirtualMachine from the API has a name and uid"),
            ]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            restart_policy: Some("Always".into()),
            node_selector: (!settings.node_selector.is_empty()).then_some(settings.node_selector),
            tolerations: (!settings.tolerations.is_empty()).then_some(settings.tolerations),
            priority_class_name: settings.priority_class_name,
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(LAUNCHER_UID),
                run_as_group: Some(LAUNCHER_UID),
                fs_group: Some(LAUNCHER_UID),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: "launcher".into(),
                image: Some(inputs.image.to_owned()),
                args: Some(args),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".to_owned(), cpu),
                        ("memory".to_owned(), inputs.memory.clone()),
                    ])),
                    limits: Some(BTreeMap::from([("memory".to_owned(), inputs.memory.clone())])),
                    ..Default::default()
                }),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                    ..Default::default()
                }),
                volume_mounts: (!mounts.is_empty()).then_some(mounts),
                volume_devices: (!devices.is_empty()).then_some(devices),
                ..Default::default()
            }],
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// The claim Lease on persistent image `image` in `namespace`, held by one VM (by uid). It has
/// no owner reference: no deletion propagation policy can remove a claim; its holder releases it
/// (see [`crate::claim`]).
pub fn claim_lease(namespace: &str, image: &str, vm_name: &str, vm_uid: &str, now: MicroTime) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(names::claim_lease(image)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(&[])),
            annotations: Some(BTreeMap::from([
                (names::IMAGE_ANNOTATION.to_owned(), image.to_owned()),
                (names::HOLDER_ANNOTATION.to_owned(), vm_name.to_owned()),
            ])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(vm_uid.to_owned()),
            acquire_time: Some(now),
            ..Default::default()
        }),
    }
}
