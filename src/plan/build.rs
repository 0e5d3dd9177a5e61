//! The manifests of what vmkeep creates: PVCs for images and VM disks, launcher Pods, and claim
//! Leases. Built from plain data; the controllers only send them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, ExecAction, PersistentVolumeClaim,
            PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
            ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, TypedLocalObjectReference,
            Volume, VolumeDevice, VolumeMount, VolumeResourceRequirements,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
    },
};
use kube::{Resource, ResourceExt};

use super::{
    clone::{Chosen, CloneStrategy},
    image::PvcRequest,
    names,
};
use crate::{
    api::{
        Image, VirtualMachine, image::VolumeMode, template::LauncherSpec, virtual_machine::VirtualMachineDiskStatus,
    },
    launcher::{self, spec::LaunchDisk},
};

/// The name of the launcher Pod's container.
pub const LAUNCHER_CONTAINER: &str = "launcher";

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
    clone_from: Option<TypedLocalObjectReference>,
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
            data_source: clone_from,
            ..Default::default()
        }),
        status: None,
    }
}

/// A PVC's `dataSource`.
fn data_source(api_group: Option<&str>, kind: &str, name: &str) -> TypedLocalObjectReference {
    TypedLocalObjectReference { api_group: api_group.map(str::to_owned), kind: kind.into(), name: name.into() }
}

/// The PVC of an Image (blank or clone). It has no owner reference: garbage collection (and so
/// the propagation policy of whoever deletes the Image) never touches it; the Image's finalizer
/// deletes it once no VM uses the image. The Image's uid label says whose it is.
pub fn image_pvc(image: &Image, request: &PvcRequest, access_mode: &str) -> PersistentVolumeClaim {
    let mut annotations = request.annotations.clone();
    annotations.insert(names::IMAGE_ANNOTATION.to_owned(), image.name_any());
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
        match (&request.clone_from, &request.from_snapshot) {
            (_, Some(snapshot)) => Some(data_source(Some(SNAPSHOT_GROUP), "VolumeSnapshot", snapshot)),
            (Some(pvc), None) => Some(data_source(None, "PersistentVolumeClaim", pvc)),
            (None, None) => None,
        },
    )
}

/// How a VM disk PVC is filled from its image's PVC.
#[derive(Clone, Debug)]
pub struct CloneOf<'a> {
    /// The image PVC it is cloned from.
    pub source: &'a str,
    /// The strategy, and why `copy` replaced the one asked for.
    pub chosen: &'a Chosen,
}

/// The PVC of a VM's non-persistent disk: a clone of its image (`image` and `clone` set) or a
/// volatile blank disk; owned by the VM and labelled with its uid ([`names::VM_UID_LABEL`]), so
/// it dies with it whatever the deletion's propagation policy (an orphaning deletion strips the
/// owner reference, the label stays: the VM's finalizer deletes it). A `csi-clone` has the source as
/// `dataSource`; a `copy` is an empty PVC a copier Pod fills ([`copier_pod`]). The strategy (and
/// a fallback's reason, and the copy's source) are recorded in annotations.
pub fn vm_disk_pvc(
    vm: &VirtualMachine,
    disk: &VirtualMachineDiskStatus,
    image: Option<&Image>,
    clone: Option<CloneOf>,
    access_mode: &str,
) -> PersistentVolumeClaim {
    let vm_name = vm.name_any();
    let mut annotations = BTreeMap::new();
    if let Some(image) = &disk.image {
        annotations.insert(names::IMAGE_ANNOTATION.to_owned(), image.clone());
    }
    let mut clone_from = None;
    if let Some(CloneOf { source, chosen }) = clone {
        annotations.insert(names::CLONE_STRATEGY_ANNOTATION.to_owned(), chosen.strategy.as_str().to_owned());
        if let Some(why) = &chosen.fallback {
            annotations.insert(names::CLONE_FALLBACK_ANNOTATION.to_owned(), why.clone());
        }
        match chosen.strategy {
            CloneStrategy::Copy => {
                annotations.insert(names::COPY_SOURCE_ANNOTATION.to_owned(), source.to_owned());
            }
            _ => clone_from = Some(source),
        }
    }
    pvc(
        disk.pvc_name.clone().unwrap_or_else(|| names::vm_disk_pvc(&vm_name, &disk.name)),
        vm.namespace(),
        vm.controller_owner_ref(&()),
        labels(&[
            (names::VM_LABEL, &names::label_value(&vm_name)),
            (names::VM_UID_LABEL, &names::label_value(&vm.uid().unwrap_or_default())),
        ]),
        annotations,
        disk.size.clone().unwrap_or_else(|| Quantity("1Gi".into())),
        // The class of the image's own PVC (a clone can only be made within one class).
        image.and_then(|i| i.status.as_ref()?.storage_class_name.clone()),
        image.map_or(VolumeMode::Filesystem, |i| i.spec.volume_mode),
        access_mode,
        clone_from.map(|pvc| data_source(None, "PersistentVolumeClaim", pvc)),
    )
}

/// The name of a copier Pod's container.
pub const COPIER_CONTAINER: &str = "copier";

/// What a copier Pod copies: the PVC it fills from the PVC it reads.
#[derive(Clone, Debug)]
pub struct CopyJob<'a> {
    /// The PVC filled (the clone).
    pub target: &'a str,
    /// The PVC read, mounted read-only.
    pub source: &'a str,
    /// Both PVCs' volume mode.
    pub mode: VolumeMode,
    /// The source is a blank image: a folder without `disk.img` copies nothing.
    pub blank_source: bool,
    /// The clone's size in bytes (its PVC request).
    pub capacity: u64,
}

/// The copier Pod that fills `copy` clone `job.target` from `job.source` (`vmkeep copy`): the
/// source mounted read-only, the target read-write, no API credentials, restricted Pod
/// Security, restarted on failure by the kubelet; owned by `owner` (a VM for its disks, an Image
/// for an image clone: it goes with them) and labelled `label` (its changes wake the owner). It
/// mounts no persistent image read-write, so it never fences a claim.
pub fn copier_pod<K: Resource<DynamicType = ()>>(owner: &K, label: (&str, &str), job: &CopyJob, image: &str) -> Pod {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut devices = Vec::new();
    let mut args = vec!["copy".to_owned()];
    for (role, claim, read_only) in [("source", job.source, true), ("target", job.target, false)] {
        let path = mount_pvc(role, claim, read_only, job.mode, &mut volumes, &mut mounts, &mut devices);
        args.push(format!("--{role}={path}"));
    }
    args.push(format!("--capacity={}", job.capacity));
    if job.blank_source {
        args.push("--allow-missing-source".into());
    }
    helper_pod(
        owner,
        names::copier_pod(&owner.meta().namespace.clone().unwrap_or_default(), job.target),
        labels(&[(label.0, &names::label_value(label.1))]),
        PodSpec {
            restart_policy: Some("OnFailure".into()),
            containers: vec![Container {
                name: COPIER_CONTAINER.into(),
                image: Some(image.to_owned()),
                args: Some(args),
                resources: Some(mover_resources("256Mi")),
                termination_message_policy: Some("File".into()),
                volume_mounts: (!mounts.is_empty()).then_some(mounts),
                volume_devices: (!devices.is_empty()).then_some(devices),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        },
    )
}

/// The resources of a helper Pod: memory only. No CPU request: moving data is I/O-bound, and
/// must not wait for the CPUs that running guests hold (on a full node it would never be
/// scheduled).
fn mover_resources(limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([("memory".to_owned(), Quantity("64Mi".into()))])),
        limits: Some(BTreeMap::from([("memory".to_owned(), Quantity(limit.into()))])),
        ..Default::default()
    }
}

/// Adds PVC `claim` as volume `role` of a helper Pod, mounted at `/var/lib/vmkeep/<role>` (a
/// folder) or attached at `/dev/vmkeep/<role>` (a block device); returns that path.
fn mount_pvc(
    role: &str,
    claim: &str,
    read_only: bool,
    mode: VolumeMode,
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
    devices: &mut Vec<VolumeDevice>,
) -> String {
    let path = match mode {
        VolumeMode::Block => format!("/dev/vmkeep/{role}"),
        VolumeMode::Filesystem => format!("/var/lib/vmkeep/{role}"),
    };
    volumes.push(Volume {
        name: role.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: read_only.then_some(true),
        }),
        ..Default::default()
    });
    match mode {
        VolumeMode::Block => devices.push(VolumeDevice { name: role.into(), device_path: path.clone() }),
        VolumeMode::Filesystem => mounts.push(VolumeMount {
            name: role.into(),
            mount_path: path.clone(),
            read_only: read_only.then_some(true),
            ..Default::default()
        }),
    }
    path
}

/// The name of an importer Pod's container.
pub const IMPORTER_CONTAINER: &str = "importer";

/// What an importer Pod does.
#[derive(Clone, Debug)]
pub struct ImportJob<'a> {
    /// The image PVC it fills; `None` for a size probe (it only finds the size the PVC needs).
    pub target: Option<&'a str>,
    pub mode: VolumeMode,
    /// `spec.size` in bytes (0 when absent): the import refuses content larger than this.
    pub capacity: u64,
}

/// The importer Pod of Image `image` (`vmkeep import`, restart policy OnFailure: a terminal
/// outcome exits 0 and is read from its termination message, a failure is kept until the spec
/// changes): the URL, format
/// and checksum of `source.http`; the target PVC read-write; an emptyDir scratch folder (qcow2
/// is converted from there); the Secret of `secretRef` (headers) and the ConfigMap of
/// `caConfigMap` (CA bundles) as read-only volumes. No API credentials, restricted Pod Security,
/// owned by the Image, labelled [`names::TRANSFER_FOR_LABEL`].
pub fn importer_pod(image: &Image, pvc: &str, job: &ImportJob, launcher_image: &str) -> Option<Pod> {
    let http = image.spec.source.http.as_ref()?;
    let mut volumes =
        vec![Volume { name: "scratch".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }];
    let mut mounts = vec![VolumeMount {
        name: "scratch".into(),
        mount_path: "/var/lib/vmkeep/scratch".into(),
        ..Default::default()
    }];
    let mut devices = Vec::new();
    let mut args = vec![
        "import".to_owned(),
        format!("--url={}", http.url),
        format!("--format={}", http.format.as_str()),
        "--scratch=/var/lib/vmkeep/scratch".to_owned(),
        format!("--capacity={}", job.capacity),
    ];
    match job.target {
        Some(target) => {
            let path = mount_pvc("target", target, false, job.mode, &mut volumes, &mut mounts, &mut devices);
            args.push(format!("--target={path}"));
        }
        None => args.push("--probe".into()),
    }
    if let Some(sha) = &http.sha256 {
        args.push(format!("--sha256={sha}"));
    }
    for (role, flag, secret, config_map) in [
        ("headers", "--headers-dir", http.secret_ref.as_ref(), None),
        ("ca", "--ca-dir", None, http.ca_config_map.as_ref()),
    ] {
        if secret.is_none() && config_map.is_none() {
            continue;
        }
        volumes.push(Volume {
            name: role.into(),
            // Optional: a missing Secret or ConfigMap is an empty folder, which the importer
            // reports as a terminal ImportFailed (instead of a Pod stuck in ContainerCreating).
            secret: secret.map(|s| SecretVolumeSource {
                secret_name: Some(s.name.clone()),
                optional: Some(true),
                ..Default::default()
            }),
            config_map: config_map.map(|c| ConfigMapVolumeSource {
                name: c.name.clone(),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
        let path = format!("/etc/vmkeep/{role}");
        mounts.push(VolumeMount {
            name: role.into(),
            mount_path: path.clone(),
            read_only: Some(true),
            ..Default::default()
        });
        args.push(format!("{flag}={path}"));
    }
    let name = match job.target {
        Some(target) => names::importer_pod(&image.namespace().unwrap_or_default(), target),
        None => names::size_probe_pod(&image.namespace().unwrap_or_default(), pvc),
    };
    let mut pod = helper_pod(
        image,
        name,
        labels(&[(names::TRANSFER_FOR_LABEL, &names::label_value(&image.name_any()))]),
        PodSpec {
            // Terminal outcomes exit 0 (the result or failure is in the termination message);
            // a network or unexpected failure exits 1 and the kubelet retries it with its
            // back-off (a crash loop shows in status, never a Pod create/delete storm).
            restart_policy: Some("OnFailure".into()),
            containers: vec![Container {
                name: IMPORTER_CONTAINER.into(),
                image: Some(launcher_image.to_owned()),
                args: Some(args),
                // qemu-img and the xz decoder need more than a copy.
                resources: Some(mover_resources("512Mi")),
                termination_message_policy: Some("File".into()),
                volume_mounts: Some(mounts),
                volume_devices: (!devices.is_empty()).then_some(devices),
                ..Default::default()
            }],
            volumes: Some(volumes),
            // No DNS add-on is assumed: the node's resolver.
            dns_policy: Some("Default".into()),
            ..Default::default()
        },
    );
    pod.metadata.annotations = Some(BTreeMap::from([(
        names::GENERATION_ANNOTATION.to_owned(),
        image.metadata.generation.unwrap_or_default().to_string(),
    )]));
    Some(pod)
}

/// `snapshot.storage.k8s.io/v1` `VolumeSnapshot`, for the dynamic API.
pub fn volume_snapshot_resource() -> kube::api::ApiResource {
    let gvk = kube::api::GroupVersionKind::gvk(SNAPSHOT_GROUP, "v1", "VolumeSnapshot");
    kube::api::ApiResource::from_gvk_with_plural(&gvk, "volumesnapshots")
}

/// `snapshot.storage.k8s.io/v1` `VolumeSnapshotClass`, for the dynamic API.
pub fn volume_snapshot_class_resource() -> kube::api::ApiResource {
    let gvk = kube::api::GroupVersionKind::gvk(SNAPSHOT_GROUP, "v1", "VolumeSnapshotClass");
    kube::api::ApiResource::from_gvk_with_plural(&gvk, "volumesnapshotclasses")
}

/// The API group of CSI snapshots.
pub const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";

/// The VolumeSnapshot `name` of PVC `source` in VolumeSnapshotClass `class`, owned by Image
/// `image` (the `snapshot` clone strategy; deleted once the clone made from it is bound).
pub fn volume_snapshot(image: &Image, name: &str, source: &str, class: &str) -> kube::api::DynamicObject {
    let mut snapshot = kube::api::DynamicObject::new(name, &volume_snapshot_resource());
    snapshot.metadata.namespace = image.namespace();
    snapshot.metadata.labels = Some(labels(&[(names::TRANSFER_FOR_LABEL, &names::label_value(&image.name_any()))]));
    snapshot.metadata.owner_references = image.controller_owner_ref(&()).map(|o| vec![o]);
    snapshot.data = serde_json::json!({
        "spec": {"volumeSnapshotClassName": class, "source": {"persistentVolumeClaimName": source}}
    });
    snapshot
}

/// The name of a binder Pod's container.
pub const BINDER_CONTAINER: &str = "binder";

/// The binder Pod of image PVC `pvc`: it mounts the PVC read-only and exits at once
/// (`vmkeep --version`), so that a `WaitForFirstConsumer` StorageClass binds it (the scheduler
/// picks its node). Restart policy Never; no API credentials; owned by the Image.
pub fn binder_pod(image: &Image, pvc: &str, mode: VolumeMode, launcher_image: &str) -> Pod {
    let (mut volumes, mut mounts, mut devices) = (Vec::new(), Vec::new(), Vec::new());
    mount_pvc("disk", pvc, true, mode, &mut volumes, &mut mounts, &mut devices);
    helper_pod(
        image,
        names::binder_pod(&image.namespace().unwrap_or_default(), pvc),
        labels(&[(names::TRANSFER_FOR_LABEL, &names::label_value(&image.name_any()))]),
        PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: BINDER_CONTAINER.into(),
                image: Some(launcher_image.to_owned()),
                args: Some(vec!["--version".into()]),
                resources: Some(mover_resources("64Mi")),
                volume_mounts: (!mounts.is_empty()).then_some(mounts),
                volume_devices: (!devices.is_empty()).then_some(devices),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        },
    )
}

/// A helper Pod of `owner` (a VM's launcher or copier, an Image's importer or copier): `spec`
/// with vmkeep's labels, controlled by `owner`, without API credentials or service links, under
/// restricted Pod Security (non-root, no privilege escalation, no capabilities, read-only root
/// filesystem, RuntimeDefault seccomp).
fn helper_pod<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: String,
    labels: BTreeMap<String, String>,
    mut spec: PodSpec,
) -> Pod {
    spec.automount_service_account_token = Some(false);
    spec.enable_service_links = Some(false);
    spec.security_context = Some(restricted_pod());
    for container in &mut spec.containers {
        container.security_context = Some(restricted_container());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: owner.meta().namespace.clone(),
            labels: Some(labels),
            owner_references: owner.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The Pod security context of launcher and copier Pods (restricted Pod Security, non-root).
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(LAUNCHER_UID),
        run_as_group: Some(LAUNCHER_UID),
        fs_group: Some(LAUNCHER_UID),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// The container security context of launcher and copier Pods.
fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        ..Default::default()
    }
}

/// Where a disk appears inside the launcher: a block device or a mounted folder.
pub fn disk_path(disk: &str, mode: VolumeMode) -> String {
    match mode {
        VolumeMode::Block => format!("/dev/vmkeep/{disk}"),
        VolumeMode::Filesystem => format!("/var/lib/vmkeep/disks/{disk}"),
    }
}

/// One disk as the launcher Pod attaches it.
#[derive(Clone, Debug)]
pub struct LauncherDisk<'a> {
    /// The disk as recorded in the VM's status (name, PVC, read-only).
    pub disk: &'a VirtualMachineDiskStatus,
    /// The PVC's volume mode.
    pub volume_mode: VolumeMode,
    /// The size the disk should have, bytes (the PVC's request).
    pub capacity: u64,
    /// Its content is blank (volatile disk or `source.blank` image): the launcher may create it.
    pub blank: bool,
}

/// What the launcher Pod needs besides the VM.
pub struct LauncherInputs<'a> {
    pub image: &'a str,
    /// The Template's vCPUs.
    pub cpu: i32,
    /// vCPUs per requested CPU (`--cpu-allocation-ratio`; 0 counts as 1): [`launcher_cpu_request`].
    pub cpu_allocation_ratio: u32,
    pub memory: &'a Quantity,
    /// The disks in Template (boot) order.
    pub disks: &'a [LauncherDisk<'a>],
    pub settings: Option<&'a LauncherSpec>,
}

/// The launcher Pod's grace period when the Template sets none, seconds.
pub const DEFAULT_GRACE_SECONDS: i64 = 60;
/// How much sooner than the grace period the launcher kills QEMU (so it ends before the
/// kubelet's SIGKILL and writes its termination message).
pub const STOP_MARGIN_SECONDS: i64 = 5;
/// The readiness probe's period, seconds: how soon after QEMU runs the guest the VM is Running.
pub const READINESS_PERIOD_SECONDS: i32 = 2;

/// Memory the launcher container uses beside the guest's RAM, MiB: QEMU's own (device models,
/// the TCG translation cache of [`crate::launcher::qemu::TCG_TB_SIZE_MIB`], I/O buffers, 8 MiB
/// per vCPU thread), `vmkeep launch`, and the page tables of guest RAM (1/512). Measured on the
/// local node (docs/performance.md, "On the node"): 123-127 MiB resident (QEMU outside the
/// guest's RAM, `vmkeep launch`) for a 1-vCPU 96 MiB TCG guest, 100-120 MiB for 256 MiB.
pub fn launcher_overhead_mib(cpu: i32, memory_bytes: u64) -> u64 {
    160 + 8 * cpu.max(1) as u64 + (memory_bytes >> 20) / 512
}

/// The CPU a launcher Pod requests for `cpu` vCPUs at allocation ratio `ratio`:
/// ceil(cpu × 1000 / ratio) millicores, written in whole CPUs when it is whole (ratio 1: `"2"`
/// for 2 vCPUs, as before the ratio existed; ratio 10: `"200m"`). QEMU still gets `cpu` vCPUs,
/// and no CPU limit is set: a ratio above 1 overcommits the node's CPUs, as KubeVirt's
/// `cpuAllocationRatio` does.
pub fn launcher_cpu_request(cpu: i32, ratio: u32) -> Quantity {
    let millis = (u64::from(cpu.max(0).unsigned_abs()) * 1000).div_ceil(u64::from(ratio.max(1)));
    match millis % 1000 {
        0 => Quantity((millis / 1000).to_string()),
        _ => Quantity(format!("{millis}m")),
    }
}

/// The launcher Pod: runs `vmkeep launch` (QEMU) on every disk PVC, requests the VM's cpu
/// (divided by its [`LauncherInputs::cpu_allocation_ratio`]) and memory plus the launcher's overhead, readiness
/// from QMP `query-status`, a grace period longer than the launcher's stop deadline, restricted
/// Pod Security settings, owned by the VM.
pub fn launcher_pod(vm: &VirtualMachine, inputs: &LauncherInputs) -> Pod {
    let vm_name = vm.name_any();
    let settings = inputs.settings.cloned().unwrap_or_default();
    let grace = settings.termination_grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    let memory_bytes = super::quantity::bytes_u64(inputs.memory);
    let memory_mib = (memory_bytes >> 20).max(16);
    let mut volumes = Vec::new();
    let mut mounts =
        vec![VolumeMount { name: "run".into(), mount_path: launcher::RUN_DIR.into(), ..Default::default() }];
    let mut devices = Vec::new();
    let mut args = vec![
        "launch".to_owned(),
        format!("--vm={vm_name}"),
        format!("--cpu={}", inputs.cpu),
        format!("--memory-mib={memory_mib}"),
        format!("--stop-timeout-seconds={}", grace - STOP_MARGIN_SECONDS),
    ];
    volumes.push(Volume {
        name: "run".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("1Mi".into())),
        }),
        ..Default::default()
    });
    for LauncherDisk { disk, volume_mode, capacity, blank } in inputs.disks {
        let volume = names::disk_volume(&disk.name);
        let path = disk_path(&disk.name, *volume_mode);
        volumes.push(Volume {
            name: volume.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: disk.pvc_name.clone().unwrap_or_default(),
                read_only: disk.read_only.then_some(true),
            }),
            ..Default::default()
        });
        match volume_mode {
            VolumeMode::Block => devices.push(VolumeDevice { name: volume, device_path: path.clone() }),
            VolumeMode::Filesystem => mounts.push(VolumeMount {
                name: volume,
                mount_path: path.clone(),
                read_only: disk.read_only.then_some(true),
                ..Default::default()
            }),
        }
        let launch = LaunchDisk {
            name: disk.name.clone(),
            path: path.into(),
            volume_mode: *volume_mode,
            capacity: *capacity,
            read_only: disk.read_only,
            cdrom: disk.read_only,
            blank: *blank,
        };
        args.push(format!("--disk={launch}"));
    }
    let memory = Quantity(format!("{}Mi", memory_mib + launcher_overhead_mib(inputs.cpu, memory_bytes)));
    let cpu = launcher_cpu_request(inputs.cpu, inputs.cpu_allocation_ratio);
    // The VM's name and uid: how fencing finds the Pod even once an orphaning deletion removed
    // its owner reference.
    let labels = labels(&[
        (names::VM_LABEL, &names::label_value(&vm_name)),
        (names::VM_UID_LABEL, &names::label_value(&vm.uid().unwrap_or_default())),
    ]);
    helper_pod(
        vm,
        names::launcher_pod(&vm.namespace().unwrap_or_default(), &vm_name),
        labels,
        PodSpec {
            // A guest that powers itself off is started again, with the kubelet's back-off.
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(grace),
            node_selector: (!settings.node_selector.is_empty()).then_some(settings.node_selector),
            tolerations: (!settings.tolerations.is_empty()).then_some(settings.tolerations),
            priority_class_name: settings.priority_class_name,
            containers: vec![Container {
                name: LAUNCHER_CONTAINER.into(),
                image: Some(inputs.image.to_owned()),
                args: Some(args),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([("cpu".to_owned(), cpu), ("memory".to_owned(), memory.clone())])),
                    limits: Some(BTreeMap::from([("memory".to_owned(), memory)])),
                    ..Default::default()
                }),
                readiness_probe: Some(Probe {
                    exec: Some(ExecAction { command: Some(vec!["/vmkeep".into(), "probe".into()]) }),
                    period_seconds: Some(READINESS_PERIOD_SECONDS),
                    timeout_seconds: Some(3),
                    failure_threshold: Some(1),
                    ..Default::default()
                }),
                termination_message_policy: Some("File".into()),
                volume_mounts: Some(mounts),
                volume_devices: (!devices.is_empty()).then_some(devices),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        },
    )
}

/// `kubevirt.io/v1` `VirtualMachineInstance`, for the dynamic API (the `kubevirt` runtime).
pub fn virtual_machine_instance_resource() -> kube::api::ApiResource {
    let gvk = kube::api::GroupVersionKind::gvk(KUBEVIRT_GROUP, "v1", "VirtualMachineInstance");
    kube::api::ApiResource::from_gvk_with_plural(&gvk, "virtualmachineinstances")
}

/// KubeVirt's API group.
pub const KUBEVIRT_GROUP: &str = "kubevirt.io";

/// The KubeVirt VirtualMachineInstance that runs `vm` with the `kubevirt` runtime: named after
/// the VM, controlled by it, labelled like a launcher Pod (KubeVirt copies a VMI's labels onto
/// its virt-launcher Pod, so fencing finds that Pod by the VM's uid too). The Template's cpu as
/// `domain.cpu.cores`, its memory as `domain.memory.guest` and the memory request; each disk
/// (in Template order, `bootOrder` 1, 2, ... as the launcher's `bootindex`, the disk name as
/// serial) a virtio disk, or a read-only SATA `cdrom`, on a `persistentVolumeClaim` volume of
/// the same PVC the launcher would mount (a Filesystem PVC holds `disk.img` at its root, the
/// layout of both). The launcher settings map to the VMI's fields of the same names. Built with
/// KubeVirt's own types (`k8s-crds-kube-virt`, generated from its CRDs) and sent as JSON.
pub fn virtual_machine_instance(vm: &VirtualMachine, inputs: &LauncherInputs) -> Instance {
    use k8s_crds_kube_virt::virtualmachineinstances as kv;
    use k8s_openapi_kubevirt::apimachinery::pkg::util::intstr::IntOrString;
    let settings = inputs.settings.cloned().unwrap_or_default();
    let memory = IntOrString::String(inputs.memory.0.clone());
    let mut disks = Vec::new();
    let mut volumes = Vec::new();
    for (i, LauncherDisk { disk, .. }) in inputs.disks.iter().enumerate() {
        let (device, cdrom) = match disk.read_only {
            true => (
                None,
                Some(kv::VirtualMachineInstanceDomainDevicesDisksCdrom {
                    bus: Some("sata".into()),
                    readonly: Some(true),
                    ..Default::default()
                }),
            ),
            false => (
                Some(kv::VirtualMachineInstanceDomainDevicesDisksDisk {
                    bus: Some("virtio".into()),
                    ..Default::default()
                }),
                None,
            ),
        };
        disks.push(kv::VirtualMachineInstanceDomainDevicesDisks {
            name: disk.name.clone(),
            boot_order: Some(i as i64 + 1),
            serial: (!disk.read_only).then(|| disk.name.clone()),
            disk: device,
            cdrom,
            ..Default::default()
        });
        volumes.push(kv::VirtualMachineInstanceVolumes {
            name: disk.name.clone(),
            persistent_volume_claim: Some(kv::VirtualMachineInstanceVolumesPersistentVolumeClaim {
                claim_name: disk.pvc_name.clone().unwrap_or_default(),
                read_only: disk.read_only.then_some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let tolerations = settings
        .tolerations
        .iter()
        .map(|t| kv::VirtualMachineInstanceTolerations {
            effect: t.effect.clone(),
            key: t.key.clone(),
            operator: t.operator.clone(),
            toleration_seconds: t.toleration_seconds,
            value: t.value.clone(),
        })
        .collect::<Vec<_>>();
    let spec = kv::VirtualMachineInstanceSpec {
        domain: kv::VirtualMachineInstanceDomain {
            cpu: Some(kv::VirtualMachineInstanceDomainCpu { cores: Some(inputs.cpu), ..Default::default() }),
            memory: Some(kv::VirtualMachineInstanceDomainMemory { guest: Some(memory.clone()), ..Default::default() }),
            resources: Some(kv::VirtualMachineInstanceDomainResources {
                requests: Some(BTreeMap::from([("memory".to_owned(), memory)])),
                ..Default::default()
            }),
            devices: kv::VirtualMachineInstanceDomainDevices { disks: Some(disks), ..Default::default() },
            ..Default::default()
        },
        volumes: Some(volumes),
        node_selector: (!settings.node_selector.is_empty()).then_some(settings.node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        priority_class_name: settings.priority_class_name,
        termination_grace_period_seconds: Some(
            settings.termination_grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS),
        ),
        ..Default::default()
    };
    let vm_name = vm.name_any();
    let metadata = ObjectMeta {
        name: Some(vm_name.clone()),
        namespace: vm.namespace(),
        labels: Some(labels(&[
            (names::VM_LABEL, &names::label_value(&vm_name)),
            (names::VM_UID_LABEL, &names::label_value(&vm.uid().unwrap_or_default())),
        ])),
        owner_references: vm.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    };
    let spec = serde_json::to_value(spec).expect("KubeVirt's spec type serializes");
    Instance { api_version: "kubevirt.io/v1".into(), kind: "VirtualMachineInstance".into(), metadata, spec }
}

/// A KubeVirt `kubevirt.io/v1` VirtualMachineInstance as vmkeep writes it: its metadata (this
/// crate's `k8s-openapi`) and its spec, built as KubeVirt's type and kept as JSON, so reading
/// back what a newer KubeVirt wrote (a value the crate's closed enums lack) cannot fail. A
/// `k8s_openapi::Resource`, so kube's `Api` creates and deletes it like any child; what the
/// caches keep of one is [`super::cached::CachedVmi`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Instance {
    /// `kubevirt.io/v1` (the API server wants it in the body).
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// `VirtualMachineInstance`.
    pub kind: String,
    pub metadata: ObjectMeta,
    /// KubeVirt's `VirtualMachineInstanceSpec`, as JSON.
    #[serde(default)]
    pub spec: serde_json::Value,
}

impl Instance {
    /// The PVCs its volumes name (`spec.volumes[].persistentVolumeClaim.claimName`).
    pub fn claim_names(&self) -> impl Iterator<Item = &str> {
        let volumes = self.spec.get("volumes").and_then(|v| v.as_array()).map(Vec::as_slice).unwrap_or_default();
        volumes.iter().filter_map(|v| v.get("persistentVolumeClaim")?.get("claimName")?.as_str())
    }
}

super::cached::resource!(
    Instance,
    "kubevirt.io",
    "kubevirt.io/v1",
    "VirtualMachineInstance",
    "virtualmachineinstances"
);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_request_is_the_vcpus_divided_by_the_allocation_ratio_rounded_up_to_a_millicore() {
        let request = |cpu, ratio| launcher_cpu_request(cpu, ratio).0;
        // Ratio 1 (the default): whole CPUs, as before the setting existed.
        assert_eq!(request(1, 1), "1");
        assert_eq!(request(2, 1), "2");
        // KubeVirt's default ratio 10: a tenth of a CPU per vCPU.
        assert_eq!(request(1, 10), "100m");
        assert_eq!(request(4, 10), "400m");
        assert_eq!(request(10, 10), "1");
        // Rounded up: never 0 for a VM with a vCPU.
        assert_eq!(request(1, 3), "334m");
        assert_eq!(request(2, 3), "667m");
        assert_eq!(request(1, 1000), "1m");
        assert_eq!(request(1, 4000), "1m");
        // 0 counts as 1.
        assert_eq!(request(2, 0), "2");
    }

    #[test]
    fn the_launcher_pod_requests_its_share_of_a_cpu_and_qemu_still_gets_every_vcpu() {
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmkeep.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": "vm-a", "namespace": "ns", "uid": "u-1"},
            "spec": {"templateRef": {"name": "t"}},
        }))
        .expect("a VirtualMachine");
        let memory = Quantity("256Mi".into());
        for (ratio, want) in [(1, "2"), (10, "200m"), (3, "667m")] {
            let inputs = LauncherInputs {
                image: "vmkeep:test",
                cpu: 2,
                cpu_allocation_ratio: ratio,
                memory: &memory,
                disks: &[],
                settings: None,
            };
            let pod = launcher_pod(&vm, &inputs);
            let container = &pod.spec.as_ref().expect("spec").containers[0];
            let resources = container.resources.as_ref().expect("resources");
            let requests = resources.requests.as_ref().expect("requests");
            assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some(want), "ratio {ratio}");
            assert!(resources.limits.as_ref().expect("limits").get("cpu").is_none(), "no CPU limit at ratio {ratio}");
            let args = container.args.as_ref().expect("args");
            assert!(args.contains(&"--cpu=2".to_owned()), "QEMU gets every vCPU at ratio {ratio}: {args:?}");
        }
    }
}
